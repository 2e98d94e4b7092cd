/* The node's message bodies and model updates: see fedtiny_wire.h. The Python modules named in each comment are
 * the specification; the checks run in their order so that the same bytes give the same reason.
 *
 * RAM: no static data, no heap, no arrays on the stack; see fedtiny_wire.h for each call's stack. Passes over
 * the buffers are recomputed rather than remembered (the uplink's per-buffer threshold is found three times:
 * for the norm, the encoding and the carry), which trades a few passes over the trainable state for no
 * scratch memory at all.
 */
#include "fedtiny_wire.h"

#include <math.h>
#include <string.h>

#define MAGIC0 'F'
#define MAGIC1 'D'
#define FLAG_ZLIB 0x01u
#define ENTRY_PER_CHANNEL 0x01u
#define ENTRY_PLAN_SCALES 0x02u
#define ENTRY_BITMAP 0x04u
#define ENTRY_FLAGS (ENTRY_PER_CHANNEL | ENTRY_PLAN_SCALES | ENTRY_BITMAP)
/* header 16 | a scale f32 per metric (accuracy, then the personalised accuracy where there is one) | the int4 ones,
 * padded */
#define METRICS_ENTRY_BYTES(count) (16u + 4u * (count) + 4u)
#define METRICS_ENTRY_BYTES_MAX METRICS_ENTRY_BYTES(2u)

const char *fedtiny_wire_reason(int status) {
    switch (status) {
    case FEDTINY_WIRE_OK: return "ok";
    case FEDTINY_WIRE_ERR_ARGUMENT: return "argument";
    case FEDTINY_WIRE_ERR_BUFFER: return "buffer";
    case FEDTINY_WIRE_ERR_TRUNCATED: return "truncated";
    case FEDTINY_WIRE_ERR_TRAILING_BYTES: return "trailing-bytes";
    case FEDTINY_WIRE_ERR_BAD_MAGIC: return "bad-magic";
    case FEDTINY_WIRE_ERR_BAD_VERSION: return "bad-version";
    case FEDTINY_WIRE_ERR_BAD_FLAGS: return "bad-flags";
    case FEDTINY_WIRE_ERR_BAD_DTYPE: return "bad-dtype";
    case FEDTINY_WIRE_ERR_BAD_ENTRY: return "bad-entry";
    case FEDTINY_WIRE_ERR_OVERSIZED: return "oversized";
    case FEDTINY_WIRE_ERR_COMPRESSED: return "compressed";
    case FEDTINY_WIRE_ERR_WRONG_VERSION: return "wrong-version";
    case FEDTINY_WIRE_ERR_BAD_TASK: return "bad-task";
    case FEDTINY_WIRE_ERR_CARRY_OVERFLOW: return "carry-overflow";
    default: return "unknown";
    }
}

/* --- little-endian access ---------------------------------------------------------------------------------- */

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static void wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static float rdf32(const uint8_t *p) { uint32_t u = rd32(p); float f; memcpy(&f, &u, 4); return f; }
static void wrf32(uint8_t *p, float f) { uint32_t u; memcpy(&u, &f, 4); wr32(p, u); }

static uint64_t pad4(uint64_t n) { return (4u - (n & 3u)) & 3u; }
static uint64_t up4(uint64_t n) { return n + pad4(n); }

/* --- the plan and the state layout -------------------------------------------------------------------------- */

static uint64_t elements(const fedtiny_wire_tensor *t) { return (uint64_t)t->rows * t->inner; }
static uint64_t state_size(const fedtiny_wire_tensor *t) {
    return elements(t) * (t->dtype == FEDTINY_WIRE_DTYPE_INT8 ? 1u : 4u);
}
static uint64_t delta_size(const fedtiny_wire_tensor *t) {
    return elements(t) * (t->dtype == FEDTINY_WIRE_DTYPE_INT8 ? 2u : 4u);
}

int fedtiny_wire_plan_check(const fedtiny_wire_plan *plan) {
    uint64_t state = 0, delta = 0;
    uint16_t i;
    if (plan == NULL || plan->tensors == NULL || plan->n_tensors == 0 || plan->n_tensors == 0xFFFFu)
        return FEDTINY_WIRE_ERR_ARGUMENT;
    for (i = 0; i < plan->n_tensors; i++) {
        const fedtiny_wire_tensor *t = &plan->tensors[i];
        if ((t->dtype != FEDTINY_WIRE_DTYPE_INT8 && t->dtype != FEDTINY_WIRE_DTYPE_INT32) || t->rows == 0 ||
            t->inner == 0 || t->scales == NULL)
            return FEDTINY_WIRE_ERR_ARGUMENT;
        state = up4(state) + state_size(t);
        delta = up4(delta) + delta_size(t);
        if (delta > 0x7FFFFFFFu) return FEDTINY_WIRE_ERR_ARGUMENT;
    }
    (void)state; /* never larger than delta */
    return FEDTINY_WIRE_OK;
}

uint32_t fedtiny_wire_state_offset(const fedtiny_wire_plan *plan, uint16_t tensor) {
    uint64_t at = 0;
    uint16_t i;
    for (i = 0; i < tensor && i < plan->n_tensors; i++) at = up4(at + state_size(&plan->tensors[i]));
    return (uint32_t)at;
}

uint32_t fedtiny_wire_delta_offset(const fedtiny_wire_plan *plan, uint16_t tensor) {
    uint64_t at = 0;
    uint16_t i;
    for (i = 0; i < tensor && i < plan->n_tensors; i++) at = up4(at + delta_size(&plan->tensors[i]));
    return (uint32_t)at;
}

uint32_t fedtiny_wire_state_bytes(const fedtiny_wire_plan *plan) {
    return fedtiny_wire_state_offset(plan, plan->n_tensors);
}

uint32_t fedtiny_wire_delta_bytes(const fedtiny_wire_plan *plan) {
    return fedtiny_wire_delta_offset(plan, plan->n_tensors);
}

/* update.max_delta_body_bytes: each buffer's entry is at most its whole form in the widest delta type (int16
 * weights: delta plus carry past int16 is refused; int32 biases), since encode_buffer takes the bitmap form
 * only where it is smaller */
uint32_t fedtiny_wire_uplink_bytes_max(const fedtiny_wire_plan *plan) {
    uint64_t n = FEDTINY_WIRE_DELTA_HEAD_BYTES + FEDTINY_WIRE_BLOB_HEADER_BYTES + METRICS_ENTRY_BYTES_MAX;
    uint16_t i;
    for (i = 0; i < plan->n_tensors; i++) n += FEDTINY_WIRE_ENTRY_HEADER_BYTES + up4(delta_size(&plan->tensors[i]));
    return n > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)n;
}

