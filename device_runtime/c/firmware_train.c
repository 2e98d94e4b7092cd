/* Bare-metal training firmware for Cortex-M (QEMU mps2-an386): runs fedtiny_train_steps training steps of the
 * generated plan on the int8 samples and labels (int8 targets for an MSE plan) in flash (step i uses sample
 * i mod N), then prints the FNV-1a digest of the trainable bytes and the random counter over semihosting and
 * exits QEMU with status 0 (1 if a kernel failed). It also prints the peak stack of the steps below main's
 * frame (the stack painted before the first step), which fedtiny.device_memory.step_stack_bytes must cover.
 * Built by the Makefile's `m4-train` target with fedtiny_boot.c. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "fedtiny_boot.h"
#include "model.h"

#include "fedtiny_samples.h"

int main(void)
{
    uint32_t i;
    int failed = 0;
    uint64_t counter;
    uint32_t base;
    printf("fedtiny train: %lu steps on %lu samples, arena %lu bytes, scratch %lu bytes\n",
           (unsigned long)fedtiny_train_steps, (unsigned long)fedtiny_n_samples,
           (unsigned long)FEDTINY_MODEL_ARENA_BYTES, (unsigned long)FEDTINY_MODEL_SCRATCH_BYTES);
    fedtiny_model_train_init(fedtiny_train_seed);
    fedtiny_stack_paint();
    for (i = 0; i < fedtiny_train_steps && !failed; i++) {
        const uint32_t k = i % fedtiny_n_samples;
        fedtiny_status status;
        fedtiny_mark_begin();
#if FEDTINY_MODEL_LOSS_MSE
        status = fedtiny_model_train_step(fedtiny_samples + k * FEDTINY_MODEL_INPUT_BYTES,
                                          fedtiny_targets + k * FEDTINY_MODEL_OUTPUT_BYTES);
#else
        status = fedtiny_model_train_step(fedtiny_samples + k * FEDTINY_MODEL_INPUT_BYTES, fedtiny_labels[k]);
#endif
        fedtiny_mark_end();
        if (status != FEDTINY_OK) {
            printf("step %lu failed: status %d\n", (unsigned long)i, (int)status);
            failed = 1;
        }
    }
    base = fedtiny_stack_peak(&base);
    printf("step stack %lu bytes\n", (unsigned long)base);
    counter = fedtiny_model_rng_counter();
    printf("trained %lu steps digest %08lx rng %08lx%08lx\n", (unsigned long)i,
           (unsigned long)fedtiny_model_trainable_digest(), (unsigned long)(uint32_t)(counter >> 32),
           (unsigned long)(uint32_t)counter);
    return failed;
}
