/* The node's message bodies and model updates (docs/protocol.md), byte for byte what fedtiny/protocol/
 * messages.py, task.py, delta.py and update.py write and read:
 *
 *     JOIN, STATUS, LEAVE, ACK         encoded (fixed little-endian layouts, reserved fields zero)
 *     TASK (+ task_settings), ACK      decoded with messages.py's exact size and reserved-field checks
 *     GLOBAL_UPDATE                    checked and applied to the node's global state in place, atomically
 *     DELTA                            update.uplink: state delta, error feedback, clipping, sparse encoding
 *
 * Portable C99, no malloc, no stdio, no recursion: every buffer is the caller's, and the model state is one
 * flat byte array (the layout below). Every function that can fail returns FEDTINY_WIRE_OK (0) or a negative
 * fedtiny_wire_status whose fedtiny_wire_reason() is the ProtocolError reason Python raises for the same bytes.
 *
 * The model state (a plan's trainable buffers in plan.trainable_buffers() order; tensor id = index):
 *     state  each buffer rows x inner, int8 (weight rows) or int32 (biases), back to back, each starting at a
 *            4-byte aligned offset (fedtiny_wire_state_offset)
 *     delta  the same buffers as update.state_delta makes them: int16 for int8 buffers, int32 (modulo 2^32)
 *            for int32 buffers, each 4-byte aligned (fedtiny_wire_delta_offset); the uplink's error-feedback
 *            carry lives in this layout, all zeros meaning "nothing carried"
 * Integers are in the machine's byte order in the state (little-endian on every target we build for); the
 * wire is always little-endian.
 *
 * RAM: nothing static, nothing allocated; the caller's buffers only. Stack on the Cortex-M4 (arm-none-eabi-gcc
 * -O2 -fstack-usage, the deepest chain, soft-float double helpers not counted, they take a few words):
 * fedtiny_wire_uplink 192 + 72 B, fedtiny_wire_apply_global_update 192 + 88 + 48 B, the rest under 100 B.
 * Time: the uplink makes about 8 passes over the trainable state, plus 3 * (1 + log2(largest |delta + carry|))
 * when keep_pct is below 100 (finding each buffer's threshold by counting); applying a GLOBAL_UPDATE makes about
 * 4 passes over its blob.
 */
#ifndef FEDTINY_WIRE_H
#define FEDTINY_WIRE_H

#include <stddef.h>
#include <stdint.h>

/* Body sizes (messages.py LAYOUTs). */
#define FEDTINY_WIRE_JOIN_BYTES 52u
#define FEDTINY_WIRE_STATUS_BYTES 16u
#define FEDTINY_WIRE_LEAVE_BYTES 4u
#define FEDTINY_WIRE_ACK_HEAD_BYTES 12u /* then u32 * n_missing */
#define FEDTINY_WIRE_ACK_MAX_MISSING 64u
#define FEDTINY_WIRE_ACK_MAX_BYTES (FEDTINY_WIRE_ACK_HEAD_BYTES + 4u * FEDTINY_WIRE_ACK_MAX_MISSING)
#define FEDTINY_WIRE_TASK_HEAD_BYTES 60u /* then the config */
#define FEDTINY_WIRE_TASK_MAX_CONFIG 1024u
#define FEDTINY_WIRE_GLOBAL_UPDATE_HEAD_BYTES 4u /* base_model_version u32, then the delta blob */
#define FEDTINY_WIRE_DELTA_HEAD_BYTES 8u         /* num_examples u32 | train_loss f32, then the delta blob */
#define FEDTINY_WIRE_BLOB_HEADER_BYTES 12u
#define FEDTINY_WIRE_ENTRY_HEADER_BYTES 16u
#define FEDTINY_WIRE_BLOB_VERSION 2u