/* Element e of buffer t in the state (int8 or int32) and in the delta layout (int16 or int32). */
static int32_t state_get(const uint8_t *buf, const fedtiny_wire_tensor *t, uint64_t e) {
    int32_t v;
    if (t->dtype == FEDTINY_WIRE_DTYPE_INT8) return (int8_t)buf[e];
    memcpy(&v, buf + 4u * e, 4);
    return v;
}
static void state_set(uint8_t *buf, const fedtiny_wire_tensor *t, uint64_t e, int32_t v) {
    if (t->dtype == FEDTINY_WIRE_DTYPE_INT8) buf[e] = (uint8_t)(int8_t)v;
    else memcpy(buf + 4u * e, &v, 4);
}
static int32_t delta_get(const uint8_t *buf, const fedtiny_wire_tensor *t, uint64_t e) {
    int16_t h;
    int32_t v;
    if (t->dtype == FEDTINY_WIRE_DTYPE_INT8) { memcpy(&h, buf + 2u * e, 2); return h; }
    memcpy(&v, buf + 4u * e, 4);
    return v;
}
static void delta_set(uint8_t *buf, const fedtiny_wire_tensor *t, uint64_t e, int32_t v) {
    int16_t h = (int16_t)v;
    if (t->dtype == FEDTINY_WIRE_DTYPE_INT8) memcpy(buf + 2u * e, &h, 2);
    else memcpy(buf + 4u * e, &v, 4);
}
/* a + b modulo 2^32 (int32 buffers wrap, as update.state_delta / apply_delta make them) */
static int32_t wrap_add(int32_t a, int32_t b) {
    uint32_t u = (uint32_t)a + (uint32_t)b;
    int32_t v;
    memcpy(&v, &u, 4);
    return v;
}

/* --- fixed bodies (messages.py) ------------------------------------------------------------------------------ */

static int reserve(size_t need, size_t capacity, size_t *out_len) {
    if (capacity < need) return FEDTINY_WIRE_ERR_BUFFER;
    *out_len = need;
    return FEDTINY_WIRE_OK;
}

int fedtiny_wire_encode_join(const fedtiny_wire_join *join, uint8_t *out, size_t capacity, size_t *out_len) {
    int status = reserve(FEDTINY_WIRE_JOIN_BYTES, capacity, out_len);
    if (status) return status;
    wr32(out, join->memory_budget_bytes);
    wr32(out + 4, join->flash_budget_bytes);
    wr32(out + 8, join->max_mqtt_payload);
    wr16(out + 12, join->features);
    wr16(out + 14, 0); /* reserved */
    wr32(out + 16, join->plan_version);
    memcpy(out + 20, join->plan_hash, FEDTINY_WIRE_HASH_BYTES);
    return FEDTINY_WIRE_OK;
}

int fedtiny_wire_encode_status(const fedtiny_wire_status_body *status_body, uint8_t *out, size_t capacity,
                               size_t *out_len) {
    int status = reserve(FEDTINY_WIRE_STATUS_BYTES, capacity, out_len);
    if (status) return status;
    out[0] = status_body->state;
    out[1] = status_body->battery_pct;
    wr16(out + 2, 0); /* reserved */
    wr32(out + 4, status_body->uptime_s);
    wr32(out + 8, status_body->free_memory_bytes);
    wr32(out + 12, status_body->next_wake_s);
    return FEDTINY_WIRE_OK;
}

int fedtiny_wire_encode_leave(uint8_t reason, uint8_t *out, size_t capacity, size_t *out_len) {
    int status = reserve(FEDTINY_WIRE_LEAVE_BYTES, capacity, out_len);
    if (status) return status;
    out[0] = reason;
    out[1] = 0;
    wr16(out + 2, 0);
    return FEDTINY_WIRE_OK;
}

int fedtiny_wire_encode_ack(const fedtiny_wire_ack *ack, uint8_t *out, size_t capacity, size_t *out_len) {
    uint16_t i;
    int status;
    if (ack->n_missing > FEDTINY_WIRE_ACK_MAX_MISSING) return FEDTINY_WIRE_ERR_ARGUMENT;
    status = reserve(FEDTINY_WIRE_ACK_HEAD_BYTES + 4u * (size_t)ack->n_missing, capacity, out_len);
    if (status) return status;
    out[0] = ack->acked_type;
    out[1] = ack->status;
    wr16(out + 2, ack->n_missing);
    wr32(out + 4, ack->acked_seq);
    wr32(out + 8, ack->transfer_id);
    for (i = 0; i < ack->n_missing; i++) wr32(out + FEDTINY_WIRE_ACK_HEAD_BYTES + 4u * i, ack->missing[i]);
    return FEDTINY_WIRE_OK;
}

int fedtiny_wire_decode_task(const uint8_t *body, uint32_t len, fedtiny_wire_task *task) {
    uint16_t config_len;
    if (len < FEDTINY_WIRE_TASK_HEAD_BYTES) return FEDTINY_WIRE_ERR_TRUNCATED;
    config_len = rd16(body + 58);
    if (config_len > FEDTINY_WIRE_TASK_MAX_CONFIG) return FEDTINY_WIRE_ERR_OVERSIZED;
    if (len - FEDTINY_WIRE_TASK_HEAD_BYTES != config_len)
        return len - FEDTINY_WIRE_TASK_HEAD_BYTES < config_len ? FEDTINY_WIRE_ERR_TRUNCATED
                                                               : FEDTINY_WIRE_ERR_TRAILING_BYTES;
    task->plan_version = rd32(body);
    memcpy(task->plan_hash, body + 4, FEDTINY_WIRE_HASH_BYTES);
    task->local_steps = rd16(body + 36);
    task->batch_size = rd16(body + 38);
    task->learning_rate = rdf32(body + 40);
    task->clip_norm = rdf32(body + 44);
    task->deadline_s = rd32(body + 48);
    task->max_mqtt_payload = rd32(body + 52);
    task->task_flags = rd16(body + 56);
    task->config_len = config_len;
    task->config = body + FEDTINY_WIRE_TASK_HEAD_BYTES;
    return FEDTINY_WIRE_OK;
}

int fedtiny_wire_task_settings(const fedtiny_wire_task *task, fedtiny_wire_settings *settings) {
    uint16_t epochs = 1, keep_pct = 0;
    float noise_sigma = 0.0f;
    uint32_t min_survivors = 0;
    if (task->config_len == 4 || task->config_len == 12) {
        /* task.TASK_CONFIG: epochs u16 | uplink_keep_pct u16, and in the 12-byte form with device noise
         * (task.TASK_CONFIG_NOISE) | noise_sigma f32 | min_survivors u32 */
        epochs = rd16(task->config);
        keep_pct = rd16(task->config + 2);
        if (task->config_len == 12) {
            noise_sigma = rdf32(task->config + 4);
            min_survivors = rd32(task->config + 8);
            if (!(noise_sigma >= 0.0f)) return FEDTINY_WIRE_ERR_BAD_TASK; /* NaN or negative */
        }
    } else if (task->config_len != 0) {
        return FEDTINY_WIRE_ERR_BAD_TASK;
    }
    if (keep_pct >= 100) return FEDTINY_WIRE_ERR_BAD_TASK;
    settings->epochs = epochs;
    settings->steps = task->local_steps;
    settings->batch_size = task->batch_size;
    settings->learning_rate = task->learning_rate;
    settings->clip_norm = task->clip_norm;
    settings->deadline_s = task->deadline_s;
    settings->uplink_keep_pct = keep_pct ? keep_pct : 100;
    settings->noise_sigma = noise_sigma;
    settings->min_survivors = min_survivors;
    settings->masked = (task->task_flags & FEDTINY_WIRE_TASK_MASKED) != 0;
    return FEDTINY_WIRE_OK;
}

