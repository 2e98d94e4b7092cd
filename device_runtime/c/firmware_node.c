/* The fedtiny node: the firmware of one fleet member (QEMU mps2-an386, Cortex-M4F), built from the project
 * `fedtiny codegen PLAN --node --fleet-dir DIR --device NAME` writes.
 *
 *     session   fedtiny_node.c      the protocol (DeviceSession in C): every byte that leaves, every check
 *     crypto    fedtiny_envelope.c  + Monocypher: keys, seal, open
 *     training  fedtiny_train_job.c + model.c: a round's training on the samples in flash
 *     state     fedtiny_store.c     two flash banks; a reset at any instruction resumes without reusing a seq
 *     link      fedtiny_modem.c     framed commands to a modem with its own MQTT client, over UART1
 *
 * One loop, no threads, no heap: take the modem's events (connect, subscribe, deliveries), hand deliveries to
 * the session, train when the session returns a job (taking deliveries between steps, so a TASK of a later
 * round supersedes the job), heartbeat, resend. Everything the node knows is in the session; the modem sees
 * only sealed, chunked envelopes. Lines on the console (semihosting) say what happened, for the host that runs
 * the node and for a person reading along.
 *
 * The memory: every buffer is static, sized at build time (node_config.h, model.h), and lives as long as said:
 *
 *     arena (model.c)    the training arena: the trainable rows and every tensor of a step, while a job trains;
 *                        from the DELTA's sealing until its ACK (or a newer run drops it), the sealed upload,
 *                        which the session resends from there and persists with every record. The two never
 *                        meet: the session returns no job while an upload waits, and a job loads its base
 *                        into the arena first. A plan whose largest sealed DELTA exceeds the arena gets a
 *                        buffer of its own (upload_own).
 *     scratch (model.c)  the C kernels' scratch, inside each kernel call; from the end of a job's training to
 *                        the DELTA's sealing, the trained state (trained_own if the state does not fit).
 *     global_state       the model of the version the node holds: always (persisted with every record).
 *     carry              the change kept back for the next round (error feedback): always (persisted).
 *     personal           the personalised model (the trained state of the last round the node sealed a DELTA
 *                        for), what node_predict uses once the node has one: always (persisted); absent where the
 *                        plan's budget does not hold it (FEDTINY_NODE_CFG_PERSONAL_BYTES 0).
 *     base               the state a job trains from, from the job's start to its DELTA: a GLOBAL_UPDATE that
 *                        comes meanwhile changes global_state, not the job's starting point.
 *     reassembly, bitmap downlinks being put together (two transfers: a TASK behind the largest
 *                        GLOBAL_UPDATE, FULL_STATE at most), and the complete envelope until it is handled.
 *     frame              one uplink chunk frame, from its sealing to its publish.
 *     rx_buf, tx_buf     one modem frame each way.
 *     order              the training order of the samples, during a job.
 *     values             (a node built with noise or secure aggregation, FEDTINY_NODE_CFG_VALUES_ELEMENTS) the
 *                        sent delta as int32 from the end of a job's training to its DELTA's sealing, while the
 *                        device's noise is added; in a masked round until the relay has come and it is masked.
 *     secagg             (FEDTINY_NODE_CFG_SECAGG) one secure-aggregation round: its secrets, the neighbours' keys
 *                        and shares, the stage reply being sent. All but the stage reply is persisted in a store
 *                        of its own (round_store) when the round changes, a few times a round, not with every
 *                        record: a node reset mid-round still answers its later stages (a reset after masking
 *                        still reveals the shares it holds: in a small cohort the round needs them), as device.py
 *                        does. Trained values waiting for the relay are not kept: the task is trained again. The
 *                        peers' identities are in flash (node_config.c, from the device folder's peers.json).
 *     boot_state         the persisted numbers, from the restore until fedtiny_node_init copies them.
 *     stack, heap        fedtiny_node.ld's 8 KB stack (crypto and the session's calls), newlib's 4 KB heap.
 *
 * tests/test_node_memory.py builds this firmware for the default plan and for `full` on the default model and
 * holds both to 256 KB of RAM and 1 MB of flash by the linker. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fedtiny_boot.h"
#include "fedtiny_flash_semihost.h"
#include "fedtiny_modem.h"
#include "fedtiny_node.h"
#include "fedtiny_profile.h"
#include "fedtiny_store.h"
#include "fedtiny_train_job.h"
#include "fedtiny_uart_cmsdk.h"
#include "model.h"
#include "node_config.h"

#include "fedtiny_samples.h"

#define MODEM_BAUD 115200u
#define MODEM_MAX_TOPIC FEDTINY_NODE_TOPIC_MAX
/* One modem frame carries one chunk frame of the largest size either side uses, with its topic. */
#define MODEM_PAYLOAD (FEDTINY_NODE_CFG_CHUNK_BYTES > FEDTINY_NODE_CFG_DOWN_CHUNK_BYTES \
                       ? FEDTINY_NODE_CFG_CHUNK_BYTES : FEDTINY_NODE_CFG_DOWN_CHUNK_BYTES)
