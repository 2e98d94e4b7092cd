/* Bare-metal firmware for Cortex-M (QEMU mps2-an386): runs the generated model on the int8 samples embedded
 * in flash (samples.c), prints one FNV-1a digest per sample over semihosting, and exits QEMU with status 0
 * (1 if a kernel failed). Built by the generated Makefile's `m4` target with -nostartfiles: the reset
 * handler below copies .data, zeroes .bss, enables the FPU and sets up semihosting before main. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

extern const uint32_t fedtiny_n_samples;
extern const int8_t fedtiny_samples[];

extern uint32_t __data_start, __data_end, __data_load, __bss_start, __bss_end, __stack_top;
extern void initialise_monitor_handles(void);

/* Instruction-count markers: tools/insn_count.c counts what runs between them. Distinct bodies keep the
 * compiler from merging the two functions. */
volatile uint32_t fedtiny_marker;
__attribute__((noinline)) void fedtiny_mark_begin(void) { fedtiny_marker = 1u; }
__attribute__((noinline)) void fedtiny_mark_end(void) { fedtiny_marker = 2u; }

static uint32_t fnv1a(const int8_t *bytes, uint32_t n)
{
    uint32_t h = 2166136261u;
    uint32_t i;
    for (i = 0; i < n; i++) {
        h = (h ^ (uint8_t)bytes[i]) * 16777619u;
    }
    return h;
}

int main(void)
{
    static int8_t output[FEDTINY_MODEL_OUTPUT_BYTES];
    uint32_t i;
    int failed = 0;
    printf("fedtiny: %lu samples, arena %lu bytes, scratch %lu bytes\n", (unsigned long)fedtiny_n_samples,
           (unsigned long)FEDTINY_MODEL_ARENA_BYTES, (unsigned long)FEDTINY_MODEL_SCRATCH_BYTES);
    for (i = 0; i < fedtiny_n_samples; i++) {
        fedtiny_status status;
        fedtiny_mark_begin();
        status = fedtiny_model_run(fedtiny_samples + i * FEDTINY_MODEL_INPUT_BYTES, output);
        fedtiny_mark_end();
        if (status != FEDTINY_OK) {
            printf("sample %lu failed: status %d\n", (unsigned long)i, (int)status);
            failed = 1;
        }
        printf("sample %lu digest %08lx\n", (unsigned long)i,
               (unsigned long)fnv1a(output, FEDTINY_MODEL_OUTPUT_BYTES));
    }
    printf("done %lu\n", (unsigned long)fedtiny_n_samples);
    return failed;
}

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
