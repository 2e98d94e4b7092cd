/* A flash in RAM for host builds and tests, behind the store's HAL (fedtiny_store.h), that checks what real
 * flash with ECC demands and can lose power at a chosen point.
 *
 * Checks (a violation returns -1 and changes nothing): erase of an existing bank; program within the region, at
 * a unit-aligned offset, of whole units; each unit programmed at most once since its bank's last erase; no bit
 * set from 0 to 1.
 *
 * Power cut: fedtiny_flash_ram_cut arms a cut after `program_bytes` more programmed bytes or at the start of the
 * erase after `erases` more whole ones (a negative count never cuts there). The operation the cut falls into is
 * torn and returns -1, and the flash is dead (every call returns -1) until fedtiny_flash_ram_revive, the next
 * power-up:
 *   - a torn program has applied its first bytes up to the cut; with `garble`, the rest of the unit the cut falls
 *     in is left half-programmed (old & (data | a fixed bit pattern)), as an interrupted program leaves cells;
 *   - a torn erase has set [erase_from, erase_from + erase_length) of the bank to 0xFF and left the rest as it
 *     was; every unit of the bank counts as programmed until a whole erase.
 * Portable C99, no malloc: the caller gives the memory. */
#ifndef FEDTINY_FLASH_RAM_H
#define FEDTINY_FLASH_RAM_H

#include <stdint.h>

#include "fedtiny_store.h"

typedef struct {
    fedtiny_flash flash;    /* the HAL to hand to fedtiny_store_open; its context is this struct */
    uint8_t *memory;        /* bank_size * bank_count bytes */
    uint8_t *programmed;    /* one byte per program unit: 1 once programmed since the last erase */
    int dead;               /* the power is off: everything fails */
    int64_t program_left;   /* bytes before the cut; negative: no cut */
    int64_t erases_left;    /* whole erases before the cut; negative: no cut */
    uint32_t erase_from, erase_length; /* what a torn erase has erased, in bank offsets */
    int garble;
    uint64_t bytes_programmed, erases; /* totals since init, for tests that step through every cut */
} fedtiny_flash_ram;

/* Set up the HAL over memory (bank_size * bank_count bytes) and programmed (bank_size * bank_count /
 * program_unit bytes), all erased. Returns 0, or -1 for a geometry fedtiny_store would refuse to store in. */
int fedtiny_flash_ram_init(fedtiny_flash_ram *ram, uint8_t *memory, uint8_t *programmed, uint32_t bank_size,
                           uint32_t bank_count, uint32_t program_unit);
void fedtiny_flash_ram_cut(fedtiny_flash_ram *ram, int64_t program_bytes, int64_t erases, uint32_t erase_from,
                           uint32_t erase_length, int garble);
/* Power back on: no cut armed, the flash as the cut left it. */
void fedtiny_flash_ram_revive(fedtiny_flash_ram *ram);

#endif
