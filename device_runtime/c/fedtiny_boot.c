/* Bare-metal start-up shared by the firmwares (QEMU mps2-an386, Cortex-M4F): the vector table, a reset handler
 * that copies .data, zeroes .bss, enables the FPU and sets up semihosting before calling the firmware's main,
 * the instruction-count markers tools/insn_count.c counts between, and a millisecond clock. Linked with
 * -nostartfiles. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "fedtiny_boot.h"

extern uint32_t __data_start, __data_end, __data_load, __bss_start, __bss_end, __stack_top;
extern uint8_t __stack_limit[]; /* the lowest address of the stack (fedtiny_m4.ld) */
extern void initialise_monitor_handles(void);
extern int main(void);

#define MPS2_FPGAIO_CLK100HZ 0x40028014u

uint32_t fedtiny_clock_ms(void)
{
    return *(volatile const uint32_t *)MPS2_FPGAIO_CLK100HZ * 10u;
}

/* Distinct bodies keep the compiler from merging the two marker functions. */
volatile uint32_t fedtiny_marker;
__attribute__((noinline)) void fedtiny_mark_begin(void) { fedtiny_marker = 1u; }
__attribute__((noinline)) void fedtiny_mark_end(void) { fedtiny_marker = 2u; }

void fedtiny_reset_handler(void)
{
    uint32_t *src = &__data_load, *dst = &__data_start;
    while (dst < &__data_end) {
        *dst++ = *src++;
    }
    for (dst = &__bss_start; dst < &__bss_end; dst++) {
        *dst = 0u;
    }
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20; /* CPACR: full access to CP10/CP11 (the FPU) */
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    initialise_monitor_handles();
    exit(main());
}

static void fedtiny_fault_handler(void)
{
    printf("fedtiny: fault\n");
    exit(3);
}

/* Cortex-M vector table: initial stack pointer, reset, then NMI, HardFault, MemManage, BusFault, UsageFault. */
__attribute__((section(".isr_vector"), used)) static void (*const vectors[])(void) = {
    (void (*)(void))&__stack_top, fedtiny_reset_handler, fedtiny_fault_handler, fedtiny_fault_handler,
    fedtiny_fault_handler, fedtiny_fault_handler, fedtiny_fault_handler,
};

#define STACK_PAINT 0xA5u

__attribute__((noinline)) void fedtiny_stack_paint(void)
{
    uintptr_t below_this_frame = (uintptr_t)__builtin_frame_address(0) - 64u;
    volatile uint8_t *p;
    for (p = __stack_limit; (uintptr_t)p < below_this_frame; p++) {
        *p = STACK_PAINT;
    }
}

uint32_t fedtiny_stack_peak(const void *base)
{
    const volatile uint8_t *p = __stack_limit;
    while ((uintptr_t)p < (uintptr_t)base && *p == STACK_PAINT) {
        p++;
    }
    return (uint32_t)((uintptr_t)base - (uintptr_t)p);
}
