/* The store's flash HAL (fedtiny_store.h) on a host file, through ARM semihosting: what the QEMU node uses for
 * flash, so that its state survives QEMU being killed and started again (qemu-system-arm -semihosting; a path
 * is relative to QEMU's working directory, so give each node its own).
 *
 * The file is the flash image: bank_size * bank_count bytes, 0xFF where erased. A missing file is created
 * erased, a short one (a fill cut short) is extended with 0xFF. program obeys and checks the flash rules
 * fedtiny_flash_ram.c checks, except "each unit once" (that would need a bit per unit of RAM): whole aligned
 * units, bits only cleared. Each HAL call reaches the host file before it returns (one SYS_WRITE per at most
 * FEDTINY_FLASH_SEMIHOST_CHUNK bytes), so killing QEMU is a power cut between two of them.
 * ARM targets only (bkpt 0xAB); no stdio, no malloc. */
#ifndef FEDTINY_FLASH_SEMIHOST_H
#define FEDTINY_FLASH_SEMIHOST_H

#include <stdint.h>

#include "fedtiny_store.h"

#ifndef FEDTINY_FLASH_SEMIHOST_CHUNK
#define FEDTINY_FLASH_SEMIHOST_CHUNK 256u /* bytes of stack per read-check-write step */
#endif

typedef struct {
    fedtiny_flash flash; /* the HAL to hand to fedtiny_store_open; its context is this struct */
    int handle;          /* the semihosting file handle, -1 when closed */
} fedtiny_flash_semihost;

/* Open (or create) the image at path. Returns 0, or -1 if the host refused the file or the geometry is one
 * fedtiny_store would refuse. */
int fedtiny_flash_semihost_open(fedtiny_flash_semihost *fs, const char *path, uint32_t bank_size,
                                uint32_t bank_count, uint32_t program_unit);
void fedtiny_flash_semihost_close(fedtiny_flash_semihost *fs);

#endif