int fedtiny_wire_decode_ack(const uint8_t *body, uint32_t len, fedtiny_wire_ack *ack) {
    uint16_t n, i;
    if (len < FEDTINY_WIRE_ACK_HEAD_BYTES) return FEDTINY_WIRE_ERR_TRUNCATED;
    n = rd16(body + 2);
    if (n > FEDTINY_WIRE_ACK_MAX_MISSING) return FEDTINY_WIRE_ERR_OVERSIZED;
    if (len != FEDTINY_WIRE_ACK_HEAD_BYTES + 4u * n)
        return len < FEDTINY_WIRE_ACK_HEAD_BYTES + 4u * n ? FEDTINY_WIRE_ERR_TRUNCATED
                                                          : FEDTINY_WIRE_ERR_TRAILING_BYTES;
    ack->acked_type = body[0];
    ack->status = body[1];
    ack->n_missing = n;
    ack->acked_seq = rd32(body + 4);
    ack->transfer_id = rd32(body + 8);
    for (i = 0; i < n; i++) ack->missing[i] = rd32(body + FEDTINY_WIRE_ACK_HEAD_BYTES + 4u * i);
    return FEDTINY_WIRE_OK;
}

/* --- delta blobs (delta.py) ---------------------------------------------------------------------------------- */

/* One entry of a blob whose structure has been checked (parse_entry): where its parts are in the body. */
typedef struct {
    uint16_t tensor;
    uint8_t code, flags;
    uint32_t start, count, inner;
    uint32_t values_at, bitmap_at, n_values, end;
} entry_view;

static uint32_t popcount8(uint8_t b) {
    uint32_t n = 0;
    while (b) { n += b & 1u; b >>= 1; }
    return n;
}

/* delta._decode_entry's checks, in its order; max_elements is what the blob's limit has left. */
static int parse_entry(const uint8_t *body, uint32_t len, uint32_t offset, uint64_t max_elements, entry_view *e) {
    uint64_t n, n_scales, at, n_bitmap, n_value_bytes, end, i;
    if ((uint64_t)offset + FEDTINY_WIRE_ENTRY_HEADER_BYTES > len) return FEDTINY_WIRE_ERR_TRUNCATED;
    e->tensor = rd16(body + offset);
    e->code = body[offset + 2];
    e->flags = body[offset + 3];
    e->start = rd32(body + offset + 4);
    e->count = rd32(body + offset + 8);
    e->inner = rd32(body + offset + 12);
    at = (uint64_t)offset + FEDTINY_WIRE_ENTRY_HEADER_BYTES;
    if (e->code < FEDTINY_WIRE_DTYPE_INT8 || e->code > FEDTINY_WIRE_DTYPE_INT4) return FEDTINY_WIRE_ERR_BAD_DTYPE;
    if ((e->flags & ~ENTRY_FLAGS) || ((e->flags & ENTRY_PLAN_SCALES) && (e->flags & ENTRY_PER_CHANNEL)))
        return FEDTINY_WIRE_ERR_BAD_FLAGS;
    if (e->count == 0 || e->inner == 0) return FEDTINY_WIRE_ERR_BAD_ENTRY;
    n = (uint64_t)e->count * e->inner;
    if (n > 8u * (uint64_t)len || n > max_elements) return FEDTINY_WIRE_ERR_OVERSIZED;
    n_scales = (e->flags & ENTRY_PLAN_SCALES) ? 0u : (e->flags & ENTRY_PER_CHANNEL) ? e->count : 1u;
    if (at + 4u * n_scales > len) return FEDTINY_WIRE_ERR_TRUNCATED;
    at += 4u * n_scales; /* scales are not used: entries_to_state overlays values, the plan has the scales */
    e->n_values = (uint32_t)n;
    e->bitmap_at = 0;
    if (e->flags & ENTRY_BITMAP) {
        uint32_t set = 0;
        n_bitmap = (n + 7u) / 8u;
        if (at + n_bitmap > len) return FEDTINY_WIRE_ERR_TRUNCATED;
        if ((n & 7u) && (body[at + n_bitmap - 1] >> (n & 7u))) return FEDTINY_WIRE_ERR_BAD_ENTRY;
        for (i = at + n_bitmap; i < at + n_bitmap + pad4(n_bitmap) && i < len; i++)
            if (body[i]) return FEDTINY_WIRE_ERR_BAD_ENTRY; /* bitmap padding (as far as the body goes) */
        for (i = 0; i < n_bitmap; i++) set += popcount8(body[at + i]);
        e->bitmap_at = (uint32_t)at;
        e->n_values = set;
        at += n_bitmap + pad4(n_bitmap);
    }
    n_value_bytes = e->code == FEDTINY_WIRE_DTYPE_INT4 ? ((uint64_t)e->n_values + 1u) / 2u
                  : (uint64_t)e->n_values * (e->code == FEDTINY_WIRE_DTYPE_INT8 ? 1u
                                             : e->code == FEDTINY_WIRE_DTYPE_INT16 ? 2u : 4u);
    end = at + n_value_bytes + pad4(n_value_bytes);
    if (end > len) return FEDTINY_WIRE_ERR_TRUNCATED;
    if (e->code == FEDTINY_WIRE_DTYPE_INT4 && (e->n_values & 1u) && (body[at + n_value_bytes - 1] >> 4))
        return FEDTINY_WIRE_ERR_BAD_ENTRY; /* the padding nibble */
    e->values_at = (uint32_t)at;
    e->end = (uint32_t)end;
    return FEDTINY_WIRE_OK;
}

/* Value j (of the n_values the entry carries) as an integer. */
static int32_t entry_value(const uint8_t *body, const entry_view *e, uint32_t j) {
    const uint8_t *v = body + e->values_at;
    switch (e->code) {
    case FEDTINY_WIRE_DTYPE_INT4: {
        uint8_t nibble = (uint8_t)((v[j >> 1] >> ((j & 1u) * 4u)) & 0x0Fu);
        return (int32_t)(nibble ^ 8u) - 8; /* sign-extend */
    }
    case FEDTINY_WIRE_DTYPE_INT8: return (int8_t)v[j];
    case FEDTINY_WIRE_DTYPE_INT16: return (int16_t)rd16(v + 2u * j);
    default: { uint32_t u = rd32(v + 4u * j); int32_t s; memcpy(&s, &u, 4); return s; }
    }
}

