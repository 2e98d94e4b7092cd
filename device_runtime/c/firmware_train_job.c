/* Bare-metal firmware for Cortex-M (QEMU mps2-an386) running two rounds' train jobs (fedtiny_train_job.c) on the
 * samples and labels (int8 targets for an MSE plan) in flash, as a node would: round 3 takes
 * fedtiny_train_steps steps from the plan's initial state, round 4 two epochs from round 3's state and counter.
 * Each prints one line over semihosting,
 *   `job ROUND status S steps N examples E loss HEX16 accuracy HEX16 personal HEX16 rng HEX16 digest HEX8`
 * (loss and both accuracies as the bits of their doubles, the digest = fedtiny_model_trainable_digest of the trained
 * arena), then QEMU exits with status 0 (1 if a job failed). Built by the Makefile's `m4-train-job` target. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fedtiny_boot.h"
#include "fedtiny_train_job.h"

#define MAX_SAMPLES 1024u

#include "fedtiny_samples.h"

static uint8_t state[FEDTINY_MODEL_STATE_BYTES > 0 ? FEDTINY_MODEL_STATE_BYTES : 1];
static uint16_t order[MAX_SAMPLES];

static void print_u64(const char *name, uint64_t v)
{
    printf(" %s %08lx%08lx", name, (unsigned long)(uint32_t)(v >> 32), (unsigned long)(uint32_t)v);
}

static uint64_t bits_of(double v)
{
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    return bits;
}

static int run_job(uint32_t round, uint32_t epochs, uint32_t steps, uint64_t *counter)
{
    fedtiny_train_job job;
    fedtiny_train_result result;
    fedtiny_train_job_status status;
    memset(&job, 0, sizeof job);
    memset(&result, 0, sizeof result);
    job.seed = fedtiny_train_seed;
    job.round = round;
    job.epochs = epochs;
    job.steps = steps;
    job.rng_counter = *counter;
    job.base = state;
    job.samples = fedtiny_samples;
#if FEDTINY_MODEL_LOSS_MSE
    job.targets = fedtiny_targets;
#else
    job.labels = fedtiny_labels;
#endif
    job.n = fedtiny_n_samples;
    job.order = order;
    fedtiny_mark_begin();
    status = fedtiny_train_job_run(&job, state, &result); /* the trained state replaces the base */
    fedtiny_mark_end();
    *counter = result.rng_counter;
    printf("job %lu status %d steps %lu examples %lu", (unsigned long)round, (int)status,
           (unsigned long)result.steps_done, (unsigned long)result.num_examples);
    print_u64("loss", bits_of(result.loss));
    print_u64("accuracy", bits_of(result.accuracy));
    print_u64("personal", bits_of(result.personal_accuracy));
    print_u64("rng", result.rng_counter);
    printf(" digest %08lx\n", (unsigned long)fedtiny_model_trainable_digest());
    return status != FEDTINY_TRAIN_JOB_OK;
}

int main(void)
{
    uint64_t counter;
    int failed;
    if (fedtiny_n_samples > MAX_SAMPLES) {
        printf("more than %u samples\n", MAX_SAMPLES);
        return 1;
    }
    fedtiny_model_train_init(fedtiny_train_seed);
    fedtiny_model_store_state(state);
    counter = fedtiny_model_rng_counter();
    failed = run_job(3, 0, fedtiny_train_steps, &counter);
    failed |= run_job(4, 2, 0, &counter);
    return failed;
}