#define MODEM_FRAME FEDTINY_MODEM_FRAME_BYTES(FEDTINY_MODEM_PUBLISH_BODY(MODEM_MAX_TOPIC, MODEM_PAYLOAD))

/* ---- the node's memory: every buffer, sized at build time ------------------------------------------------- */

static fedtiny_node node;
static fedtiny_node_state boot_state;
static uint8_t global_state[FEDTINY_NODE_CFG_STATE_BYTES];
static uint8_t carry[FEDTINY_NODE_CFG_DELTA_BYTES];
static uint8_t reassembly[FEDTINY_NODE_CFG_REASSEMBLY_BYTES];
static uint8_t bitmap[FEDTINY_NODE_CFG_BITMAP_BYTES];
static uint8_t frame[FEDTINY_NODE_CFG_CHUNK_BYTES];
static uint8_t base[FEDTINY_NODE_CFG_STATE_BYTES]; /* the state a job trains from (a GLOBAL_UPDATE may come) */
static uint16_t order[FEDTINY_NODE_CFG_MAX_SAMPLES > 0 ? FEDTINY_NODE_CFG_MAX_SAMPLES : 1];
#if FEDTINY_NODE_CFG_VALUES_ELEMENTS > 0
static int32_t values[FEDTINY_NODE_CFG_VALUES_ELEMENTS];
#define VALUES values
#else
#define VALUES NULL
#endif
#if FEDTINY_NODE_CFG_SECAGG
static fedtiny_node_secagg secagg;
#define SECAGG (&secagg)
#define PEERS (&fedtiny_node_peers_config)
#else
#define SECAGG NULL
#define PEERS NULL
#endif
#if FEDTINY_NODE_CFG_PERSONAL_BYTES > 0
static uint8_t personal[FEDTINY_NODE_CFG_PERSONAL_BYTES];
#define PERSONAL personal
#else
#define PERSONAL NULL
#endif

/* The sealed upload in the arena, the trained state in the scratch (see the top of this file). */
#if FEDTINY_NODE_CFG_UPLOAD_BYTES <= FEDTINY_MODEL_ARENA_BYTES
#define UPLOAD fedtiny_model_arena()
#else
static uint8_t upload_own[FEDTINY_NODE_CFG_UPLOAD_BYTES];
#define UPLOAD upload_own
#endif
#if FEDTINY_NODE_CFG_STATE_BYTES <= FEDTINY_MODEL_SCRATCH_BYTES
#define TRAINED fedtiny_model_scratch()
#else
static uint8_t trained_own[FEDTINY_NODE_CFG_STATE_BYTES];
#define TRAINED trained_own
#endif

static fedtiny_store store;
static fedtiny_flash_semihost flash;
#if FEDTINY_NODE_CFG_SECAGG
/* The round held (FEDTINY_NODE_SECAGG_RECORD_BYTES of secagg), in two banks of its own flash: saved when
 * secagg.changes moves, before the node's record of the same call (the round never lags a record that sent one of
 * its stage replies); round_saved is the changes count on flash. */
