/* The node's protocol session: fedtiny/protocol/device.py's DeviceSession in C, one method for one method, so
 * that the conformance transcripts (tests/conformance/) pass byte for byte.
 *
 * Sans-IO like its model: MQTT messages and clock ticks go in, publishes come out through the caller's
 * `publish` callback one frame at a time, and a round to train comes back as a fedtiny_node_job whose result
 * goes in through fedtiny_node_complete. Time is the caller's monotonic clock in integer milliseconds.
 *
 * Everything the node keeps across a power cut is fedtiny_node_state (plain numbers, no pointers) plus four
 * caller buffers: the global state, the error-feedback carry, the sealed upload and the personalised model (the
 * trained state of the last round the node sealed a DELTA for: what it predicts with). Before any frame using a
 * new seq leaves, and wherever device.py persists, the node hands all of it to the caller's `persist` callback
 * (fedtiny_node_persisted), so a restart never reuses a nonce. Portable C99, no malloc, no stdio; every buffer
 * is the caller's (fedtiny_node_sizes says how large).
 *
 * Errors: every function returns FEDTINY_NODE_OK (0), a positive result, or a negative status whose
 * fedtiny_node_reason() is the ProtocolError reason device.py raises for the same input. Statuses of the parts
 * pass through unchanged (envelope -1..-15, chunking -100..-110); the wire's are shifted by -200
 * (FEDTINY_NODE_FROM_WIRE), secure aggregation's by -400 (FEDTINY_NODE_FROM_SECAGG); the node's own are
 * -300..-399. A refused downlink changes nothing that is persisted (it may expire idle chunk transfers, as
 * Python's reassembler does).
 */
#ifndef FEDTINY_NODE_H
#define FEDTINY_NODE_H

#include <stddef.h>
#include <stdint.h>

#include "fedtiny_chunk.h"
#include "fedtiny_envelope.h"
#include "fedtiny_node_secagg.h"
#include "fedtiny_wire.h"

#define FEDTINY_NODE_NAME_MAX 64u /* topics.NAME_PATTERN: 1-64 of [A-Za-z0-9_.-], starting alphanumeric */
#define FEDTINY_NODE_TOPIC_MAX (8u + FEDTINY_NODE_NAME_MAX + 8u + FEDTINY_NODE_NAME_MAX + 1u)
#define FEDTINY_NODE_PLAN_VERSION 1u /* task.PLAN_VERSION, announced in JOIN */
#define FEDTINY_NODE_REASSEMBLY_TTL_MS 600000

typedef enum {
    FEDTINY_NODE_OK = 0,
    FEDTINY_NODE_JOB = 1, /* fedtiny_node_receive / pending_job: *job holds a round to train */
    FEDTINY_NODE_ERR_ARGUMENT = -300, /* a bad name, plan, buffer size or chunk size at init; a job not issued */
    FEDTINY_NODE_ERR_BAD_TOPIC = -301,  /* not this node's downlink or broadcast topic */
    FEDTINY_NODE_ERR_WRONG_TOPIC = -302, /* the header's fleet/device ids do not match the topic */
    FEDTINY_NODE_ERR_OVERSIZED = -303,  /* an envelope longer than the plan's largest downlink */
    FEDTINY_NODE_ERR_PERSIST = -304,    /* the persist callback failed: nothing was sent */
    FEDTINY_NODE_ERR_PUBLISH = -305     /* the publish callback failed: the rest of the call's frames were not
                                           sent; the state is as if they had been (the protocol resends) */
} fedtiny_node_status;

#define FEDTINY_NODE_FROM_WIRE(status) ((status) - 200)
#define FEDTINY_NODE_FROM_SECAGG(status) ((status) - 400) /* fedtiny_secagg statuses: -401 and below */

/* The reason token of any status a node function returns ("bad-signature", "wrong-topic", ...), "ok" for 0. */
const char *fedtiny_node_reason(int status);

/* What the code generator emits for a training plan (fedtiny_device.codegen.node_plan_source). */
typedef struct {
    const fedtiny_wire_plan *wire;
    uint8_t hash[FEDTINY_WIRE_HASH_BYTES]; /* planfile.plan_hash: in JOIN, and every TASK must carry it */
    uint32_t arena_bytes;       /* JOIN memory_budget_bytes: plan.arena_size */
    uint32_t flash_bytes;       /* JOIN flash_budget_bytes: plan.memory_report()["flash_bytes"] */
    uint32_t free_memory_bytes; /* STATUS free_memory_bytes: max(0, budget - reserve - arena_size) */
} fedtiny_node_plan;

