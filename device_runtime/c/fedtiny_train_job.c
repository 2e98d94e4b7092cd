/* A round's training on the device (see fedtiny_train_job.h): LocalTraining.run of fedtiny_device.agent in C. */
#include "fedtiny_train_job.h"

#include <stddef.h>

#include "fedtiny_arith.h"

/* Fisher-Yates over a[0..n): for i = n-1 down to 1 swap entry i with entry fedtiny_uniform_below(i + 1), drawing from
 * the splitmix64 stream after fedtiny_order_key(seed, round, epoch). On the identity it makes the epoch's
 * permutation P; on any array a it makes a[P[k]] at k (the same swaps at the same places). */
static void shuffle(uint64_t seed, uint64_t round, uint64_t epoch, uint32_t n, uint16_t *a)
{
    uint64_t counter = fedtiny_order_key(seed, round, epoch);
    uint32_t i;
    for (i = n; i > 1u; i--) { /* entry i - 1 swaps with a uniform one of 0..i-1 */
        const uint32_t j = fedtiny_uniform_below(&counter, i);
        const uint16_t t = a[i - 1u];
        a[i - 1u] = a[j];
        a[j] = t;
    }
}

void fedtiny_training_permutation(uint64_t seed, uint64_t round, uint64_t epoch, uint32_t n, uint16_t *order)
{
    uint32_t i;
    for (i = 0; i < n; i++) {
        order[i] = (uint16_t)i;
    }
    shuffle(seed, round, epoch, n, order);
}

uint32_t fedtiny_heldout_count(uint32_t n)
{
    return n >= FEDTINY_HELDOUT_MIN_SAMPLES ? n / FEDTINY_HELDOUT_SHARE : 0u;
}

/* order[0..h) the held-out samples, order[h..n) the train part (agent.heldout_split): the split permutation, or
 * the identity where the device holds nothing out. */
static void split(const fedtiny_train_job *job, uint32_t h, uint16_t *order)
{
    uint32_t i;
    if (h > 0u) {
        fedtiny_training_permutation(job->seed, FEDTINY_SPLIT_ROUND, 0u, job->n, order);
        return;
    }
    for (i = 0; i < job->n; i++) {
        order[i] = (uint16_t)i;
    }
}

static int abandoned(const fedtiny_train_job *job)
{
    return job->poll != NULL && job->poll(job->poll_context) != 0;
}

static fedtiny_train_job_status checked(const fedtiny_train_job *job, const uint8_t *state_out,
                                        const fedtiny_train_result *result)
{
    uint32_t i;
    if (job == NULL || state_out == NULL || result == NULL || job->base == NULL ||
        job->n > FEDTINY_TRAIN_JOB_MAX_SAMPLES) {
        return FEDTINY_TRAIN_JOB_BAD_INPUT;
    }
#if FEDTINY_MODEL_LOSS_MSE
    if (job->n_eval > 0u) { /* no classes to score */
        return FEDTINY_TRAIN_JOB_BAD_INPUT;
    }
#else
    if (job->n_eval > 0u && (job->eval_samples == NULL || job->eval_labels == NULL)) {
        return FEDTINY_TRAIN_JOB_BAD_INPUT;
    }
    for (i = 0; i < job->n_eval; i++) {
        if (job->eval_labels[i] < 0 || job->eval_labels[i] >= (int32_t)FEDTINY_MODEL_OUTPUT_BYTES) {
            return FEDTINY_TRAIN_JOB_BAD_INPUT;
        }
    }
#endif
    if (job->n == 0u) {
        return FEDTINY_TRAIN_JOB_OK;
    }
#if FEDTINY_MODEL_LOSS_MSE
    if (job->samples == NULL || job->order == NULL || job->targets == NULL) {
        return FEDTINY_TRAIN_JOB_BAD_INPUT;
    }
#else
    if (job->samples == NULL || job->order == NULL || job->labels == NULL) {
        return FEDTINY_TRAIN_JOB_BAD_INPUT;
    }
    for (i = 0; i < job->n; i++) {
        if (job->labels[i] < 0 || job->labels[i] >= (int32_t)FEDTINY_MODEL_OUTPUT_BYTES) {
            return FEDTINY_TRAIN_JOB_BAD_INPUT;
        }
    }
#endif
    (void)i;
    return FEDTINY_TRAIN_JOB_OK;
}