#define FEDTINY_WIRE_FULL_STATE 0xFFFFFFFFu    /* GLOBAL_UPDATE base version: every buffer whole */
#define FEDTINY_WIRE_METRICS_TENSOR 0xFFFFu    /* DELTA entry carrying the metrics (accuracy) */
#define FEDTINY_WIRE_HASH_BYTES 32u            /* SHA-256 of the training plan */

/* Delta dtype codes (delta.py); a trainable buffer is DTYPE_INT8 or DTYPE_INT32. */
enum {
    FEDTINY_WIRE_DTYPE_INT8 = 1,
    FEDTINY_WIRE_DTYPE_INT16 = 2,
    FEDTINY_WIRE_DTYPE_INT32 = 3,
    FEDTINY_WIRE_DTYPE_INT4 = 4
};

/* messages.py constants the session needs. */
enum { FEDTINY_WIRE_FEATURE_MQTT5 = 0x0001, FEDTINY_WIRE_FEATURE_INFLATE = 0x0002,
       FEDTINY_WIRE_FEATURE_SECURE_AGGREGATION = 0x0004 };
enum { FEDTINY_WIRE_TASK_MASKED = 0x0001, FEDTINY_WIRE_TASK_COMPRESS_OK = 0x0002 };
enum { FEDTINY_WIRE_DEVICE_OFFLINE = 0, FEDTINY_WIRE_DEVICE_IDLE = 1, FEDTINY_WIRE_DEVICE_TRAINING = 2,
       FEDTINY_WIRE_DEVICE_UPLOADING = 3, FEDTINY_WIRE_DEVICE_SLEEPING = 4 };
enum { FEDTINY_WIRE_ACK_OK = 0, FEDTINY_WIRE_ACK_MISSING_CHUNKS = 1, FEDTINY_WIRE_ACK_REJECTED = 2,
       FEDTINY_WIRE_ACK_BUSY = 3 };

typedef enum {
    FEDTINY_WIRE_OK = 0,
    FEDTINY_WIRE_ERR_ARGUMENT = -1,       /* "argument": the caller's mistake (a bad plan, keep_pct, n_missing) */
    FEDTINY_WIRE_ERR_BUFFER = -2,         /* "buffer": the output buffer is too small */
    FEDTINY_WIRE_ERR_TRUNCATED = -3,      /* "truncated" */
    FEDTINY_WIRE_ERR_TRAILING_BYTES = -4, /* "trailing-bytes" */
    FEDTINY_WIRE_ERR_BAD_MAGIC = -5,      /* "bad-magic": not a delta blob */
    FEDTINY_WIRE_ERR_BAD_VERSION = -6,    /* "bad-version": another delta blob version */
    FEDTINY_WIRE_ERR_BAD_FLAGS = -7,      /* "bad-flags": unknown blob or entry flags, a reserved field set */
    FEDTINY_WIRE_ERR_BAD_DTYPE = -8,      /* "bad-dtype" */
    FEDTINY_WIRE_ERR_BAD_ENTRY = -9,      /* "bad-entry": malformed, or does not fit the plan or the state */
    FEDTINY_WIRE_ERR_OVERSIZED = -10,     /* "oversized": over the plan's delta limits, a long config or list */
    FEDTINY_WIRE_ERR_COMPRESSED = -11,    /* "compressed": a zlib-deflated blob, which this node does not inflate */
    FEDTINY_WIRE_ERR_WRONG_VERSION = -12, /* "wrong-version": a GLOBAL_UPDATE from a version the node does not
                                             hold (the session logs and ignores it, as device.py does) */
    FEDTINY_WIRE_ERR_BAD_TASK = -13,      /* "bad-task": task_settings refuses the TASK config */
    FEDTINY_WIRE_ERR_CARRY_OVERFLOW = -14 /* "carry-overflow": delta plus carry leaves int16 (split_uplink's
                                             ValueError); the carry is unchanged */
} fedtiny_wire_status;

/* The reason token for a status ("truncated", "bad-entry", ...), "ok" for 0, "unknown" for anything else. */
const char *fedtiny_wire_reason(int status);

/* --- the plan: what the code generator emits for a training plan ----------------------------------------- */