static fedtiny_store round_store;
static fedtiny_flash_semihost round_flash;
static uint16_t round_saved;
#endif

static fedtiny_uart uart;
static uint8_t rx_buf[MODEM_FRAME];
static uint8_t tx_buf[MODEM_FRAME];

/* ---- the link and the rounds' state ----------------------------------------------------------------------- */

static fedtiny_modem_link link;
static fedtiny_node_job job, running;
static int job_ready, training;
static uint32_t rounds_done, refused;

static int64_t now_ms(void)
{
    return (int64_t)fedtiny_clock_ms();
}

static void uart_write(void *context, const uint8_t *data, size_t n)
{
    fedtiny_uart_write((fedtiny_uart *)context, data, n);
}

/* ---- the session's callbacks ------------------------------------------------------------------------------ */

static int publish(void *context, fedtiny_node_topic kind, const char *name, const uint8_t *data, size_t length,
                   int retain)
{
    (void)context;
    (void)kind;
    /* -1 while the link is down: the session resends what the coordinator does not acknowledge */
    return fedtiny_modem_link_publish(&link, name, (uint8_t)(retain ? 1 : 0), data, length) == 0 ? 0 : -1;
}

/* The record: the plan's hash (a firmware of another plan must not read this state as its own), the state's
 * numbers, the global model, the carry, the sealed upload and the personalised model (empty until the first);
 * with secure aggregation, first the round held if it changed since its last save. */
#define RECORD_SEGMENTS 6u
static int persist(void *context, const fedtiny_node_persisted *p)
{
    fedtiny_store_segment segments[RECORD_SEGMENTS];
    int status;
    (void)context;
#if FEDTINY_NODE_CFG_SECAGG
    if (secagg.active && secagg.changes != round_saved) {
        segments[0].data = &secagg;
        segments[0].length = FEDTINY_NODE_SECAGG_RECORD_BYTES;
        status = fedtiny_store_save(&round_store, segments, 1u);
        if (status != FEDTINY_STORE_OK) {
            printf("node: saving the secure-aggregation round failed: %s\n", fedtiny_store_reason(status));
            return status;
        }
        round_saved = secagg.changes;
    }
#endif
    segments[0].data = fedtiny_node_plan_config.hash;
    segments[0].length = sizeof fedtiny_node_plan_config.hash;
    segments[1].data = p->state;
    segments[1].length = sizeof *p->state;
    segments[2].data = p->global_state;
    segments[2].length = p->global_state_bytes;
    segments[3].data = p->carry;
    segments[3].length = p->carry_bytes;
    segments[4].data = p->upload;
    segments[4].length = p->state->upload_len;
    segments[5].data = p->personal;
    segments[5].length = p->personal_bytes;
    status = fedtiny_store_save(&store, segments, RECORD_SEGMENTS);
    if (status != FEDTINY_STORE_OK) {
        printf("node: saving the state failed: %s\n", fedtiny_store_reason(status));
    }
    return status;
}

/* ---- the link's callbacks --------------------------------------------------------------------------------- */

/* A fresh OFFLINE status for each connection's last will (it reserves a seq of its own). */
static int will(void *context, uint32_t now, uint8_t *out, size_t cap, size_t *len)
{
    int status;
    (void)context;
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_PROTOCOL);
    status = fedtiny_node_last_will(&node, (int64_t)now, out, cap, len);
    FEDTINY_PROFILE_LEAVE();
    return status == FEDTINY_NODE_OK ? 0 : -1;
}

static void take_job(int status, const fedtiny_node_job *offered)
{
    if (status != FEDTINY_NODE_JOB) {
        return;
    }
    if (training && offered->round == running.round) {
        return; /* the job in progress, returned again with another downlink */
    }
    job = *offered;
    job_ready = 1;
}

static uint32_t masked_round; /* the round whose masked DELTA waits for the neighbours' shares (0: none) */
static const void *stack_base; /* a local of main: the stack was painted below it at start */