static int entry_carries(const uint8_t *body, const entry_view *e, uint64_t k) {
    return !(e->flags & ENTRY_BITMAP) || ((body[e->bitmap_at + (k >> 3)] >> (k & 7u)) & 1u);
}

/* delta.decode_delta's blob checks with the plan's limits, the entries' structure included; on success the
 * body (entries) is at blob + 12, *body_len bytes, with *n_entries entries. */
static int check_blob(const fedtiny_wire_plan *plan, const uint8_t *blob, uint32_t len, uint32_t *body_len,
                      uint16_t *n_entries) {
    uint32_t blen, offset = 0;
    uint64_t left = plan->max_elements;
    uint16_t n, i;
    const uint8_t *body = blob + FEDTINY_WIRE_BLOB_HEADER_BYTES;
    entry_view e;
    if (len < FEDTINY_WIRE_BLOB_HEADER_BYTES) return FEDTINY_WIRE_ERR_TRUNCATED;
    if (blob[0] != MAGIC0 || blob[1] != MAGIC1) return FEDTINY_WIRE_ERR_BAD_MAGIC;
    if (blob[2] != FEDTINY_WIRE_BLOB_VERSION) return FEDTINY_WIRE_ERR_BAD_VERSION;
    if ((blob[3] & ~FLAG_ZLIB) || rd16(blob + 6)) return FEDTINY_WIRE_ERR_BAD_FLAGS;
    n = rd16(blob + 4);
    blen = rd32(blob + 8);
    if (n > plan->max_entries) return FEDTINY_WIRE_ERR_OVERSIZED;
    if (blen > plan->max_body) return FEDTINY_WIRE_ERR_OVERSIZED;
    /* Python would inflate here; this node does not (its JOIN leaves out FEATURE_INFLATE). */
    if (blob[3] & FLAG_ZLIB) return FEDTINY_WIRE_ERR_COMPRESSED;
    if (len - FEDTINY_WIRE_BLOB_HEADER_BYTES != blen)
        return len - FEDTINY_WIRE_BLOB_HEADER_BYTES < blen ? FEDTINY_WIRE_ERR_TRUNCATED
                                                           : FEDTINY_WIRE_ERR_TRAILING_BYTES;
    for (i = 0; i < n; i++) {
        int status = parse_entry(body, blen, offset, left, &e);
        if (status) return status;
        left -= (uint64_t)e.count * e.inner;
        offset = e.end;
    }
    if (offset != blen) return FEDTINY_WIRE_ERR_TRAILING_BYTES;
    *body_len = blen;
    *n_entries = n;
    return FEDTINY_WIRE_OK;
}

int fedtiny_wire_check_global_update(const fedtiny_wire_plan *plan, const uint8_t *body, uint32_t len) {
    uint32_t body_len;
    uint16_t n;
    if (len < FEDTINY_WIRE_GLOBAL_UPDATE_HEAD_BYTES) return FEDTINY_WIRE_ERR_TRUNCATED;
    return check_blob(plan, body + 4, len - 4, &body_len, &n);
}

/* update.entries_to_state's checks of entry i (every entry before it has passed them), then, for a delta,
 * apply_delta's int8 range of state + value. The entries of a checked blob; reads state only. */
static int check_entry_fits(const fedtiny_wire_plan *plan, const uint8_t *body, uint32_t body_len,
                            const entry_view *e, uint32_t e_offset, int full_state, const uint8_t *state) {
    const fedtiny_wire_tensor *t;
    const uint8_t *buf;
    int32_t lo, hi;
    uint32_t offset = 0, j = 0;
    uint64_t k, n;
    entry_view prior;
    if (e->tensor >= plan->n_tensors) return FEDTINY_WIRE_ERR_BAD_ENTRY;
    t = &plan->tensors[e->tensor];
    if ((uint64_t)e->start + e->count > t->rows || e->inner != t->inner) return FEDTINY_WIRE_ERR_BAD_ENTRY;
    /* the dtype the buffer ends in: the state's for FULL_STATE, the delta's (int16 / int32) for a delta */
    if (t->dtype == FEDTINY_WIRE_DTYPE_INT32) { lo = INT32_MIN; hi = INT32_MAX; }
    else if (full_state) { lo = -128; hi = 127; }
    else { lo = -32768; hi = 32767; }
    for (j = 0; j < e->n_values; j++) {
        int32_t v = entry_value(body, e, j);
        if (v < lo || v > hi) return FEDTINY_WIRE_ERR_BAD_ENTRY;
    }
    while (offset < e_offset) { /* channels covered twice: any earlier entry of this tensor that overlaps */
        (void)parse_entry(body, body_len, offset, UINT64_MAX, &prior);
        if (prior.tensor == e->tensor && prior.start < (uint64_t)e->start + e->count &&
            e->start < (uint64_t)prior.start + prior.count)
            return FEDTINY_WIRE_ERR_BAD_ENTRY;
        offset = prior.end;
    }
    if (full_state && (e->flags & ENTRY_BITMAP)) return FEDTINY_WIRE_ERR_BAD_ENTRY;
    if (full_state || t->dtype != FEDTINY_WIRE_DTYPE_INT8) return FEDTINY_WIRE_OK;
    buf = state + fedtiny_wire_state_offset(plan, e->tensor) + (uint64_t)e->start * t->inner;
    n = (uint64_t)e->count * e->inner;
    for (k = 0, j = 0; k < n; k++) {
        if (entry_carries(body, e, k)) {
            int32_t sum = (int8_t)buf[k] + entry_value(body, e, j++);
            if (sum < -128 || sum > 127) return FEDTINY_WIRE_ERR_BAD_ENTRY;
        }
    }
    return FEDTINY_WIRE_OK;
}