typedef struct {
    uint8_t dtype;        /* FEDTINY_WIRE_DTYPE_INT8 (weight rows) or FEDTINY_WIRE_DTYPE_INT32 (biases) */
    uint32_t rows, inner; /* axis 0, and the product of the other axes */
    const double *scales; /* rows values: update.row_scales, the real value of one LSB of each row */
} fedtiny_wire_tensor;

typedef struct {
    const fedtiny_wire_tensor *tensors; /* plan.trainable_buffers() order: tensor id = index */
    uint16_t n_tensors;
    uint32_t max_body, max_entries, max_elements; /* update.delta_limits(plan) */
} fedtiny_wire_plan;

/* FEDTINY_WIRE_OK if the plan is usable: 1..65534 tensors, each int8 or int32 with rows, inner >= 1, scales
 * given, and the state and delta layouts within 2^31 bytes. Every other function assumes a checked plan. */
int fedtiny_wire_plan_check(const fedtiny_wire_plan *plan);

uint32_t fedtiny_wire_state_bytes(const fedtiny_wire_plan *plan);
uint32_t fedtiny_wire_delta_bytes(const fedtiny_wire_plan *plan);
uint32_t fedtiny_wire_state_offset(const fedtiny_wire_plan *plan, uint16_t tensor);
uint32_t fedtiny_wire_delta_offset(const fedtiny_wire_plan *plan, uint16_t tensor);
/* The largest DELTA body fedtiny_wire_uplink can write for this plan, update.max_delta_body_bytes: every buffer
 * whole in its delta type (int16 weights, int32 biases), plus the metrics entry. A capacity that always
 * suffices, and reached by a round that changes every element and some weight by more than 127 LSB. */
uint32_t fedtiny_wire_uplink_bytes_max(const fedtiny_wire_plan *plan);

/* --- bodies the node sends ---------------------------------------------------------------------------------
 * Each writes its body into out (capacity bytes) and its length into *out_len: FEDTINY_WIRE_ERR_BUFFER if it
 * does not fit. */

typedef struct {
    uint32_t memory_budget_bytes;
    uint32_t flash_budget_bytes;
    uint32_t max_mqtt_payload;
    uint16_t features; /* a C node announces FEDTINY_WIRE_FEATURE_MQTT5 only: never FEATURE_INFLATE */
    uint32_t plan_version;
    uint8_t plan_hash[FEDTINY_WIRE_HASH_BYTES];
} fedtiny_wire_join;

typedef struct {
    uint8_t state;       /* FEDTINY_WIRE_DEVICE_* */
    uint8_t battery_pct; /* 255 = unknown / mains powered */
    uint32_t uptime_s;
    uint32_t free_memory_bytes;
    uint32_t next_wake_s; /* 0 = awake */
} fedtiny_wire_status_body;

typedef struct {
    uint8_t acked_type;
    uint8_t status; /* FEDTINY_WIRE_ACK_* */
    uint16_t n_missing;
    uint32_t acked_seq;
    uint32_t transfer_id;
    uint32_t missing[FEDTINY_WIRE_ACK_MAX_MISSING];
} fedtiny_wire_ack;

int fedtiny_wire_encode_join(const fedtiny_wire_join *join, uint8_t *out, size_t capacity, size_t *out_len);
int fedtiny_wire_encode_status(const fedtiny_wire_status_body *status, uint8_t *out, size_t capacity,
                               size_t *out_len);
int fedtiny_wire_encode_leave(uint8_t reason, uint8_t *out, size_t capacity, size_t *out_len);
/* FEDTINY_WIRE_ERR_ARGUMENT if n_missing > FEDTINY_WIRE_ACK_MAX_MISSING (messages.Ack.encode's ValueError). */
int fedtiny_wire_encode_ack(const fedtiny_wire_ack *ack, uint8_t *out, size_t capacity, size_t *out_len);

/* --- bodies the node receives ------------------------------------------------------------------------------ */