/* A line each time the stack has gone deeper below main's frame than ever since the start (fedtiny_node.ld gives it
 * 8 KB): after each downlink handled and each round trained, so a power cut loses no more than the last. */
static void report_stack(void)
{
    static uint32_t reported;
    const uint32_t peak = fedtiny_stack_peak(stack_base);
    if (peak > reported) {
        reported = peak;
        printf("node: stack peak %lu B below main\n", (unsigned long)peak);
    }
}

static void masked_sent(void)
{
    rounds_done++;
    printf("node: round %lu sent, masked, seq %lu\n", (unsigned long)masked_round, (unsigned long)node.state.seq);
    masked_round = 0u;
    fedtiny_profile_dump(); /* the host's instruction counts per part, up to this round's DELTA */
}

static void up(void *context, uint32_t now)
{
    fedtiny_node_job pending;
    int status;
    (void)context;
    printf("node: connected\n");
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_PROTOCOL);
    fedtiny_node_on_connect(&node, (int64_t)now);
    status = fedtiny_node_pending_job(&node, &pending);
    FEDTINY_PROFILE_LEAVE();
    take_job(status, &pending);
}

static void message(void *context, const uint8_t *name, uint32_t name_len, uint8_t *payload, uint32_t len,
                    uint32_t now)
{
    static char topic[FEDTINY_NODE_TOPIC_MAX + 1];
    fedtiny_node_job offered;
    const uint32_t waiting = node.state.upload_len; /* 0: no sealed upload before this downlink */
    int status;
    (void)context;
    if (name_len > FEDTINY_NODE_TOPIC_MAX) {
        name_len = FEDTINY_NODE_TOPIC_MAX; /* longer than any topic of this node: refused as bad-topic below */
    }
    memcpy(topic, name, name_len);
    topic[name_len] = '\0';
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_PROTOCOL);
    status = fedtiny_node_receive(&node, topic, payload, len, (int64_t)now, &offered);
    FEDTINY_PROFILE_LEAVE();
    if (status < 0) {
        refused++;
        printf("node: refused a downlink on %s: %s\n", topic, fedtiny_node_reason(status));
    }
    if (waiting == 0u && node.state.upload_len != 0u) { /* the relay came: a trained round's masked DELTA left */
        masked_sent();
    }
    report_stack();
    take_job(status, &offered);
}

/* Take what the UART has; the link handles every frame it completes and its timers. */
static void poll_modem(void)
{
    uint8_t bytes[64];
    size_t got = fedtiny_uart_read(&uart, bytes, sizeof bytes, NULL);
    fedtiny_modem_link_poll(&link, bytes, got, fedtiny_clock_ms());
}

/* Between training steps: take downlinks; abandon the job once a later TASK superseded it. */
static int poll_during_training(void *context)
{
    int superseded;
    (void)context;
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_IDLE);
    poll_modem();
    FEDTINY_PROFILE_LEAVE();
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_PROTOCOL);
    superseded = fedtiny_node_superseded(&node, &running);
    FEDTINY_PROFILE_LEAVE();
    return superseded;
}

/* ---- inference between rounds ----------------------------------------------------------------------------- */

/* The classes the node predicts for n samples (FEDTINY_MODEL_INPUT_BYTES each): by its personalised model once it
 * has one, else by the global model (fedtiny_node_inference_state; agent.predict in Python). Not while a job
 * trains: it runs in the training arena. A sealed upload waiting there for its ACK is read back from the newest
 * record afterwards (every record holds it), so predicting costs no RAM of its own. Returns 0, or -1 if the model
 * or the flash failed (then the upload is resent from the record at the next start). */
