/* A round's training on the device: what fedtiny_device.agent.LocalTraining.run computes, bit for bit.
 *
 * On top of the generated model API of a training plan (model.h: fedtiny_model_load_state / _store_state,
 * _train_batch, _predict, _set_rng_counter): load the base state into the arena, train in the round's order,
 * read the trained state back, then run the trained model over every sample for the accuracies.
 *
 *   split      h = fedtiny_heldout_count(n) samples are held out: the first h of fedtiny_training_permutation(seed,
 *              FEDTINY_SPLIT_ROUND, 0, n); the other n - h (in that permutation's order; 0..n-1 when h = 0) are
 *              the train part T. The device's personalised model is the global model after its local steps: it
 *              costs no memory beyond the round's own (it is the arena's state when training ends).
 *   order      epoch e of the round trains T[P[k]], P = fedtiny_training_permutation(seed, round, e, n - h);
 *              `steps` > 0 takes that many steps through consecutive epochs (0, 1, ...), else `epochs` whole
 *              epochs.
 *   loss       the mean of the step losses, summed in step order in double: cross-entropy steps lose
 *              fedtiny_cross_entropy_loss_q24(label_q15) / 2^24, MSE steps s_y^2 * sum (y - t)^2 / K.
 *   accuracy   correct / (n - h) over T, correct = samples whose output's argmax (first maximum) equals the label,
 *              after training; 0.0 for an MSE plan (no classes), which skips that pass.
 *   personal_accuracy  the same over the device's evaluation part: the n_eval samples of eval_samples when it has
 *              them (its machine's held-out windows of every class, what it will meet; never trained on), else
 *              the held-out samples; -1.0 when that part is empty or for an MSE plan. The split above is the same
 *              either way: an evaluation part adds samples to score on and takes none from training.
 *   num_examples  distinct samples trained on: min(total steps, n - h).
 *
 * No malloc, no stdio; the caller gives the permutation's work buffer. poll(context) runs before every step and
 * every accuracy sample; a nonzero return abandons the job (the firmware feeds downlinks to its session there,
 * and a TASK of a later round supersedes the job). The generated model is one static arena: one job at a time.
 */
#ifndef FEDTINY_TRAIN_JOB_H
#define FEDTINY_TRAIN_JOB_H

#include <stdint.h>

#include "model.h"

#define FEDTINY_TRAIN_JOB_MAX_SAMPLES 65535u /* the order's work buffer holds uint16 indexes */

/* agent.HELDOUT_SHARE, HELDOUT_MIN_SAMPLES, SPLIT_ROUND: one sample in 5 held out from 10 samples on; the split's
 * order key takes a round no TASK carries (rounds are u32). */
#define FEDTINY_HELDOUT_SHARE 5u
#define FEDTINY_HELDOUT_MIN_SAMPLES 10u
#define FEDTINY_SPLIT_ROUND 0x100000000ull

typedef enum {
    FEDTINY_TRAIN_JOB_OK = 0,
    FEDTINY_TRAIN_JOB_ABANDONED = 1,   /* poll returned nonzero; the arena holds a partly trained state */
    FEDTINY_TRAIN_JOB_BAD_INPUT = 2,   /* a NULL buffer, n > FEDTINY_TRAIN_JOB_MAX_SAMPLES, a label outside 0..K-1,
                                        * an evaluation part for an MSE plan */
    FEDTINY_TRAIN_JOB_MODEL_ERROR = 3  /* a kernel failed: result->model_status says how */
} fedtiny_train_job_status;

/* Called between steps; returns nonzero to abandon the job. */
typedef int (*fedtiny_train_job_poll)(void *context);