typedef struct {
    uint32_t plan_version;
    uint8_t plan_hash[FEDTINY_WIRE_HASH_BYTES];
    uint16_t local_steps;
    uint16_t batch_size;
    float learning_rate;
    float clip_norm; /* 0 = no clipping */
    uint32_t deadline_s;
    uint32_t max_mqtt_payload;
    uint16_t task_flags;
    uint16_t config_len;
    const uint8_t *config; /* points into the decoded body (config_len bytes) */
} fedtiny_wire_task;

/* What a device reads back from a TASK (task.task_settings). */
typedef struct {
    uint16_t epochs;
    uint16_t steps;
    uint16_t batch_size;
    float learning_rate;
    float clip_norm;
    uint32_t deadline_s;
    uint16_t uplink_keep_pct; /* 1..100: the share of each buffer's changes a DELTA carries (0 on the wire = 100) */
    float noise_sigma;        /* the device's DP noise per element, real units (0: none; protocol/noise.py) */
    uint32_t min_survivors;   /* the fewest survivors the noise is calibrated for (0: no such rule) */
    uint8_t masked;           /* TASK_MASKED: the delta goes masked for secure aggregation (protocol/secagg.py) */
} fedtiny_wire_settings;

/* messages.Task.decode: truncated, oversized (config > 1024), truncated / trailing-bytes (config length). */
int fedtiny_wire_decode_task(const uint8_t *body, uint32_t len, fedtiny_wire_task *task);
/* task.task_settings: bad-task if the config is neither empty nor 4 or 12 bytes, its uplink_keep_pct is >= 100 or
 * its noise_sigma negative or NaN. Whether the node can honour noise or masking is the session's question.
 * Separate from decoding because device.py reads the settings only of a TASK for its plan and a new round. */
int fedtiny_wire_task_settings(const fedtiny_wire_task *task, fedtiny_wire_settings *settings);
/* messages.Ack.decode: truncated, oversized (more than 64 missing), truncated / trailing-bytes. */
int fedtiny_wire_decode_ack(const uint8_t *body, uint32_t len, fedtiny_wire_ack *ack);

/* --- GLOBAL_UPDATE -----------------------------------------------------------------------------------------
 * A zlib-flagged blob is refused (FEDTINY_WIRE_ERR_COMPRESSED, after the header checks Python makes first):
 * the node's JOIN does not announce FEDTINY_WIRE_FEATURE_INFLATE, so a coordinator must not deflate for it. */

/* messages.GlobalUpdate.decode with the plan's delta limits: the blob's structure only (what envelope.open
 * checks before it commits the replay position). Reads body only. */
int fedtiny_wire_check_global_update(const fedtiny_wire_plan *plan, const uint8_t *body, uint32_t len);

/* update.apply_global_update on state (the state layout above) in place, atomically: the whole body is decoded
 * and checked first (the blob's structure against the plan's limits, then entries_to_state's checks, then
 * that base + delta stays int8), and only then applied, so on any error the state is unchanged.
 * FULL_STATE replaces every buffer (each channel covered exactly once, no bitmap entries); any other base
 * version must equal held_version (else FEDTINY_WIRE_ERR_WRONG_VERSION) and its entries are added as a delta.
 * The metrics tensor id is skipped, scales in entries are ignored (the plan's are the truth), as in Python. */
int fedtiny_wire_apply_global_update(const fedtiny_wire_plan *plan, const uint8_t *body, uint32_t len,
                                     uint32_t held_version, uint8_t *state);