static int node_predict(const int8_t *samples, uint32_t n, uint32_t *predicted)
{
    int status = 0;
    uint32_t i;
    for (i = 0; i < n && status == 0; i++) {
        if (fedtiny_predict_class(fedtiny_node_inference_state(&node), samples + (size_t)i * FEDTINY_MODEL_INPUT_BYTES,
                                  &predicted[i]) != FEDTINY_OK) {
            status = -1;
        }
    }
#if FEDTINY_NODE_CFG_UPLOAD_BYTES <= FEDTINY_MODEL_ARENA_BYTES
    if (node.state.upload_len != 0u) {
        fedtiny_store_buffer buffers[RECORD_SEGMENTS];
        memset(buffers, 0, sizeof buffers); /* data NULL: CRC-checked in flash, not copied */
        buffers[4].data = UPLOAD;
        buffers[4].capacity = FEDTINY_NODE_CFG_UPLOAD_BYTES;
        if (fedtiny_store_load(&store, buffers, RECORD_SEGMENTS) != FEDTINY_STORE_OK ||
            buffers[4].length != node.state.upload_len) {
            status = -1;
        }
    }
#endif
    return status;
}

/* What the node predicts now for its first samples, and with which model: one line for the console (the tests read
 * it and predict the same in Python from the same persisted state). */
#define REPORT_SAMPLES 16u
static void report_prediction(void)
{
    uint32_t predicted[REPORT_SAMPLES], i;
    const uint32_t n = fedtiny_n_samples < REPORT_SAMPLES ? fedtiny_n_samples : REPORT_SAMPLES;
    int status;
    if (n == 0u || FEDTINY_MODEL_LOSS_MSE) {
        return;
    }
    /* counted as idle: a round's figures (bench_node.py) are the round's, and a plant predicts at its own pace */
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_IDLE);
    status = node_predict(fedtiny_samples, n, predicted);
    FEDTINY_PROFILE_LEAVE();
    if (status != 0) {
        printf("node: predicting failed\n");
        return;
    }
    printf("node: predicts classes");
    for (i = 0; i < n; i++) {
        printf(" %lu", (unsigned long)predicted[i]);
    }
    printf(" for samples 0..%lu with the %s model\n", (unsigned long)(n - 1u),
           node.state.personal ? "personalised" : "global");
}

/* ---- a round ---------------------------------------------------------------------------------------------- */

static void train(void)
{
    fedtiny_train_job params;
    fedtiny_train_result result;
    fedtiny_node_result done;
    int status;
    running = job;
    job_ready = 0;
    training = 1;
    memcpy(base, global_state, sizeof base);
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_PROTOCOL);
    fedtiny_node_heartbeat(&node, now_ms(), FEDTINY_WIRE_DEVICE_TRAINING);
    FEDTINY_PROFILE_LEAVE();
    memset(&params, 0, sizeof params);
    params.seed = fedtiny_train_seed;
    params.round = running.round;
    params.epochs = running.epochs;
    params.steps = running.steps;
    params.rng_counter = node.state.rng_counter;
    params.base = base;
    params.samples = fedtiny_samples;
#if FEDTINY_MODEL_LOSS_MSE
    params.targets = fedtiny_targets;
#else
    params.labels = fedtiny_labels;
