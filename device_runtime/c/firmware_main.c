/* Bare-metal firmware for Cortex-M (QEMU mps2-an386): runs the generated model on the int8 samples embedded
 * in flash (samples.c), prints one FNV-1a digest per sample over semihosting, and exits QEMU with status 0
 * (1 if a kernel failed). Built by the generated Makefile's `m4` target with fedtiny_boot.c. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fedtiny_boot.h"
#include "model.h"

#include "fedtiny_samples.h"

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
