/* Start-up shared by the firmwares: see fedtiny_boot.c. */
#ifndef FEDTINY_BOOT_H
#define FEDTINY_BOOT_H

#include <stdint.h>

void fedtiny_mark_begin(void);
void fedtiny_mark_end(void);

/* Milliseconds since the board started, in steps of 10 (the MPS2 FPGA's 100 Hz counter, which QEMU runs on its
 * virtual clock); wraps after 49 days. */
uint32_t fedtiny_clock_ms(void);

#endif