#endif
    params.n = fedtiny_n_samples;
    params.order = order;
    params.poll = poll_during_training;
    params.eval_samples = fedtiny_eval_samples;
    params.eval_labels = fedtiny_eval_labels;
    params.n_eval = fedtiny_n_eval_samples;
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_TRAINING);
    status = fedtiny_train_job_run(&params, TRAINED, &result);
    FEDTINY_PROFILE_LEAVE();
    training = 0;
    if (status == FEDTINY_TRAIN_JOB_ABANDONED) {
        printf("node: round %lu superseded\n", (unsigned long)running.round);
        return; /* the newer job is in `job` */
    }
    if (status != FEDTINY_TRAIN_JOB_OK) {
        printf("node: round %lu failed to train (status %d, model %d)\n", (unsigned long)running.round, status,
               (int)result.model_status);
        FEDTINY_PROFILE_ENTER(FEDTINY_PART_PROTOCOL);
        fedtiny_node_skip(&node, &running);
        FEDTINY_PROFILE_LEAVE();
        return;
    }
    done.num_examples = result.num_examples;
    done.loss = (float)result.loss;
    done.accuracy = (float)result.accuracy;
    done.personal_accuracy = (float)result.personal_accuracy;
    done.rng_counter = result.rng_counter;
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_PROTOCOL);
    status = fedtiny_node_complete(&node, &running, base, TRAINED, &done, now_ms());
    FEDTINY_PROFILE_LEAVE();
    if (status < 0) {
        printf("node: round %lu: %s\n", (unsigned long)running.round, fedtiny_node_reason(status));
        return;
    }
    printf("node: round %lu trained, loss %ld.%06ld\n", (unsigned long)running.round, (long)result.loss,
           (long)((result.loss - (long)result.loss) * 1e6));
    if (running.masked) {
        masked_round = running.round;
        if (node.state.upload_len != 0u) {
            masked_sent(); /* the relay had come while it trained */
        } else if (node.state.trained_round == (int64_t)running.round) {
            printf("node: round %lu dropped: not the secure-aggregation round this node holds\n",
                   (unsigned long)running.round); /* fedtiny_node_complete skipped it */
        } else {
            printf("node: round %lu waits for its neighbours' shares to mask its DELTA\n",
                   (unsigned long)running.round);
        }
    } else {
        rounds_done++;
        printf("node: round %lu sent, seq %lu\n", (unsigned long)running.round, (unsigned long)node.state.seq);
        fedtiny_profile_dump(); /* the host's instruction counts per part, up to this round's DELTA */
    }
    report_stack();
    report_prediction(); /* with the model this round left, while its DELTA waits for the ACK in the arena */
}

/* ---- start-up --------------------------------------------------------------------------------------------- */

#if FEDTINY_NODE_CFG_SECAGG
/* The round held at the reset, if any (load 0: a node with fresh state holds none). A lost round record (decayed)
 * makes the node a dropout of that round: it answers none of its later stages, and its pending masked task is
 * skipped (fedtiny_node_complete), so no second masked DELTA can leave for it; a sealed one is resent from the
 * node's record as it was. */
static int restore_round(int load)
{
    fedtiny_store_buffer buffer;
    int status;
    if (fedtiny_flash_semihost_open(&round_flash, FEDTINY_NODE_CFG_ROUND_FLASH_FILE, FEDTINY_NODE_CFG_ROUND_BANK_BYTES,
                                    2u, 8u) != 0) {
        printf("node: no flash image at %s\n", FEDTINY_NODE_CFG_ROUND_FLASH_FILE);
        return -1;
    }
    status = fedtiny_store_open(&round_store, &round_flash.flash, NULL);
    if (status == FEDTINY_STORE_OK && load) {
        buffer.data = &secagg;
        buffer.capacity = FEDTINY_NODE_SECAGG_RECORD_BYTES;
        status = fedtiny_store_load(&round_store, &buffer, 1u);
        if (status == FEDTINY_STORE_OK) {
            status = fedtiny_node_secagg_restore(&secagg, (const uint8_t *)&secagg, buffer.length);
        }
    }
    if (!load) {
        return status == FEDTINY_STORE_OK || status == FEDTINY_STORE_EMPTY || status == FEDTINY_STORE_LOST ? 0 : -1;
    }
    if (status == FEDTINY_STORE_OK && secagg.active) {
        round_saved = secagg.changes;
        printf("node: restored secure-aggregation round %lu\n", (unsigned long)secagg.secrets.ctx.round);
    } else if (status != FEDTINY_STORE_OK && status != FEDTINY_STORE_EMPTY) {
        fedtiny_node_secagg_restore(&secagg, NULL, 0u);
        printf("node: the secure-aggregation round held is %s: a dropout of it\n", fedtiny_store_reason(status));
    }
    return 0;
}
#endif

/* The persisted state, or a fresh one for a node that never saved. A node whose state is lost must not run:
 * it would reuse sequence numbers, and so nonces, under its keys. */