int fedtiny_wire_apply_global_update(const fedtiny_wire_plan *plan, const uint8_t *body, uint32_t len,
                                     uint32_t held_version, uint8_t *state) {
    const uint8_t *entries = body + FEDTINY_WIRE_GLOBAL_UPDATE_HEAD_BYTES + FEDTINY_WIRE_BLOB_HEADER_BYTES;
    uint32_t base, body_len, offset;
    uint16_t n, i, tensor;
    int full_state, status;
    entry_view e;

    /* 1. messages.GlobalUpdate.decode: the structure, before any version check */
    if (len < FEDTINY_WIRE_GLOBAL_UPDATE_HEAD_BYTES) return FEDTINY_WIRE_ERR_TRUNCATED;
    status = check_blob(plan, body + 4, len - 4, &body_len, &n);
    if (status) return status;
    base = rd32(body);
    full_state = base == FEDTINY_WIRE_FULL_STATE;
    if (!full_state && base != held_version) return FEDTINY_WIRE_ERR_WRONG_VERSION;

    /* 2. entries_to_state (and apply_delta's range) over every entry, touching nothing */
    for (i = 0, offset = 0; i < n; i++, offset = e.end) {
        (void)parse_entry(entries, body_len, offset, UINT64_MAX, &e);
        if (e.tensor == FEDTINY_WIRE_METRICS_TENSOR) continue;
        status = check_entry_fits(plan, entries, body_len, &e, offset, full_state, state);
        if (status) return status;
    }
    if (full_state) { /* require_all: the entries do not overlap, so full coverage = the counts add up */
        for (tensor = 0; tensor < plan->n_tensors; tensor++) {
            uint64_t covered = 0;
            for (i = 0, offset = 0; i < n; i++, offset = e.end) {
                (void)parse_entry(entries, body_len, offset, UINT64_MAX, &e);
                if (e.tensor == tensor) covered += e.count;
            }
            if (covered != plan->tensors[tensor].rows) return FEDTINY_WIRE_ERR_BAD_ENTRY;
        }
    }

    /* 3. apply: nothing can fail any more */
    for (i = 0, offset = 0; i < n; i++, offset = e.end) {
        const fedtiny_wire_tensor *t;
        uint8_t *buf;
        uint64_t k, count;
        uint32_t j = 0;
        (void)parse_entry(entries, body_len, offset, UINT64_MAX, &e);
        if (e.tensor == FEDTINY_WIRE_METRICS_TENSOR) continue;
        t = &plan->tensors[e.tensor];
        buf = state + fedtiny_wire_state_offset(plan, e.tensor);
        count = (uint64_t)e.count * e.inner;
        for (k = 0; k < count; k++) {
            uint64_t at = (uint64_t)e.start * t->inner + k;
            int32_t v;
            if (!entry_carries(entries, &e, k)) continue;
            v = entry_value(entries, &e, j++);
            if (!full_state) v = t->dtype == FEDTINY_WIRE_DTYPE_INT8 ? state_get(buf, t, at) + v
                                                                     : wrap_add(state_get(buf, t, at), v);
            state_set(buf, t, at, v);
        }
    }
    return FEDTINY_WIRE_OK;
}

/* --- the uplink (update.uplink) ------------------------------------------------------------------------------ */

typedef struct {
    const fedtiny_wire_tensor *t;
    const uint8_t *base, *trained; /* this buffer in the state layout */
    const uint8_t *carry;          /* this buffer in the delta layout */
    const int32_t *values;         /* or this buffer's final sent values (fedtiny_wire_encode_values): NULL */
} uplink_buffer;

static uplink_buffer buffer_at(const fedtiny_wire_plan *plan, const uint8_t *base, const uint8_t *trained,
                               const uint8_t *carry, uint16_t tensor) {
    uplink_buffer b;
    uint32_t s = fedtiny_wire_state_offset(plan, tensor);
    b.t = &plan->tensors[tensor];
    b.base = base + s;
    b.trained = trained + s;
    b.carry = carry + fedtiny_wire_delta_offset(plan, tensor);
    b.values = NULL;
    return b;
}

/* A buffer whose sent values are given (flat, buffers back to back: values is the whole plan's). */
static uplink_buffer values_buffer_at(const fedtiny_wire_plan *plan, const int32_t *values, uint16_t tensor) {
    uplink_buffer b;
    uint64_t start = 0;
    uint16_t t;
    for (t = 0; t < tensor; t++) start += elements(&plan->tensors[t]);
    memset(&b, 0, sizeof b);
    b.t = &plan->tensors[tensor];
    b.values = values + start;
    return b;
}

/* state_delta + carry of element e (split_uplink's `total`): int8 buffers in int32 (the caller range-checks it
 * against int16 once), int32 buffers modulo 2^32. */
static int32_t total_at(const uplink_buffer *b, uint64_t e) {
    uint32_t u;
    int32_t v;
    if (b->t->dtype == FEDTINY_WIRE_DTYPE_INT8)
        return state_get(b->trained, b->t, e) - state_get(b->base, b->t, e) + delta_get(b->carry, b->t, e);
    u = (uint32_t)state_get(b->trained, b->t, e) - (uint32_t)state_get(b->base, b->t, e)
        + (uint32_t)delta_get(b->carry, b->t, e);
    memcpy(&v, &u, 4);
    return v;
}

static uint32_t magnitude(int32_t v) { return v < 0 ? 0u - (uint32_t)v : (uint32_t)v; }

/* Which elements split_uplink sends: every |total| > above, and the first `ties` (in index order) with
 * |total| == above. Sending nothing: above = UINT32_MAX, ties = 0. */
typedef struct {
    uint32_t above, ties;
} selection;

static uint64_t count_at_least(const uplink_buffer *b, uint32_t threshold) {
    uint64_t e, n = elements(b->t), count = 0;
    for (e = 0; e < n; e++) count += magnitude(total_at(b, e)) >= threshold;
    return count;
}

/* The largest ceil(keep * nonzero) |totals| (keep = keep_pct / 100 in float64, as Python computes it), found
 * by counting: a binary search for the k-th largest magnitude, no sort, no memory. */
static selection select_sent(const uplink_buffer *b, uint16_t keep_pct) {
    selection s;
    uint64_t e, n = elements(b->t), nonzero = 0, k;
    uint32_t lo = 1, hi = 0;
    double want;
    for (e = 0; e < n; e++) {
        uint32_t m = magnitude(total_at(b, e));
        nonzero += m != 0;
        if (m > hi) hi = m;
    }
    want = ((double)keep_pct / 100.0) * (double)nonzero;
    k = (uint64_t)want;
    if ((double)k < want) k++; /* ceil */
    if (k >= nonzero) { s.above = 0; s.ties = 0; return s; } /* every nonzero element */
    if (k == 0) { s.above = UINT32_MAX; s.ties = 0; return s; }
    while (lo < hi) { /* invariant: at least k magnitudes >= lo, fewer than k > hi */
        uint32_t mid = lo + (hi - lo + 1u) / 2u;
        if (count_at_least(b, mid) >= k) lo = mid;
        else hi = mid - 1u;
    }
    s.above = lo; /* < 2^31 + 1, so lo + 1 does not wrap */
    s.ties = (uint32_t)(k - count_at_least(b, lo + 1u));
    return s;
}

/* The value sent for element e (0 if kept back), before clipping; *ties_taken counts the ties sent so far. */
static int32_t sent_at(const uplink_buffer *b, const selection *s, uint64_t e, uint32_t *ties_taken, int32_t *total) {
    uint32_t m;
    *total = total_at(b, e);
    m = magnitude(*total);
    if (m == 0) return 0;
    if (m > s->above) return *total;
    if (m == s->above && *ties_taken < s->ties) { (*ties_taken)++; return *total; }
    return 0;
}

/* An exact unsigned 128-bit sum of squares, and its float64 value rounded to nearest (as Python's float(int)). */
typedef struct {
    uint64_t hi, lo;
} u128;

static void u128_add(u128 *a, uint64_t v) {
    a->lo += v;
    a->hi += a->lo < v;
}