/* --- DELTA: update.uplink -----------------------------------------------------------------------------------
 * The round's DELTA body from the state the node trained from (base_state) and the state training left
 * (trained_state), both in the state layout:
 *     1. delta = trained - base per buffer (int16, or int32 modulo 2^32)
 *     2. error feedback: plus carry; of each buffer the ceil(keep_pct/100 * nonzero) elements of largest |value|
 *        are sent (ties: lower index first; the count computed in float64 as Python does), the rest carried
 *     3. clipping to clip_norm (0: none; update.clip_delta's exact form: per row an exact integer sum of
 *        squares, a sequential float64 sum of scale*scale*rowsum, sqrt, factor, truncation toward zero)
 *     4. encoding (encode_update): per buffer with something to send, a bitmap entry or the whole buffer,
 *        whichever is smaller, in the narrowest dtype over the sent elements (int4 included), PLAN_SCALES;
 *        the metrics entry (accuracy, and personal_accuracy unless it is negative: no held-out part) last; never
 *        compressed.
 * out receives num_examples u32 | loss f32 | blob (*out_len bytes; fedtiny_wire_uplink_bytes_max(plan) always
 * suffices), and carry (in/out, the delta layout) the change kept back, written only on success: on an error
 * (FEDTINY_WIRE_ERR_ARGUMENT for keep_pct outside 1..100, ERR_BUFFER, ERR_CARRY_OVERFLOW) carry is unchanged
 * and out undefined. The three states must not overlap out. */
int fedtiny_wire_uplink(const fedtiny_wire_plan *plan, const uint8_t *base_state, const uint8_t *trained_state,
                        uint8_t *carry, uint16_t keep_pct, float clip_norm, uint32_t num_examples, float loss,
                        float accuracy, float personal_accuracy, uint8_t *out, size_t capacity, size_t *out_len);

/* --- the uplink in steps, for a node that adds noise (or masks) between clipping and encoding ------------------
 * values: every trainable element as int32, buffers in plan order back to back, no padding
 * (fedtiny_wire_elements of them). */
uint32_t fedtiny_wire_elements(const fedtiny_wire_plan *plan);
/* update.uplink_delta without noise, steps 1-3 of fedtiny_wire_uplink: the sent, clipped delta into values, and
 * the new carry (written only on success: ERR_ARGUMENT for keep_pct, ERR_CARRY_OVERFLOW leave it unchanged). */
int fedtiny_wire_uplink_values(const fedtiny_wire_plan *plan, const uint8_t *base_state, const uint8_t *trained_state,
                               uint8_t *carry, uint16_t keep_pct, float clip_norm, int32_t *values);
/* Step 6 of fedtiny_wire_uplink (encode_update) over given values: the same DELTA body fedtiny_wire_uplink writes
 * for a delta whose sent values these are. */
int fedtiny_wire_encode_values(const fedtiny_wire_plan *plan, const int32_t *values, uint32_t num_examples,
                               float loss, float accuracy, float personal_accuracy, uint8_t *out, size_t capacity,
                               size_t *out_len);

/* --- differential privacy noise: protocol/noise.py ----------------------------------------------------------------
 * The uplink's noise step in C (fedtiny_noise.c applies it between fedtiny_wire_uplink_values and
 * fedtiny_wire_encode_values).
 * Random 64-bit words come from the caller (on the node: ChaCha20, Monocypher's crypto_chacha20_ietf keystream,
 * keyed and with the nonce noise.NoiseStream uses); `used` counts the words drawn. */
typedef struct {
    uint64_t (*word)(void *ctx);
    void *ctx;
    uint64_t used;
} fedtiny_noise_source;

#define FEDTINY_NOISE_MAX_SIGMA2 (UINT64_C(1) << 40) /* noise.MAX_SIGMA2: the 128-bit arithmetic's bound */

/* noise.discrete_gaussian: *out ~ N_Z(0, sigma2), sigma2 in [1, 2^40] (else FEDTINY_WIRE_ERR_ARGUMENT). */
int fedtiny_wire_discrete_gaussian(fedtiny_noise_source *src, uint64_t sigma2, int64_t *out);

/* noise.row_sigma2: ceil((sigma / scale)^2), at least 1; FEDTINY_WIRE_ERR_ARGUMENT above 2^40 or NaN. */
int fedtiny_wire_row_sigma2(double sigma, double scale, uint64_t *out);

#endif