typedef struct {
    uint64_t seed;               /* the node's seed (LocalTraining.seed), keys the order */
    uint32_t round;              /* the TASK's round */
    uint32_t epochs;             /* passes over the samples when steps == 0 */
    uint32_t steps;              /* > 0: this many steps instead */
    uint64_t rng_counter;        /* the node's splitmix64 counter before the job */
    const uint8_t *base;         /* FEDTINY_MODEL_STATE_BYTES: the state to train from (fedtiny_wire's layout) */
    const int8_t *samples;       /* n * FEDTINY_MODEL_INPUT_BYTES, (H, W, C) each */
    const int32_t *labels;       /* cross-entropy plans: n class indexes in 0..FEDTINY_MODEL_OUTPUT_BYTES-1 */
    const int8_t *targets;       /* MSE plans: n * FEDTINY_MODEL_OUTPUT_BYTES, in the output's quantization */
    uint32_t n;
    uint16_t *order;             /* work buffer of n entries (n = 0: may be NULL) */
    fedtiny_train_job_poll poll; /* may be NULL */
    void *poll_context;
    const int8_t *eval_samples;  /* n_eval * FEDTINY_MODEL_INPUT_BYTES: the evaluation part (n_eval = 0: may be NULL) */
    const int32_t *eval_labels;  /* n_eval class indexes in 0..FEDTINY_MODEL_OUTPUT_BYTES-1 */
    uint32_t n_eval;             /* > 0: personal_accuracy is scored on these, not on the held-out samples */
} fedtiny_train_job;

typedef struct {
    uint32_t num_examples;
    uint32_t steps_done;         /* steps trained (all of them unless abandoned or failed) */
    double loss;                 /* float32 on the wire (DELTA.train_loss) */
    double accuracy;             /* float32 on the wire (metric channel 0); on the train part */
    double personal_accuracy;    /* on the held-out part, float32 on the wire (metric channel 1); -1.0: none */
    uint64_t rng_counter;        /* the node's counter after the job, persist it (also when the job was abandoned
                                  * or failed: the counter a completed job leaves, steps x FEDTINY_MODEL_DRAWS_PER_STEP
                                  * on, as LocalTraining finishes a job that DeviceSession then drops) */
    fedtiny_status model_status; /* FEDTINY_OK unless FEDTINY_TRAIN_JOB_MODEL_ERROR */
} fedtiny_train_result;

/* Epoch `epoch`'s order of n samples: Fisher-Yates from the identity, for i = n-1 down to 1 swapping entry i with
 * entry fedtiny_uniform_below(i + 1), drawing from the splitmix64 stream after fedtiny_order_key(seed, round,
 * epoch). agent.training_permutation in Python. */
void fedtiny_training_permutation(uint64_t seed, uint64_t round, uint64_t epoch, uint32_t n, uint16_t *order);

/* Samples a device of n holds out: n / FEDTINY_HELDOUT_SHARE from FEDTINY_HELDOUT_MIN_SAMPLES on, else 0. */
uint32_t fedtiny_heldout_count(uint32_t n);

/* Run the job; the trained state goes to state_out (FEDTINY_MODEL_STATE_BYTES, may be job->base: it is read
 * first) only when the job completes (FEDTINY_TRAIN_JOB_OK). On FEDTINY_TRAIN_JOB_BAD_INPUT nothing is written. */
fedtiny_train_job_status fedtiny_train_job_run(const fedtiny_train_job *job, uint8_t *state_out,
                                               fedtiny_train_result *result);

/* The model with `state` (FEDTINY_MODEL_STATE_BYTES, fedtiny_wire's layout) over n samples (n *
 * FEDTINY_MODEL_INPUT_BYTES): n * FEDTINY_MODEL_OUTPUT_BYTES int8 outputs, each fedtiny_model_predict's. The host
 * calls it for held-out evaluation (one call per batch instead of one per sample). It loads `state` into the
 * arena: a job after it loads its own base first (fedtiny_train_job_run does). */
fedtiny_status fedtiny_predict_batch(const uint8_t *state, const int8_t *samples, uint32_t n, int8_t *outputs);

/* The class the model with `state` predicts for one sample: the argmax of fedtiny_model_predict's output, the first
 * maximum winning (agent.classes). It loads `state` into the arena, as fedtiny_predict_batch does.
 * FEDTINY_ERR_PARAMS for an MSE plan, which has no classes. */
fedtiny_status fedtiny_predict_class(const uint8_t *state, const int8_t *sample, uint32_t *predicted);

#endif /* FEDTINY_TRAIN_JOB_H */