/* update.max_downlink_bytes(plan): the largest envelope the node accepts (a FULL_STATE GLOBAL_UPDATE, or a TASK
 * with its largest config); a larger one is refused as FEDTINY_NODE_ERR_OVERSIZED. */
uint32_t fedtiny_node_max_downlink_bytes(const fedtiny_node_plan *plan);

/* ---- persisted state -------------------------------------------------------------------------------------- */

typedef struct {
    uint8_t accepted_any; /* 0: nothing accepted on this stream yet */
    uint16_t run;
    uint32_t round;
    uint32_t seq;
} fedtiny_node_position;

typedef struct {
    uint8_t present;
    uint16_t epochs;
    uint16_t steps;
    uint16_t uplink_keep_pct; /* 1..100 */
    uint32_t round;
    uint32_t model_version;
    float clip_norm;
    float noise_sigma; /* the device's DP noise per element, real units (0: none) */
    uint8_t masked;    /* secure aggregation: the DELTA goes masked (TASK_MASKED) */
} fedtiny_node_task;

/* device.NodeState's numbers. The replay streams keep only their last accepted positions, as
 * ReplayGuard.export does: after a restart an old QoS 1 duplicate reads as stale, still refused. */
typedef struct {
    uint32_t model_version;
    uint32_t round;         /* the highest round seen in the current run */
    uint32_t seq;           /* the next uplink seq: never reused, whatever the run */
    int64_t trained_round;  /* the last round of the current run a DELTA was sealed for; -1: none */
    uint64_t rng_counter;   /* the trainer's random counter */
    uint16_t run;           /* the coordinator's run this node follows */
    fedtiny_node_position replay[2]; /* downlinks addressed to this node, broadcast downlinks */
    fedtiny_node_task pending_task;  /* a TASK received and not answered */
    uint32_t upload_len;    /* bytes of the sealed DELTA in the upload buffer until ACKed; 0: none */
    uint32_t upload_chunk;  /* the chunk size it is sent in */
    uint8_t personal;       /* 1: the personal buffer holds the personalised model (device.NodeState.personal) */
} fedtiny_node_state;

/* The fresh state of a node that never ran: model version 0, run 0, seq 0, nothing pending (the caller puts the
 * plan's initial state in the global state buffer and zeros in the carry). */
void fedtiny_node_state_fresh(fedtiny_node_state *state);

/* What `persist` receives: the state and the three buffers it goes with. */
typedef struct {
    const fedtiny_node_state *state;
    const uint8_t *global_state; /* fedtiny_wire_state_bytes: the model of state->model_version */
    uint32_t global_state_bytes;
    const uint8_t *carry;        /* fedtiny_wire_delta_bytes: the change kept back for the next round */
    uint32_t carry_bytes;
    const uint8_t *upload;       /* state->upload_len bytes (none if 0) */
    const uint8_t *personal;     /* the personalised model, personal_bytes (fedtiny_wire_state_bytes; 0: none) */
    uint32_t personal_bytes;
} fedtiny_node_persisted;

/* ---- callbacks and buffers -------------------------------------------------------------------------------- */

typedef enum {
    FEDTINY_NODE_TOPIC_UP = 0,     /* fedtiny/<fleet>/up/<device>: JOIN, DELTA, ACK, LEAVE */
    FEDTINY_NODE_TOPIC_STATUS = 1, /* fedtiny/<fleet>/status/<device>: heartbeats (retained) */
    FEDTINY_NODE_TOPIC_DOWN = 2,   /* fedtiny/<fleet>/down/<device> */
    FEDTINY_NODE_TOPIC_BCAST = 3   /* fedtiny/<fleet>/bcast */
} fedtiny_node_topic;

/* Publish one frame (QoS 1); nonzero if it could not be handed to the link. */
typedef int (*fedtiny_node_publish_fn)(void *context, fedtiny_node_topic kind, const char *topic,
                                       const uint8_t *frame, size_t length, int retain);
/* Write the persisted state durably; nonzero on failure (the node then sends nothing further in that call). */
typedef int (*fedtiny_node_persist_fn)(void *context, const fedtiny_node_persisted *persisted);