/* One step on sample i; *loss gets its loss (the same double as the host's Trainer.step returns). */
static fedtiny_status train_one(const fedtiny_train_job *job, uint32_t i, double *loss)
{
    const int8_t *x = job->samples + (size_t)i * FEDTINY_MODEL_INPUT_BYTES;
    fedtiny_status status;
#if FEDTINY_MODEL_LOSS_MSE
    int64_t squared_error = 0;
    status = fedtiny_model_train_batch(x, job->targets + (size_t)i * FEDTINY_MODEL_OUTPUT_BYTES, 1u, &squared_error);
    /* trainer.mse_loss: s_y * s_y * sum d^2 / K, left to right in double */
    *loss = FEDTINY_MODEL_OUTPUT_SCALE * FEDTINY_MODEL_OUTPUT_SCALE * (double)squared_error /
            (double)FEDTINY_MODEL_OUTPUT_BYTES;
#else
    int32_t label_q15 = 0;
    status = fedtiny_model_train_batch(x, job->labels + i, 1u, &label_q15);
    *loss = (double)fedtiny_cross_entropy_loss_q24(label_q15) / (double)((uint32_t)1 << FEDTINY_LOSS_FRACTION_BITS);
#endif
    return status;
}

/* The first maximum of a model output: its class. */
static uint32_t argmax_first(const int8_t *output)
{
    uint32_t k, best = 0;
    for (k = 1; k < FEDTINY_MODEL_OUTPUT_BYTES; k++) {
        if (output[k] > output[best]) {
            best = k;
        }
    }
    return best;
}

#if !FEDTINY_MODEL_LOSS_MSE
/* Of the samples picked by index[from..to) (every one from `from` on when index is NULL), those the trained model
 * classifies right: argmax of the output (the first maximum) == label. */
static fedtiny_train_job_status count_correct(const fedtiny_train_job *job, const int8_t *samples,
                                              const int32_t *labels, const uint16_t *index, uint32_t from,
                                              uint32_t to, uint32_t *correct, fedtiny_train_result *result)
{
    int8_t output[FEDTINY_MODEL_OUTPUT_BYTES];
    uint32_t i;
    *correct = 0;
    for (i = from; i < to; i++) {
        const uint32_t sample = index != NULL ? index[i] : i;
        if (abandoned(job)) {
            return FEDTINY_TRAIN_JOB_ABANDONED;
        }
        result->model_status = fedtiny_model_predict(samples + (size_t)sample * FEDTINY_MODEL_INPUT_BYTES, output);
        if (result->model_status != FEDTINY_OK) {
            return FEDTINY_TRAIN_JOB_MODEL_ERROR;
        }
        *correct += (uint32_t)(argmax_first(output) == (uint32_t)labels[sample]);
    }
    return FEDTINY_TRAIN_JOB_OK;
}
#endif