static double u128_to_double(u128 a) {
    uint64_t top, rest;
    int shift = 0;
    double d;
    if (a.hi == 0) return (double)a.lo;
    while (shift < 64 && (a.hi >> shift) != 0) shift++; /* the bits of hi: 1..64 */
    top = shift == 64 ? a.hi : (a.hi << (64 - shift)) | (a.lo >> shift);
    rest = shift == 64 ? a.lo : a.lo << (64 - shift); /* the bits of lo below top */
    top |= rest != 0; /* sticky bit: 64 > 53 + 1 bits, so it breaks a halfway tie the right way */
    d = (double)top;
    while (shift--) d *= 2.0; /* exact */
    return d;
}

/* update.clip_delta's factor for what is sent (1 and *clip = 0 when nothing is clipped). */
static double clip_factor(const fedtiny_wire_plan *plan, const uint8_t *base, const uint8_t *trained,
                          const uint8_t *carry, uint16_t keep_pct, double clip_norm, int *clip) {
    double squares = 0.0, norm;
    uint16_t tensor;
    *clip = 0;
    if (!(clip_norm > 0.0)) return 1.0; /* 0 (or NaN): no clipping */
    for (tensor = 0; tensor < plan->n_tensors; tensor++) {
        uplink_buffer b = buffer_at(plan, base, trained, carry, tensor);
        selection s = select_sent(&b, keep_pct);
        uint32_t row, ties = 0;
        uint64_t e = 0, k;
        for (row = 0; row < b.t->rows; row++) {
            u128 rowsum = {0, 0};
            double scale = b.t->scales[row];
            for (k = 0; k < b.t->inner; k++, e++) {
                int32_t total, v = sent_at(&b, &s, e, &ties, &total);
                uint64_t m = magnitude(v);
                u128_add(&rowsum, m * m);
            }
            squares += scale * scale * u128_to_double(rowsum);
        }
    }
    norm = sqrt(squares);
    if (norm <= clip_norm) return 1.0;
    *clip = 1;
    return clip_norm / norm;
}

static int32_t clipped(int32_t v, int clip, double factor) {
    return clip ? (int32_t)((double)v * factor) : v; /* C's conversion truncates toward zero, as np.trunc */
}

/* What is sent for element e: the given value, or split_uplink's choice clipped. */
static int32_t sent_value(const uplink_buffer *b, const selection *s, uint64_t e, uint32_t *ties, int clip,
                          double factor) {
    int32_t total;
    if (b->values != NULL) return b->values[e];
    return clipped(sent_at(b, s, e, ties, &total), clip, factor);
}

static uint64_t value_bytes(uint8_t code, uint64_t n) {
    return code == FEDTINY_WIRE_DTYPE_INT4 ? (n + 1u) / 2u : n * (code == FEDTINY_WIRE_DTYPE_INT8 ? 1u
                                                                 : code == FEDTINY_WIRE_DTYPE_INT16 ? 2u : 4u);
}

static void put_value(uint8_t *values, uint8_t code, uint64_t j, int32_t v) {
    switch (code) {
    case FEDTINY_WIRE_DTYPE_INT4: values[j >> 1] |= (uint8_t)(((uint32_t)v & 0x0Fu) << ((j & 1u) * 4u)); break;
    case FEDTINY_WIRE_DTYPE_INT8: values[j] = (uint8_t)(int8_t)v; break;
    case FEDTINY_WIRE_DTYPE_INT16: wr16(values + 2u * j, (uint16_t)(int16_t)v); break;
    default: wr32(values + 4u * j, (uint32_t)v); break;
    }
}

/* state_entries(skip_zero, narrow) for one buffer's clipped sent values: nothing if all are zero, else a
 * bitmap entry or the whole buffer, whichever is smaller (the bitmap on a tie), in the narrowest dtype over
 * the sent values (int4 if they fit [-8, 7]). Writes at out (room bytes); *written = 0 for nothing. */
static int encode_buffer(const uplink_buffer *b, uint16_t tensor, const selection *s, int clip, double factor,
                         uint8_t *out, uint64_t room, uint64_t *written) {
    uint64_t e, n = elements(b->t), nonzero = 0, j, bitmap_bytes, size_sparse, size_whole, size;
    int32_t lo = 0, hi = 0;
    uint32_t ties = 0;
    uint8_t code, *values, *bitmap = NULL;
    int sparse;
    for (e = 0; e < n; e++) {
        int32_t v = sent_value(b, s, e, &ties, clip, factor);
        if (v == 0) continue;
        nonzero++;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
    }
    *written = 0;
    if (nonzero == 0) return FEDTINY_WIRE_OK;
    code = (lo >= -8 && hi <= 7) ? FEDTINY_WIRE_DTYPE_INT4 : (lo >= -128 && hi <= 127) ? FEDTINY_WIRE_DTYPE_INT8
         : (lo >= -32768 && hi <= 32767) ? FEDTINY_WIRE_DTYPE_INT16 : FEDTINY_WIRE_DTYPE_INT32;
    bitmap_bytes = (n + 7u) / 8u;
    size_sparse = up4(bitmap_bytes) + up4(value_bytes(code, nonzero));
    size_whole = up4(value_bytes(code, n));
    sparse = size_sparse <= size_whole;
    size = FEDTINY_WIRE_ENTRY_HEADER_BYTES + (sparse ? size_sparse : size_whole);
    if (size > room) return FEDTINY_WIRE_ERR_BUFFER;
    memset(out, 0, (size_t)size);
    wr16(out, tensor);
    out[2] = code;
    out[3] = (uint8_t)(ENTRY_PLAN_SCALES | (sparse ? ENTRY_BITMAP : 0u));
    wr32(out + 4, 0);
    wr32(out + 8, b->t->rows);
    wr32(out + 12, b->t->inner);
    values = out + FEDTINY_WIRE_ENTRY_HEADER_BYTES;
    if (sparse) {
        bitmap = values;
        values += up4(bitmap_bytes);
    }
    for (e = 0, j = 0, ties = 0; e < n; e++) {
        int32_t v = sent_value(b, s, e, &ties, clip, factor);
        if (sparse) {
            if (v == 0) continue;
            bitmap[e >> 3] |= (uint8_t)(1u << (e & 7u));
        }
        put_value(values, code, j++, v);
    }
    *written = size;
    return FEDTINY_WIRE_OK;
}

/* split_uplink's ValueError first: keep_pct in 1..100, an int8 buffer's delta plus carry within int16. */
static int check_uplink(const fedtiny_wire_plan *plan, const uint8_t *base_state, const uint8_t *trained_state,
                        const uint8_t *carry, uint16_t keep_pct) {
    uint16_t tensor;
    if (keep_pct < 1 || keep_pct > 100) return FEDTINY_WIRE_ERR_ARGUMENT;
    for (tensor = 0; tensor < plan->n_tensors; tensor++) {
        uplink_buffer b = buffer_at(plan, base_state, trained_state, carry, tensor);
        uint64_t e, n = elements(b.t);
        if (b.t->dtype != FEDTINY_WIRE_DTYPE_INT8) continue;
        for (e = 0; e < n; e++) {
            int32_t total = total_at(&b, e);
            if (total < -32768 || total > 32767) return FEDTINY_WIRE_ERR_CARRY_OVERFLOW;
        }
    }
    return FEDTINY_WIRE_OK;
}