typedef struct {
    uint32_t global_state; /* fedtiny_wire_state_bytes */
    uint32_t carry;        /* fedtiny_wire_delta_bytes */
    uint32_t upload;       /* the largest sealed DELTA (update.max_delta_envelope_bytes) */
    uint32_t reassembly;   /* the largest GLOBAL_UPDATE and TASK envelopes: two downlink transfers
                              (update.downlink_reassembly_bytes) */
    uint32_t bitmap;       /* FEDTINY_CHUNK_BITMAP_BYTES(reassembly) */
    uint32_t frame;        /* chunk_size: one uplink frame */
    uint32_t values;       /* 4 bytes per trainable element: the sent delta while noise is added */
} fedtiny_node_sizes;

void fedtiny_node_sizes_of(const fedtiny_node_plan *plan, uint32_t chunk_size, fedtiny_node_sizes *sizes);
/* The sizes of a node that does secure aggregation: the upload also holds a masked DELTA, the reassembly a
 * SECAGG_PEERS of 64 neighbours behind a TASK (device.py's buffers with peers). */
void fedtiny_node_sizes_secagg_of(const fedtiny_node_plan *plan, uint32_t chunk_size, fedtiny_node_sizes *sizes);

typedef struct {
    const fedtiny_node_plan *plan;
    const char *fleet;  /* names: the topics are built from them once */
    const char *device;
    uint32_t fleet_id;  /* topics.name_id(fleet) and (device), from provisioning (the node has no SHA-256) */
    uint32_t device_id;
    const uint8_t *identity;           /* FEDTINY_ENV_IDENTITY_BYTES: this node's identity.key */
    const uint8_t *coordinator_public; /* FEDTINY_ENV_PUBLIC_BYTES: coordinator.pub */
    uint32_t chunk_size;   /* the MQTT payload size of the node's uplink frames (256 .. 256 KiB) */
    int64_t ack_timeout_ms; /* an upload nobody ACKs within this is sent again (device.py: 15 s) */
    int64_t started_ms;     /* the clock at start: STATUS uptime counts from it */
    /* buffers, at least fedtiny_node_sizes_of's bytes each; global_state, carry and upload hold what was
     * persisted (or the plan's initial state, zeros and nothing) */
    uint8_t *global_state;
    uint8_t *carry;
    uint8_t *upload;
    uint8_t *reassembly;
    uint8_t *bitmap;
    uint8_t *frame;
    /* fedtiny_wire_state_bytes, or NULL: a node whose budget does not hold a personalised model keeps none
     * (Plan.memory_report's personal_model_bytes is 0) and predicts with the global model */
    uint8_t *personal;
    /* fedtiny_wire_elements int32s, or NULL: a node without it refuses a TASK asking for device noise (bad-task) */
    int32_t *values;
    /* secure aggregation (both, and values, or none: a node without them answers a masked TASK with ACK
     * REJECTED, as device.py without peers does): the fleet's public identities, and the round's RAM; the
     * buffers then take fedtiny_node_sizes_secagg_of's sizes */
    const fedtiny_node_peers *peers;
    fedtiny_node_secagg *secagg;
    fedtiny_node_sizes capacity;
    fedtiny_node_publish_fn publish;
    fedtiny_node_persist_fn persist;
    void *context; /* passed to both callbacks */
} fedtiny_node_config;

/* ---- the session ------------------------------------------------------------------------------------------ */

typedef struct {
    fedtiny_node_config config;
    fedtiny_node_state state;
    fedtiny_env_node keys;
    fedtiny_env_replay replay; /* the downlink replay window (positions restored from state.replay) */
    fedtiny_reassembler reassembler;
    uint32_t max_downlink_bytes;
    uint8_t upload_sent;       /* whether the upload went out since start (device.py's _upload_sent_at) */
    int64_t upload_sent_at;
    uint32_t resent_chunks;    /* chunks sent again on a MISSING_CHUNKS ACK */
    char up_topic[FEDTINY_NODE_TOPIC_MAX];
    char status_topic[FEDTINY_NODE_TOPIC_MAX];
    char down_topic[FEDTINY_NODE_TOPIC_MAX];
    char bcast_topic[FEDTINY_NODE_TOPIC_MAX];
} fedtiny_node;

/* A round to train (device.TrainJob without the base: train from the global state as it is when the job is
 * returned; fedtiny_node_complete takes the base back). */