static int restore(void)
{
    static uint8_t hash[sizeof fedtiny_node_plan_config.hash];
    fedtiny_store_buffer buffers[RECORD_SEGMENTS];
    int status;
    if (fedtiny_flash_semihost_open(&flash, FEDTINY_NODE_CFG_FLASH_FILE, FEDTINY_NODE_CFG_BANK_BYTES, 2u, 8u) != 0) {
        printf("node: no flash image at %s\n", FEDTINY_NODE_CFG_FLASH_FILE);
        return -1;
    }
    status = fedtiny_store_open(&store, &flash.flash, NULL);
    if (status == FEDTINY_STORE_EMPTY) {
        fedtiny_node_state_fresh(&boot_state);
        fedtiny_model_train_init(fedtiny_train_seed); /* the plan's initial rows and the node's random counter */
        fedtiny_model_store_state(global_state);
        boot_state.rng_counter = fedtiny_model_rng_counter();
        memset(carry, 0, sizeof carry);
        printf("node: fresh state\n");
#if FEDTINY_NODE_CFG_SECAGG
        return restore_round(0);
#else
        return 0;
#endif
    }
    if (status != FEDTINY_STORE_OK) {
        printf("node: the persisted state is %s: this node cannot know which seqs it used; provision it again "
               "(fedtiny keys --out FLEET --rotate %s) and erase its flash\n", fedtiny_store_reason(status),
               fedtiny_node_device);
        return -1;
    }
    buffers[0].data = hash;
    buffers[0].capacity = sizeof hash;
    buffers[1].data = &boot_state;
    buffers[1].capacity = sizeof boot_state;
    buffers[2].data = global_state;
    buffers[2].capacity = sizeof global_state;
    buffers[3].data = carry;
    buffers[3].capacity = sizeof carry;
    buffers[4].data = UPLOAD; /* the arena is free at boot */
    buffers[4].capacity = FEDTINY_NODE_CFG_UPLOAD_BYTES;
    buffers[5].data = PERSONAL;
    buffers[5].capacity = FEDTINY_NODE_CFG_PERSONAL_BYTES;
    status = fedtiny_store_load(&store, buffers, RECORD_SEGMENTS);
    if (status != FEDTINY_STORE_OK || buffers[0].length != sizeof hash
        || memcmp(hash, fedtiny_node_plan_config.hash, sizeof hash) != 0 || buffers[1].length != sizeof boot_state
        || buffers[2].length != sizeof global_state || buffers[3].length != sizeof carry
        || buffers[4].length != boot_state.upload_len
        || buffers[5].length != (boot_state.personal ? (uint32_t)FEDTINY_NODE_CFG_PERSONAL_BYTES : 0u)) {
        printf("node: the persisted state is for another firmware or plan (%s)\n", fedtiny_store_reason(status));
        return -1;
    }
#if FEDTINY_NODE_CFG_SECAGG
    if (restore_round(1) != 0) {
        return -1;
    }
#endif
    /* One seq more than the record says: if the newest record decayed and this is the bank before it, the seq
     * that newer record reserved may have been used (every save reserves at most one seq beyond the one before). */
    boot_state.seq++;
    printf("node: restored: model version %lu, seq %lu, run %u\n", (unsigned long)boot_state.model_version,
           (unsigned long)boot_state.seq, (unsigned)boot_state.run);
    return 0;
}

static int start_link(void)
{
    fedtiny_modem_link_config config;
    fedtiny_modem_link_callbacks callbacks;
    memset(&config, 0, sizeof config);
    memset(&callbacks, 0, sizeof callbacks);
    callbacks.context = &uart;
    callbacks.write = uart_write;
    callbacks.will = will;
    callbacks.up = up;
    callbacks.message = message;
    config.client_id = fedtiny_node_device;
    config.will_topic = fedtiny_node_topic_name(&node, FEDTINY_NODE_TOPIC_STATUS);
    config.will_retain = 1u;
    config.clean_session = 0u; /* QoS 1 downlinks wait at the broker while the node is away */
    config.keepalive_s = 30u;
    config.subscriptions[0] = fedtiny_node_topic_name(&node, FEDTINY_NODE_TOPIC_DOWN);
    config.subscriptions[1] = fedtiny_node_topic_name(&node, FEDTINY_NODE_TOPIC_BCAST);
    config.n_subscriptions = 2u;
    config.min_payload = MODEM_PAYLOAD;
    config.hello_ms = 500u;
    config.retry_ms = 1000u;
    config.connect_timeout_ms = 10000u;
    config.idle_ms = 1000u;
    config.rx = rx_buf;
    config.rx_cap = sizeof rx_buf;
    config.tx = tx_buf;
    config.tx_cap = sizeof tx_buf;
    if (fedtiny_modem_link_init(&link, &config, &callbacks, fedtiny_clock_ms()) != 0) {
        printf("node: the modem link does not take this configuration\n");
        return -1;
    }
    return 0;
}

