/* Start-up shared by the firmwares: see fedtiny_boot.c. */
#ifndef FEDTINY_BOOT_H
#define FEDTINY_BOOT_H

#include <stdint.h>

void fedtiny_mark_begin(void);
void fedtiny_mark_end(void);

/* Milliseconds since the board started, in steps of 10 (the MPS2 FPGA's 100 Hz counter, which QEMU runs on its
 * virtual clock); wraps after 49 days. */
uint32_t fedtiny_clock_ms(void);

/* Peak stack of a call: fedtiny_stack_paint() fills the unused stack below its caller's frame with a pattern,
 * then fedtiny_stack_peak(&base), with `base` a local of that caller, gives the bytes used below it since (the
 * deepest byte the pattern lost). */
void fedtiny_stack_paint(void);
uint32_t fedtiny_stack_peak(const void *base);

#endif