typedef struct {
    uint32_t round;
    uint32_t model_version;
    uint16_t epochs;
    uint16_t steps;
    uint16_t uplink_keep_pct; /* 1..100 */
    float clip_norm;          /* 0: no clipping */
    float noise_sigma;        /* discrete Gaussian noise per element, real units (0: none; fedtiny_noise.h) */
    uint8_t masked;           /* secure aggregation: the DELTA goes masked */
} fedtiny_node_job;

/* What training returns besides the trained state (device.TrainResult). */
typedef struct {
    uint32_t num_examples;
    float loss;
    float accuracy;
    float personal_accuracy; /* on the device's held-out part; negative: it has none (fedtiny_train_result's) */
    uint64_t rng_counter;
} fedtiny_node_result;

/* Start a session over `state` (a persisted one, or fedtiny_node_state_fresh's): derive the keys, build the
 * topics, restore the replay positions. FEDTINY_NODE_ERR_ARGUMENT for a bad name, plan, chunk size or buffer. */
int fedtiny_node_init(fedtiny_node *node, const fedtiny_node_config *config, const fedtiny_node_state *state);
void fedtiny_node_wipe(fedtiny_node *node); /* forget the keys */

const char *fedtiny_node_topic_name(const fedtiny_node *node, fedtiny_node_topic kind);

/* Hand the state to the persist callback now (DeviceSession.persist: e.g. once after start). */
int fedtiny_node_persist(fedtiny_node *node);

/* After every (re)connect: JOIN (unless an upload waits for its ACK) and a heartbeat; an upload not sent since
 * start is sent whole. */
int fedtiny_node_on_connect(fedtiny_node *node, int64_t now_ms);
/* A STATUS heartbeat (retained) in `device_state` (FEDTINY_WIRE_DEVICE_*). */
int fedtiny_node_heartbeat(fedtiny_node *node, int64_t now_ms, uint8_t device_state);
/* The pre-signed OFFLINE status for the broker to publish if the node vanishes (reserves a seq): written to out
 * (the frame buffer size suffices), not published. */
int fedtiny_node_last_will(fedtiny_node *node, int64_t now_ms, uint8_t *out, size_t capacity, size_t *out_len);
int fedtiny_node_leave(fedtiny_node *node);
/* Send the upload again if nobody acknowledged it within ack_timeout_ms. */
int fedtiny_node_tick(fedtiny_node *node, int64_t now_ms);

/* One MQTT message from `topic`. The frame is the caller's and may be decrypted in place. Returns a negative
 * status for anything malformed, forged or replayed (nothing persisted changes), FEDTINY_NODE_JOB with *job
 * filled when a round is ready to train (as DeviceSession.receive returns one: also again for a job in
 * progress), else FEDTINY_NODE_OK. */
int fedtiny_node_receive(fedtiny_node *node, const char *topic, uint8_t *frame, size_t length, int64_t now_ms,
                         fedtiny_node_job *job);

/* A task received before a restart and never answered: FEDTINY_NODE_JOB with *job, or FEDTINY_NODE_OK. */
int fedtiny_node_pending_job(const fedtiny_node *node, fedtiny_node_job *job);
/* Whether a TASK of a later round came after `job`'s (drop it and train the newer one). */
int fedtiny_node_superseded(const fedtiny_node *node, const fedtiny_node_job *job);
/* The node will not answer `job`: the next TASK finds it ready. */
int fedtiny_node_skip(fedtiny_node *node, const fedtiny_node_job *job);
/* A masked job (job->masked): the clipped, noised values wait in config.values until the relay has come, then
 * the masked DELTA is sealed and sent as the upload; the carry is the new one from here (device.py assigns it when
 * the masked DELTA is sealed: the two differ only for a round whose relay never comes).
 * Seal and send the round's DELTA (fedtiny_wire_uplink of trained_state from base_state, the state the job
 * trained from; both in the state layout), and keep trained_state as the personalised model (config.personal),
 * persisted in the same record as the DELTA. For a superseded job nothing is sealed or sent, and the personalised
 * model stays. A caller that takes
 * downlinks while it trains keeps its own copy of the base: a GLOBAL_UPDATE changes the global state. */
int fedtiny_node_complete(fedtiny_node *node, const fedtiny_node_job *job, const uint8_t *base_state,
                          const uint8_t *trained_state, const fedtiny_node_result *result, int64_t now_ms);

/* The trainable state the node predicts with (NodeState.inference_state): the personalised model once it has one,
 * else the global state. A GLOBAL_UPDATE replaces the global state only. */
const uint8_t *fedtiny_node_inference_state(const fedtiny_node *node);

#endif