int main(void)
{
    uint8_t base; /* the stack below main's frame is painted, its peak reported after each DELTA */
    fedtiny_node_config config;
    uint32_t next_beat;
    int status;
    fedtiny_stack_paint();
    stack_base = &base;
    if (restore() != 0) {
        return 2;
    }
    memset(&config, 0, sizeof config);
    config.plan = &fedtiny_node_plan_config;
    config.fleet = fedtiny_node_fleet;
    config.device = fedtiny_node_device;
    config.fleet_id = fedtiny_node_fleet_id;
    config.device_id = fedtiny_node_device_id;
    config.identity = fedtiny_node_identity;
    config.coordinator_public = fedtiny_node_coordinator_public;
    config.chunk_size = FEDTINY_NODE_CFG_CHUNK_BYTES;
    config.ack_timeout_ms = FEDTINY_NODE_CFG_ACK_TIMEOUT_MS;
    config.started_ms = now_ms();
    config.global_state = global_state;
    config.carry = carry;
    config.upload = UPLOAD;
    config.reassembly = reassembly;
    config.bitmap = bitmap;
    config.frame = frame;
    config.personal = PERSONAL;
    config.capacity.global_state = sizeof global_state;
    config.capacity.carry = sizeof carry;
    config.capacity.upload = FEDTINY_NODE_CFG_UPLOAD_BYTES;
    config.capacity.reassembly = sizeof reassembly;
    config.capacity.bitmap = sizeof bitmap;
    config.capacity.frame = sizeof frame;
    config.values = VALUES;
    config.capacity.values = 4u * FEDTINY_NODE_CFG_VALUES_ELEMENTS;
    config.peers = PEERS;
    config.secagg = SECAGG;
    config.publish = publish;
    config.persist = persist;
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_PROTOCOL);
    status = fedtiny_node_init(&node, &config, &boot_state);
    FEDTINY_PROFILE_LEAVE();
    if (status != FEDTINY_NODE_OK) {
        printf("node: init failed: %s\n", fedtiny_node_reason(status));
        return 2;
    }
    printf("node: %s of fleet %s, %lu samples\n", fedtiny_node_device, fedtiny_node_fleet,
           (unsigned long)fedtiny_n_samples);
    report_prediction();
    fedtiny_uart_init(&uart, FEDTINY_MPS2_UART1, FEDTINY_MPS2_SYSCLK_HZ, MODEM_BAUD);
    if (start_link() != 0) {
        return 2;
    }
    next_beat = fedtiny_clock_ms() + FEDTINY_NODE_CFG_HEARTBEAT_MS;
    for (;;) {
        uint32_t now;
        poll_modem();
        if (link.state == FEDTINY_MODEM_LINK_FAILED) {
            printf("node: the modem cannot carry this node (its payload limit is %u bytes)\n",
                   (unsigned)link.max_payload);
            return 2;
        }
        if (job_ready) {
            train();
            continue;
        }
        now = fedtiny_clock_ms();
        FEDTINY_PROFILE_ENTER(FEDTINY_PART_PROTOCOL);
        if (link.state == FEDTINY_MODEM_LINK_UP && (int32_t)(now - next_beat) >= 0) {
            fedtiny_node_heartbeat(&node, (int64_t)now, FEDTINY_WIRE_DEVICE_IDLE);
            next_beat = now + FEDTINY_NODE_CFG_HEARTBEAT_MS;
        }
        fedtiny_node_tick(&node, (int64_t)now);
        FEDTINY_PROFILE_LEAVE();
    }
}