/* The new carry: what was not sent, unclipped (split_uplink's `rest`). */
static void update_carry(const fedtiny_wire_plan *plan, const uint8_t *base_state, const uint8_t *trained_state,
                         uint8_t *carry, uint16_t keep_pct) {
    uint16_t tensor;
    for (tensor = 0; tensor < plan->n_tensors; tensor++) {
        uplink_buffer b = buffer_at(plan, base_state, trained_state, carry, tensor);
        selection s = select_sent(&b, keep_pct);
        uint8_t *c = carry + fedtiny_wire_delta_offset(plan, tensor);
        uint64_t e, n = elements(b.t);
        uint32_t ties = 0;
        for (e = 0; e < n; e++) {
            int32_t total, v = sent_at(&b, &s, e, &ties, &total);
            delta_set(c, b.t, e, v != 0 ? 0 : total);
        }
    }
}

/* encode_update: the buffers' entries (from base/trained/carry with keep_pct and the clip factor, or from
 * values when it is not NULL), then the metrics entry, then the headers in front. */
static int encode_body(const fedtiny_wire_plan *plan, const uint8_t *base_state, const uint8_t *trained_state,
                       const uint8_t *carry, const int32_t *values, uint16_t keep_pct, int clip, double factor,
                       uint32_t num_examples, float loss, float accuracy, float personal_accuracy, uint8_t *out,
                       size_t capacity, size_t *out_len) {
    const uint64_t head = FEDTINY_WIRE_DELTA_HEAD_BYTES + FEDTINY_WIRE_BLOB_HEADER_BYTES;
    const uint32_t n_metrics = personal_accuracy >= 0.0f ? 2u : 1u;
    uint64_t at = head, written;
    uint16_t tensor, n_entries = 0;
    int status;
    uint8_t *metrics;

    if (capacity < head) return FEDTINY_WIRE_ERR_BUFFER;
    for (tensor = 0; tensor < plan->n_tensors; tensor++) {
        uplink_buffer b;
        selection s = {0, 0};
        if (values != NULL) {
            b = values_buffer_at(plan, values, tensor);
        } else {
            b = buffer_at(plan, base_state, trained_state, carry, tensor);
            s = select_sent(&b, keep_pct);
        }
        status = encode_buffer(&b, tensor, &s, clip, factor, out + at, capacity - at, &written);
        if (status) return status;
        at += written;
        n_entries += written != 0;
    }
    if (capacity - at < METRICS_ENTRY_BYTES(n_metrics)) return FEDTINY_WIRE_ERR_BUFFER;
    metrics = out + at;
    memset(metrics, 0, METRICS_ENTRY_BYTES(n_metrics));
    wr16(metrics, FEDTINY_WIRE_METRICS_TENSOR); /* metric i = 1 * scale i: int4 ones, a scale each */
    metrics[2] = FEDTINY_WIRE_DTYPE_INT4;
    metrics[3] = n_metrics > 1u ? ENTRY_PER_CHANNEL : 0u; /* one channel: a per-tensor scale */
    wr32(metrics + 8, n_metrics);
    wr32(metrics + 12, 1);
    wrf32(metrics + 16, accuracy);
    if (n_metrics > 1u) wrf32(metrics + 20, personal_accuracy);
    metrics[16 + 4 * n_metrics] = n_metrics > 1u ? 0x11u : 0x01u;
    at += METRICS_ENTRY_BYTES(n_metrics);
    n_entries++;

    wr32(out, num_examples);
    wrf32(out + 4, loss);
    out[8] = MAGIC0;
    out[9] = MAGIC1;
    out[10] = FEDTINY_WIRE_BLOB_VERSION;
    out[11] = 0; /* never deflated: a compressor needs far more RAM than the node spares */
    wr16(out + 12, n_entries);
    wr16(out + 14, 0);
    wr32(out + 16, (uint32_t)(at - head));
    *out_len = (size_t)at;
    return FEDTINY_WIRE_OK;
}

int fedtiny_wire_uplink(const fedtiny_wire_plan *plan, const uint8_t *base_state, const uint8_t *trained_state,
                        uint8_t *carry, uint16_t keep_pct, float clip_norm, uint32_t num_examples, float loss,
                        float accuracy, float personal_accuracy, uint8_t *out, size_t capacity, size_t *out_len) {
    double factor;
    int clip, status = check_uplink(plan, base_state, trained_state, carry, keep_pct);
    if (status) return status;
    factor = clip_factor(plan, base_state, trained_state, carry, keep_pct, (double)clip_norm, &clip);
    status = encode_body(plan, base_state, trained_state, carry, NULL, keep_pct, clip, factor, num_examples, loss,
                         accuracy, personal_accuracy, out, capacity, out_len);
    if (status) return status;
    update_carry(plan, base_state, trained_state, carry, keep_pct); /* last: an error above leaves it as it was */
    return FEDTINY_WIRE_OK;
}

int fedtiny_wire_uplink_values(const fedtiny_wire_plan *plan, const uint8_t *base_state, const uint8_t *trained_state,
                               uint8_t *carry, uint16_t keep_pct, float clip_norm, int32_t *values) {
    double factor;
    uint16_t tensor;
    uint64_t k = 0;
    int clip, status = check_uplink(plan, base_state, trained_state, carry, keep_pct);
    if (status) return status;
    factor = clip_factor(plan, base_state, trained_state, carry, keep_pct, (double)clip_norm, &clip);
    for (tensor = 0; tensor < plan->n_tensors; tensor++) {
        uplink_buffer b = buffer_at(plan, base_state, trained_state, carry, tensor);
        selection s = select_sent(&b, keep_pct);
        uint64_t e, n = elements(b.t);
        uint32_t ties = 0;
        for (e = 0; e < n; e++) values[k++] = sent_value(&b, &s, e, &ties, clip, factor);
    }
    update_carry(plan, base_state, trained_state, carry, keep_pct);
    return FEDTINY_WIRE_OK;
}

int fedtiny_wire_encode_values(const fedtiny_wire_plan *plan, const int32_t *values, uint32_t num_examples,
                               float loss, float accuracy, float personal_accuracy, uint8_t *out, size_t capacity,
                               size_t *out_len) {
    return encode_body(plan, NULL, NULL, NULL, values, 100u, 0, 1.0, num_examples, loss, accuracy,
                       personal_accuracy, out, capacity, out_len);
}

uint32_t fedtiny_wire_elements(const fedtiny_wire_plan *plan) {
    uint64_t n = 0;
    uint16_t t;
    for (t = 0; t < plan->n_tensors; t++) n += elements(&plan->tensors[t]);
    return (uint32_t)n;
}