fedtiny_train_job_status fedtiny_train_job_run(const fedtiny_train_job *job, uint8_t *state_out,
                                               fedtiny_train_result *result)
{
    fedtiny_train_job_status status = checked(job, state_out, result);
    uint64_t total, done = 0, epoch = 0;
    uint32_t held, n_train;
    double loss_sum = 0.0;
    if (status != FEDTINY_TRAIN_JOB_OK) {
        return status;
    }
    held = fedtiny_heldout_count(job->n);
    n_train = job->n - held;
    total = n_train == 0u ? 0u : (job->steps > 0u ? (uint64_t)job->steps : (uint64_t)job->epochs * n_train);
    result->num_examples = (uint32_t)(total < n_train ? total : n_train);
    result->steps_done = 0;
    result->loss = 0.0;
    result->accuracy = 0.0;
    result->personal_accuracy = -1.0;
    result->model_status = FEDTINY_OK;
    /* what a completed job leaves: each step draws the same number; an abandoned or failed job reports it too,
     * so the node goes on as a Python agent that trained the job to the end and then dropped it */
    result->rng_counter = job->rng_counter + total * (uint64_t)FEDTINY_MODEL_DRAWS_PER_STEP;
    fedtiny_model_load_state(job->base);
    fedtiny_model_set_rng_counter(job->rng_counter);
    while (done < total) { /* consecutive permutations of the train part, the last one cut at `total` */
        uint32_t k;
        split(job, held, job->order);
        shuffle(job->seed, job->round, epoch, n_train, job->order + held);
        for (k = 0; k < n_train && done < total; k++, done++) {
            double loss;
            if (abandoned(job)) {
                return FEDTINY_TRAIN_JOB_ABANDONED;
            }
            result->model_status = train_one(job, job->order[held + k], &loss);
            if (result->model_status != FEDTINY_OK) {
                return FEDTINY_TRAIN_JOB_MODEL_ERROR;
            }
            loss_sum += loss; /* in step order, as arith.mean_loss */
            result->steps_done++;
        }
        epoch++;
    }
    result->loss = total > 0u ? loss_sum / (double)total : 0.0;
    result->rng_counter = fedtiny_model_rng_counter();
#if !FEDTINY_MODEL_LOSS_MSE
    if (job->n > 0u) {
        uint32_t correct;
        split(job, held, job->order);
        status = count_correct(job, job->samples, job->labels, job->order, held, job->n, &correct, result);
        if (status != FEDTINY_TRAIN_JOB_OK) {
            return status;
        }
        result->accuracy = (double)correct / (double)n_train;
        if (job->n_eval == 0u && held > 0u) { /* the personalised model: the global one after this device's
                                               * steps, on what it held out */
            status = count_correct(job, job->samples, job->labels, job->order, 0u, held, &correct, result);
            if (status != FEDTINY_TRAIN_JOB_OK) {
                return status;
            }
            result->personal_accuracy = (double)correct / (double)held;
        }
    }
    if (job->n_eval > 0u) { /* ... or on its evaluation part, when it has one */
        uint32_t correct;
        status = count_correct(job, job->eval_samples, job->eval_labels, NULL, 0u, job->n_eval, &correct, result);
        if (status != FEDTINY_TRAIN_JOB_OK) {
            return status;
        }
        result->personal_accuracy = (double)correct / (double)job->n_eval;
    }
#endif
    fedtiny_model_store_state(state_out);
    return FEDTINY_TRAIN_JOB_OK;
}

fedtiny_status fedtiny_predict_batch(const uint8_t *state, const int8_t *samples, uint32_t n, int8_t *outputs)
{
    uint32_t i;
    if (state == NULL || (n > 0u && (samples == NULL || outputs == NULL))) {
        return FEDTINY_ERR_PARAMS;
    }
    fedtiny_model_load_state(state);
    for (i = 0; i < n; i++) {
        const fedtiny_status status = fedtiny_model_predict(samples + (size_t)i * FEDTINY_MODEL_INPUT_BYTES,
                                                            outputs + (size_t)i * FEDTINY_MODEL_OUTPUT_BYTES);
        if (status != FEDTINY_OK) {
            return status;
        }
    }
    return FEDTINY_OK;
}

fedtiny_status fedtiny_predict_class(const uint8_t *state, const int8_t *sample, uint32_t *predicted)
{
    int8_t output[FEDTINY_MODEL_OUTPUT_BYTES];
    fedtiny_status status;
    if (FEDTINY_MODEL_LOSS_MSE || state == NULL || sample == NULL || predicted == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    fedtiny_model_load_state(state);
    status = fedtiny_model_predict(sample, output);
    if (status == FEDTINY_OK) {
        *predicted = argmax_first(output);
    }
    return status;
}