/* --- differential privacy noise: protocol/noise.py --------------------------------------------------------------
 * Exact discrete Gaussian integers (Canonne, Kamath, Steinke 2020, Algorithms 1-3) in integer arithmetic: every
 * Bernoulli(exp(-n/d)) is decided on uniform integers below bounds of up to 128 bits, drawn from the caller's
 * 64-bit words exactly as noise.uniform_below draws them. */

static uint64_t noise_word(fedtiny_noise_source *src) {
    src->used++;
    return src->word(src->ctx);
}

static int u128_lt(u128 a, u128 b) { return a.hi < b.hi || (a.hi == b.hi && a.lo < b.lo); }

static u128 u128_of(uint64_t v) {
    u128 r;
    r.hi = 0;
    r.lo = v;
    return r;
}

static u128 u128_sub(u128 a, u128 b) {
    u128 r;
    r.lo = a.lo - b.lo;
    r.hi = a.hi - b.hi - (a.lo < b.lo);
    return r;
}

/* a * b, exact, from 32-bit halves (a Cortex-M4 has no 128-bit type) */
static u128 u128_mul64(uint64_t a, uint64_t b) {
    const uint64_t a0 = (uint32_t)a, a1 = a >> 32, b0 = (uint32_t)b, b1 = b >> 32;
    const uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    const uint64_t mid = (p00 >> 32) + (uint32_t)p01 + (uint32_t)p10;
    u128 r;
    r.lo = (mid << 32) | (uint32_t)p00;
    r.hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
    return r;
}

/* a * k into *out; 0 if it does not fit 128 bits */
static int u128_mul_small(u128 a, uint64_t k, u128 *out) {
    const u128 lo = u128_mul64(a.lo, k), hi = u128_mul64(a.hi, k);
    if (hi.hi != 0) return 0;
    out->lo = lo.lo;
    out->hi = lo.hi + hi.lo;
    return out->hi >= hi.lo;
}

static int u128_bits(u128 a) {
    int bits = 0;
    if (a.hi) {
        bits = 64;
        a.lo = a.hi;
    }
    while (a.lo) {
        bits++;
        a.lo >>= 1;
    }
    return bits;
}

/* noise.uniform_below: (bits + 63) / 64 words, the first the least significant, masked, rejected if >= bound */
static u128 noise_uniform_below(fedtiny_noise_source *src, u128 bound) {
    const int bits = u128_bits(u128_sub(bound, u128_of(1)));
    if (bits == 0) return u128_of(0);
    for (;;) {
        u128 x = u128_of(noise_word(src));
        if (bits > 64) {
            x.hi = noise_word(src);
            if (bits < 128) x.hi &= (UINT64_C(1) << (bits - 64)) - 1u;
        } else if (bits < 64) {
            x.lo &= (UINT64_C(1) << bits) - 1u;
        }
        if (u128_lt(x, bound)) return x;
    }
}

/* noise.bernoulli_exp_fraction: exp(-n/d) for n <= d */
static int noise_bernoulli_exp_fraction(fedtiny_noise_source *src, u128 n, u128 d, int *result) {
    uint64_t k = 1;
    for (;;) {
        u128 dk;
        if (!u128_mul_small(d, k, &dk)) return FEDTINY_WIRE_ERR_ARGUMENT;
        if (!u128_lt(noise_uniform_below(src, dk), n)) break;
        k++;
    }
    *result = (int)(k & 1u);
    return FEDTINY_WIRE_OK;
}

/* noise.bernoulli_exp: exp(-n/d) for any n, d >= 1 */
static int noise_bernoulli_exp(fedtiny_noise_source *src, u128 n, u128 d, int *result) {
    int status;
    while (u128_lt(d, n)) {
        status = noise_bernoulli_exp_fraction(src, u128_of(1), u128_of(1), result);
        if (status || !*result) return status;
        n = u128_sub(n, d);
    }
    return noise_bernoulli_exp_fraction(src, n, d, result);
}

/* noise.discrete_laplace: P[x] ~ exp(-|x| / t) */
static int noise_discrete_laplace(fedtiny_noise_source *src, uint64_t t, int64_t *out) {
    for (;;) {
        const uint64_t u = noise_uniform_below(src, u128_of(t)).lo;
        uint64_t v = 0, x;
        int keep, more, negative, status = noise_bernoulli_exp(src, u128_of(u), u128_of(t), &keep);
        if (status) return status;
        if (!keep) continue;
        for (;;) {
            status = noise_bernoulli_exp(src, u128_of(1), u128_of(1), &more);
            if (status) return status;
            if (!more) break;
            v++;
        }
        if (v > (UINT64_C(0x7FFFFFFFFFFFFFFF) - u) / t) return FEDTINY_WIRE_ERR_ARGUMENT;
        x = u + t * v;
        negative = noise_uniform_below(src, u128_of(2)).lo == 1u;
        if (negative && x == 0) continue;
        *out = negative ? -(int64_t)x : (int64_t)x;
        return FEDTINY_WIRE_OK;
    }
}

static uint64_t isqrt64(uint64_t v) {
    uint64_t root = 0, bit = UINT64_C(1) << 62;
    while (bit > v) bit >>= 2;
    while (bit) {
        if (v >= root + bit) {
            v -= root + bit;
            root = (root >> 1) + bit;
        } else {
            root >>= 1;
        }
        bit >>= 2;
    }
    return root;
}

int fedtiny_wire_discrete_gaussian(fedtiny_noise_source *src, uint64_t sigma2, int64_t *out) {
    uint64_t t;
    if (sigma2 < 1 || sigma2 > FEDTINY_NOISE_MAX_SIGMA2) return FEDTINY_WIRE_ERR_ARGUMENT;
    t = isqrt64(sigma2) + 1u;
    for (;;) {
        int64_t y;
        uint64_t magnitude_t, distance;
        int keep, status = noise_discrete_laplace(src, t, &y);
        if (status) return status;
        if ((uint64_t)(y < 0 ? -y : y) > UINT64_C(0x7FFFFFFFFFFFFFFF) / t) return FEDTINY_WIRE_ERR_ARGUMENT;
        magnitude_t = (uint64_t)(y < 0 ? -y : y) * t;
        distance = magnitude_t > sigma2 ? magnitude_t - sigma2 : sigma2 - magnitude_t;
        status = noise_bernoulli_exp(src, u128_mul64(distance, distance), u128_mul64(2u * sigma2 * t, t), &keep);
        if (status) return status;
        if (keep) {
            *out = y;
            return FEDTINY_WIRE_OK;
        }
    }
}

int fedtiny_wire_row_sigma2(double sigma, double scale, uint64_t *out) {
    const double s = sigma / scale, s2 = s * s;
    uint64_t c;
    if (!(s2 <= (double)FEDTINY_NOISE_MAX_SIGMA2)) return FEDTINY_WIRE_ERR_ARGUMENT; /* also NaN */
    c = (uint64_t)s2;
    if ((double)c < s2) c++; /* ceil: never less noise than asked */
    *out = c < 1u ? 1u : c;
    return FEDTINY_WIRE_OK;
}
