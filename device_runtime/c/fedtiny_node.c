/* The node's protocol session: see fedtiny_node.h and fedtiny/protocol/device.py, which this mirrors. */
#include "fedtiny_node.h"

#include <string.h>

#include "fedtiny_noise.h"
#include "fedtiny_profile.h"

/* ---- little helpers ---------------------------------------------------------------------------------------- */

static uint32_t load32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint16_t load16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

/* topics.NAME_PATTERN: 1-64 of [A-Za-z0-9_.-], starting alphanumeric */
static int valid_name(const char *name)
{
    size_t i;
    if (name == NULL) {
        return 0;
    }
    for (i = 0; name[i] != '\0'; i++) {
        char c = name[i];
        int alnum = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (i >= FEDTINY_NODE_NAME_MAX || !(alnum || (i > 0 && (c == '_' || c == '.' || c == '-')))) {
            return 0;
        }
    }
    return i > 0;
}

/* "fedtiny/" fleet "/" kind ["/" device]: the lengths are bounded by valid_name and FEDTINY_NODE_TOPIC_MAX */
static void make_topic(char *out, const char *fleet, const char *kind, const char *device)
{
    const char *parts[5];
    size_t i, n = 0;
    parts[0] = "fedtiny/";
    parts[1] = fleet;
    parts[2] = kind;
    parts[3] = device != NULL ? "/" : "";
    parts[4] = device != NULL ? device : "";
    for (i = 0; i < 5; i++) {
        size_t len = strlen(parts[i]);
        memcpy(out + n, parts[i], len);
        n += len;
    }
    out[n] = '\0';
}

const char *fedtiny_node_reason(int status)
{
    if (status == FEDTINY_NODE_OK) {
        return "ok";
    }
    if (status == FEDTINY_NODE_JOB) {
        return "job";
    }
    if (status <= -400) {
        return fedtiny_secagg_reason(status + 400);
    }
    if (status <= -300) {
        switch (status) {
        case FEDTINY_NODE_ERR_ARGUMENT: return "argument";
        case FEDTINY_NODE_ERR_BAD_TOPIC: return "bad-topic";
        case FEDTINY_NODE_ERR_WRONG_TOPIC: return "wrong-topic";
        case FEDTINY_NODE_ERR_OVERSIZED: return "oversized";
        case FEDTINY_NODE_ERR_PERSIST: return "persist";
        case FEDTINY_NODE_ERR_PUBLISH: return "publish";
        default: return "unknown";
        }
    }
    if (status <= -200) {
        return fedtiny_wire_reason(status + 200);
    }
    if (status <= -100) {
        return fedtiny_chunk_reason(status);
    }
    return fedtiny_env_reason(status);
}

/* ---- sizes ------------------------------------------------------------------------------------------------- */

/* Unencrypted downlinks: header, body, signature. */
#define MAX_TASK_ENVELOPE (FEDTINY_ENV_HEADER_BYTES + FEDTINY_WIRE_TASK_HEAD_BYTES + FEDTINY_WIRE_TASK_MAX_CONFIG + \
                           FEDTINY_ENV_SIGNATURE_BYTES)
#define MAX_ACK_ENVELOPE (FEDTINY_ENV_HEADER_BYTES + FEDTINY_WIRE_ACK_MAX_BYTES + FEDTINY_ENV_SIGNATURE_BYTES)

/* The FULL_STATE GLOBAL_UPDATE: every buffer whole in its own type, i.e. the state layout, one entry header each.
 * The coordinator never sends a larger one (update.global_update). */
static uint32_t max_global_update_envelope(const fedtiny_node_plan *plan)
{
    return FEDTINY_ENV_SEALED_BYTES(FEDTINY_WIRE_GLOBAL_UPDATE_HEAD_BYTES + FEDTINY_WIRE_BLOB_HEADER_BYTES +
                                    FEDTINY_WIRE_ENTRY_HEADER_BYTES * (uint32_t)plan->wire->n_tensors +
                                    fedtiny_wire_state_bytes(plan->wire));
}

uint32_t fedtiny_node_max_downlink_bytes(const fedtiny_node_plan *plan)
{
    uint32_t most = max_global_update_envelope(plan);
    most = most > MAX_TASK_ENVELOPE ? most : MAX_TASK_ENVELOPE;
    return most > MAX_ACK_ENVELOPE ? most : MAX_ACK_ENVELOPE;
}

void fedtiny_node_sizes_of(const fedtiny_node_plan *plan, uint32_t chunk_size, fedtiny_node_sizes *sizes)
{
    sizes->global_state = fedtiny_wire_state_bytes(plan->wire);
    sizes->carry = fedtiny_wire_delta_bytes(plan->wire);
    sizes->upload = FEDTINY_ENV_SEALED_BYTES(fedtiny_wire_uplink_bytes_max(plan->wire));
    sizes->reassembly = max_global_update_envelope(plan) + MAX_TASK_ENVELOPE; /* a TASK behind a GLOBAL_UPDATE */
    sizes->bitmap = FEDTINY_CHUNK_BITMAP_BYTES(sizes->reassembly);
    sizes->frame = chunk_size;
    sizes->values = 4u * fedtiny_wire_elements(plan->wire);
}

void fedtiny_node_sizes_secagg_of(const fedtiny_node_plan *plan, uint32_t chunk_size, fedtiny_node_sizes *sizes)
{
    uint32_t masked = FEDTINY_ENV_SEALED_BYTES(fedtiny_node_secagg_masked_bytes_max(plan->wire));
    uint32_t stage = FEDTINY_NODE_SECAGG_MAX_DOWNLINK + MAX_TASK_ENVELOPE;
    fedtiny_node_sizes_of(plan, chunk_size, sizes);
    sizes->upload = sizes->upload > masked ? sizes->upload : masked;
    sizes->reassembly = sizes->reassembly > stage ? sizes->reassembly : stage;
    sizes->bitmap = FEDTINY_CHUNK_BITMAP_BYTES(sizes->reassembly);
}

static int secagg_on(const fedtiny_node *node)
{
    return node->config.secagg != NULL && node->config.peers != NULL;
}

void fedtiny_node_state_fresh(fedtiny_node_state *state)
{
    memset(state, 0, sizeof *state);
    state->trained_round = -1;
}

/* ---- start ------------------------------------------------------------------------------------------------- */

static int holds(const uint8_t *buffer, uint32_t capacity, uint32_t needed)
{
    return buffer != NULL && capacity >= needed;
}

static void restore_stream(fedtiny_env_stream *stream, const fedtiny_node_position *position)
{
    memset(stream, 0, sizeof *stream);
    stream->accepted_any = position->accepted_any;
    stream->last_run = position->run;
    stream->last_round = position->round;
    stream->last_seq = position->seq;
}

int fedtiny_node_init(fedtiny_node *node, const fedtiny_node_config *config, const fedtiny_node_state *state)
{
    const fedtiny_node_config *c = config;
    fedtiny_node_sizes need;
    memset(node, 0, sizeof *node);
    if (c->plan == NULL || c->plan->wire == NULL || fedtiny_wire_plan_check(c->plan->wire) != FEDTINY_WIRE_OK ||
        !valid_name(c->fleet) || !valid_name(c->device) || c->identity == NULL || c->coordinator_public == NULL ||
        c->chunk_size < FEDTINY_CHUNK_MIN_PAYLOAD || c->chunk_size > FEDTINY_CHUNK_MAX_PAYLOAD ||
        c->publish == NULL || c->persist == NULL) {
        return FEDTINY_NODE_ERR_ARGUMENT;
    }
    if (c->secagg != NULL && c->peers != NULL) {
        if (c->values == NULL) {
            return FEDTINY_NODE_ERR_ARGUMENT; /* masking works in the values buffer */
        }
        fedtiny_node_sizes_secagg_of(c->plan, c->chunk_size, &need);
    } else {
        fedtiny_node_sizes_of(c->plan, c->chunk_size, &need);
    }
    if (!holds(c->global_state, c->capacity.global_state, need.global_state) ||
        !holds(c->carry, c->capacity.carry, need.carry) || !holds(c->upload, c->capacity.upload, need.upload) ||
        !holds(c->reassembly, c->capacity.reassembly, need.reassembly) ||
        !holds(c->bitmap, c->capacity.bitmap, need.bitmap) || !holds(c->frame, c->capacity.frame, need.frame)) {
        return FEDTINY_NODE_ERR_ARGUMENT;
    }
    if (state->upload_len != 0u &&
        (state->upload_len < FEDTINY_ENV_HEADER_BYTES || state->upload_len > c->capacity.upload ||
         state->upload_chunk < FEDTINY_CHUNK_MIN_PAYLOAD || state->upload_chunk > c->capacity.frame)) {
        return FEDTINY_NODE_ERR_ARGUMENT; /* an upload this node cannot send again */
    }
    if (c->values != NULL && c->capacity.values < need.values) {
        return FEDTINY_NODE_ERR_ARGUMENT;
    }
    if (state->personal > 1u || (state->personal && c->personal == NULL)) {
        return FEDTINY_NODE_ERR_ARGUMENT; /* a personalised model with nowhere to hold it */
    }
    if (fedtiny_env_node_init(&node->keys, c->fleet_id, c->device_id, c->identity, c->coordinator_public) !=
        FEDTINY_ENV_OK) {
        return FEDTINY_NODE_ERR_ARGUMENT;
    }
    node->config = *c;
    node->state = *state;
    node->max_downlink_bytes = fedtiny_node_max_downlink_bytes(c->plan);
    fedtiny_reassembler_init(&node->reassembler, c->reassembly, need.reassembly, c->bitmap,
                             FEDTINY_NODE_REASSEMBLY_TTL_MS);
    restore_stream(&node->replay.addressed, &state->replay[0]);
    restore_stream(&node->replay.broadcast, &state->replay[1]);
    make_topic(node->up_topic, c->fleet, "/up", c->device);
    make_topic(node->status_topic, c->fleet, "/status", c->device);
    make_topic(node->down_topic, c->fleet, "/down", c->device);
    make_topic(node->bcast_topic, c->fleet, "/bcast", NULL);
    return FEDTINY_NODE_OK;
}

void fedtiny_node_wipe(fedtiny_node *node)
{
    fedtiny_env_node_wipe(&node->keys);
}

const char *fedtiny_node_topic_name(const fedtiny_node *node, fedtiny_node_topic kind)
{
    switch (kind) {
    case FEDTINY_NODE_TOPIC_UP: return node->up_topic;
    case FEDTINY_NODE_TOPIC_STATUS: return node->status_topic;
    case FEDTINY_NODE_TOPIC_DOWN: return node->down_topic;
    case FEDTINY_NODE_TOPIC_BCAST: return node->bcast_topic;
    default: return "";
    }
}

/* ---- sending ----------------------------------------------------------------------------------------------- */

static int persist(fedtiny_node *node)
{
    fedtiny_node_persisted p;
    p.state = &node->state;
    p.global_state = node->config.global_state;
    p.global_state_bytes = fedtiny_wire_state_bytes(node->config.plan->wire);
    p.carry = node->config.carry;
    p.carry_bytes = fedtiny_wire_delta_bytes(node->config.plan->wire);
    p.upload = node->config.upload;
    p.personal = node->config.personal;
    p.personal_bytes = node->state.personal ? p.global_state_bytes : 0u;
    return node->config.persist(node->config.context, &p) == 0 ? FEDTINY_NODE_OK : FEDTINY_NODE_ERR_PERSIST;
}

int fedtiny_node_persist(fedtiny_node *node)
{
    return persist(node);
}

/* Take the next seq and persist it: it is on flash before the message exists (device.py _seal). */
static int next_seq(fedtiny_node *node, uint32_t *seq)
{
    *seq = node->state.seq;
    node->state.seq = *seq + 1u;
    return persist(node);
}

/* Where a small message's body is encoded: in `out`, after the chunk header and the envelope header, so that
 * it is sealed and framed in place. */
static uint8_t *small_body(uint8_t *out)
{
    return out + FEDTINY_CHUNK_HEADER_BYTES + FEDTINY_ENV_HEADER_BYTES;
}

/* Seal the body at small_body(out) and make it the one frame it always is (the largest, a JOIN, is 148 bytes of
 * envelope; a frame carries at least 232). The seq is persisted first. */
static int seal_small(fedtiny_node *node, uint8_t type, uint16_t flags, uint32_t round, uint32_t model_version,
                      uint32_t body_len, uint8_t *out, size_t capacity, size_t *frame_len)
{
    uint8_t *envelope = out + FEDTINY_CHUNK_HEADER_BYTES;
    size_t envelope_len;
    uint32_t seq;
    int status = next_seq(node, &seq);
    if (status != FEDTINY_NODE_OK) {
        return status;
    }
    status = fedtiny_env_seal(&node->keys, type, flags, node->state.run, round, model_version, seq,
                              small_body(out), body_len, envelope, capacity - FEDTINY_CHUNK_HEADER_BYTES,
                              &envelope_len);
    if (status != FEDTINY_ENV_OK) {
        return status;
    }
    return fedtiny_chunk_frame(envelope, (uint32_t)envelope_len, seq, node->config.chunk_size, 0u, out, capacity,
                               frame_len);
}

static int publish(fedtiny_node *node, fedtiny_node_topic kind, const uint8_t *frame, size_t length, int retain)
{
    return node->config.publish(node->config.context, kind, fedtiny_node_topic_name(node, kind), frame, length,
                                retain) == 0 ? FEDTINY_NODE_OK : FEDTINY_NODE_ERR_PUBLISH;
}

/* device.py _status: a STATUS sealed in the frame buffer (or out) */
static int seal_status(fedtiny_node *node, int64_t now_ms, uint8_t device_state, uint16_t flags, uint8_t *out,
                       size_t capacity, size_t *frame_len)
{
    fedtiny_wire_status_body body;
    size_t body_len;
    int64_t uptime = (now_ms - node->config.started_ms) / 1000;
    int status;
    body.state = device_state;
    body.battery_pct = 255u;
    body.uptime_s = uptime < 0 ? 0u : uptime > (int64_t)UINT32_MAX ? UINT32_MAX : (uint32_t)uptime;
    body.free_memory_bytes = node->config.plan->free_memory_bytes;
    body.next_wake_s = 0u;
    if (capacity < FEDTINY_CHUNK_HEADER_BYTES + FEDTINY_ENV_SEALED_BYTES(FEDTINY_WIRE_STATUS_BYTES)) {
        return FEDTINY_NODE_ERR_ARGUMENT;
    }
    status = fedtiny_wire_encode_status(&body, small_body(out), FEDTINY_WIRE_STATUS_BYTES, &body_len);
    if (status != FEDTINY_WIRE_OK) {
        return FEDTINY_NODE_FROM_WIRE(status);
    }
    return seal_small(node, FEDTINY_MSG_STATUS, flags, node->state.round, node->state.model_version,
                      (uint32_t)body_len, out, capacity, frame_len);
}

/* device.py _join, sealed into the frame buffer (not yet published) */
static int seal_join(fedtiny_node *node, size_t *frame_len)
{
    fedtiny_wire_join join;
    size_t body_len;
    int status;
    join.memory_budget_bytes = node->config.plan->arena_bytes;
    join.flash_budget_bytes = node->config.plan->flash_bytes;
    join.max_mqtt_payload = node->config.chunk_size;
    join.features = FEDTINY_WIRE_FEATURE_MQTT5 | (secagg_on(node) ? FEDTINY_WIRE_FEATURE_SECURE_AGGREGATION : 0u);
    join.plan_version = FEDTINY_NODE_PLAN_VERSION;
    memcpy(join.plan_hash, node->config.plan->hash, sizeof join.plan_hash);
    status = fedtiny_wire_encode_join(&join, small_body(node->config.frame), FEDTINY_WIRE_JOIN_BYTES, &body_len);
    if (status != FEDTINY_WIRE_OK) {
        return FEDTINY_NODE_FROM_WIRE(status);
    }
    return seal_small(node, FEDTINY_MSG_JOIN, 0u, node->state.round, node->state.model_version,
                      (uint32_t)body_len, node->config.frame, node->config.capacity.frame, frame_len);
}

/* Seal the small message the frame buffer holds a body for, then publish it. */
static int send_join(fedtiny_node *node)
{
    size_t frame_len;
    int status = seal_join(node, &frame_len);
    return status != FEDTINY_NODE_OK ? status
                                     : publish(node, FEDTINY_NODE_TOPIC_UP, node->config.frame, frame_len, 0);
}

/* device.py _upload_frames: the frames `indexes` (all of them if NULL) of the sealed upload, one at a time;
 * indexes past the last frame are left out. */
static int send_upload(fedtiny_node *node, int64_t now_ms, const uint32_t *indexes, uint32_t n_indexes,
                       uint32_t *sent)
{
    const uint8_t *upload = node->config.upload;
    uint32_t transfer_id = load32(upload + 24); /* the envelope header's seq */
    uint32_t count = fedtiny_chunk_count(node->state.upload_len, node->state.upload_chunk);
    uint32_t i, n = indexes == NULL ? count : n_indexes;
    node->upload_sent = 1u;
    node->upload_sent_at = now_ms;
    *sent = 0u;
    for (i = 0; i < n; i++) {
        uint32_t index = indexes == NULL ? i : indexes[i];
        size_t frame_len;
        int status;
        if (index >= count) {
            continue;
        }
        status = fedtiny_chunk_frame(upload, node->state.upload_len, transfer_id, node->state.upload_chunk, index,
                                     node->config.frame, node->config.capacity.frame, &frame_len);
        if (status == FEDTINY_CHUNK_OK) {
            status = publish(node, FEDTINY_NODE_TOPIC_UP, node->config.frame, frame_len, 0);
        }
        if (status != FEDTINY_NODE_OK) {
            return status;
        }
        (*sent)++;
    }
    return FEDTINY_NODE_OK;
}

int fedtiny_node_heartbeat(fedtiny_node *node, int64_t now_ms, uint8_t device_state)
{
    size_t frame_len;
    int status = seal_status(node, now_ms, device_state, 0u, node->config.frame, node->config.capacity.frame,
                             &frame_len);
    return status != FEDTINY_NODE_OK ? status
                                     : publish(node, FEDTINY_NODE_TOPIC_STATUS, node->config.frame, frame_len, 1);
}

int fedtiny_node_last_will(fedtiny_node *node, int64_t now_ms, uint8_t *out, size_t capacity, size_t *out_len)
{
    return seal_status(node, now_ms, FEDTINY_WIRE_DEVICE_OFFLINE, FEDTINY_ENV_FLAG_LAST_WILL, out, capacity,
                       out_len);
}

int fedtiny_node_on_connect(fedtiny_node *node, int64_t now_ms)
{
    int status = FEDTINY_NODE_OK;
    uint32_t sent;
    /* With an upload not yet acknowledged the JOIN waits for its ACK: a JOIN is newer in the same replay
     * stream, after which the coordinator would refuse the older DELTA as stale. */
    if (node->state.upload_len == 0u) {
        status = send_join(node);
    }
    if (status == FEDTINY_NODE_OK) {
        status = fedtiny_node_heartbeat(node, now_ms, FEDTINY_WIRE_DEVICE_IDLE);
    }
    if (status == FEDTINY_NODE_OK && node->state.upload_len != 0u && !node->upload_sent) {
        status = send_upload(node, now_ms, NULL, 0u, &sent); /* after a restart: sent whole once */
    }
    return status;
}

int fedtiny_node_leave(fedtiny_node *node)
{
    size_t body_len, frame_len;
    int status = fedtiny_wire_encode_leave(0u, small_body(node->config.frame), FEDTINY_WIRE_LEAVE_BYTES, &body_len);
    if (status != FEDTINY_WIRE_OK) {
        return FEDTINY_NODE_FROM_WIRE(status);
    }
    status = seal_small(node, FEDTINY_MSG_LEAVE, 0u, node->state.round, node->state.model_version,
                        (uint32_t)body_len, node->config.frame, node->config.capacity.frame, &frame_len);
    return status != FEDTINY_NODE_OK ? status
                                     : publish(node, FEDTINY_NODE_TOPIC_UP, node->config.frame, frame_len, 0);
}

int fedtiny_node_tick(fedtiny_node *node, int64_t now_ms)
{
    uint32_t sent;
    if (node->state.upload_len != 0u && node->upload_sent &&
        now_ms - node->upload_sent_at > node->config.ack_timeout_ms) {
        return send_upload(node, now_ms, NULL, 0u, &sent);
    }
    return FEDTINY_NODE_OK;
}

/* ---- receiving --------------------------------------------------------------------------------------------- */

/* envelope.Header.unpack's checks, in its order: what a payload must pass before its ids are compared with the
 * topic it came on (topics.check_topic_matches runs before the envelope is opened). */
static int check_header(const uint8_t *payload, uint32_t length)
{
    uint16_t flags;
    if (length < FEDTINY_ENV_HEADER_BYTES) {
        return FEDTINY_ENV_ERR_TRUNCATED;
    }
    if (payload[0] != 'F' || payload[1] != 'T') {
        return FEDTINY_ENV_ERR_BAD_MAGIC;
    }
    if (payload[2] != FEDTINY_ENV_VERSION) {
        return FEDTINY_ENV_ERR_BAD_VERSION;
    }
    flags = load16(payload + 4);
    if (flags & ~(uint16_t)(FEDTINY_ENV_FLAG_DOWNLINK | FEDTINY_ENV_FLAG_ENCRYPTED | FEDTINY_ENV_FLAG_MASKED |
                            FEDTINY_ENV_FLAG_LAST_WILL)) {
        return FEDTINY_ENV_ERR_BAD_FLAGS;
    }
    if (payload[3] < FEDTINY_MSG_JOIN || payload[3] > FEDTINY_MSG_SECAGG_REVEAL) {
        return FEDTINY_ENV_ERR_BAD_TYPE;
    }
    return FEDTINY_ENV_OK;
}

static int next_job(const fedtiny_node *node, fedtiny_node_job *job)
{
    const fedtiny_node_task *task = &node->state.pending_task;
    if (!task->present || node->state.upload_len != 0u || task->model_version != node->state.model_version) {
        return FEDTINY_NODE_OK; /* nothing to do, an upload still in flight, or waiting for the GLOBAL_UPDATE */
    }
    if (secagg_on(node) && node->config.secagg->trained && node->config.secagg->job_round == task->round) {
        return FEDTINY_NODE_OK; /* trained already: its masked DELTA waits for the neighbours' shares */
    }
    job->round = task->round;
    job->model_version = task->model_version;
    job->epochs = task->epochs;
    job->steps = task->steps;
    job->uplink_keep_pct = task->uplink_keep_pct;
    job->clip_norm = task->clip_norm;
    job->noise_sigma = task->noise_sigma;
    job->masked = task->masked;
    return FEDTINY_NODE_JOB;
}

/* device.py _new_run: an authentic downlink from a newer coordinator run. The unacknowledged upload is dropped
 * (the old run will never aggregate it); the model and the error-feedback carry are kept. */
static void new_run(fedtiny_node *node, uint16_t run)
{
    node->state.run = run;
    node->state.round = 0u;
    node->state.trained_round = -1;
    node->state.pending_task.present = 0u;
    node->state.upload_len = 0u;
    node->upload_sent = 0u;
}

static void keep_position(fedtiny_node_position *position, const fedtiny_env_header *header)
{
    position->accepted_any = 1u;
    position->run = header->run;
    position->round = header->round;
    position->seq = header->seq;
}

/* What a downlink makes the node send, once its state is persisted. */
enum { SEND_NOTHING, SEND_FRAME, SEND_MISSING, SEND_STAGE, SEND_UPLOAD };

static int is_stage_downlink(uint8_t type)
{
    return type == FEDTINY_MSG_SECAGG_PEERS || type == FEDTINY_MSG_SECAGG_RELAY || type == FEDTINY_MSG_SECAGG_UNMASK;
}

/* Seal the stage body at secagg->stage + header in place, the seq persisted first (device.py _seal). */
static int seal_stage(fedtiny_node *node, uint8_t type, uint32_t round, size_t body_len)
{
    fedtiny_node_secagg *sa = node->config.secagg;
    size_t envelope_len;
    uint32_t seq;
    int status = next_seq(node, &seq);
    if (status != FEDTINY_NODE_OK) {
        return status;
    }
    return fedtiny_env_seal(&node->keys, type, 0u, node->state.run, round, node->state.model_version, seq,
                            sa->stage + FEDTINY_ENV_HEADER_BYTES, (uint32_t)body_len, sa->stage, sizeof sa->stage,
                            &envelope_len);
}

/* The sealed stage uplink, frame by frame (device.py _frames: transfer id = its seq). */
static int send_stage(fedtiny_node *node)
{
    const uint8_t *envelope = node->config.secagg->stage;
    const uint32_t length = FEDTINY_ENV_HEADER_BYTES + load32(envelope + 28) + FEDTINY_ENV_SIGNATURE_BYTES;
    const uint32_t count = fedtiny_chunk_count(length, node->config.chunk_size);
    uint32_t i;
    for (i = 0; i < count; i++) {
        size_t frame_len;
        int status = fedtiny_chunk_frame(envelope, length, load32(envelope + 24), node->config.chunk_size, i,
                                         node->config.frame, node->config.capacity.frame, &frame_len);
        if (status == FEDTINY_CHUNK_OK) {
            status = publish(node, FEDTINY_NODE_TOPIC_UP, node->config.frame, frame_len, 0);
        }
        if (status != FEDTINY_NODE_OK) {
            return status;
        }
    }
    return FEDTINY_NODE_OK;
}

static int seal_upload(fedtiny_node *node, uint32_t round, uint32_t model_version, uint16_t flags, size_t body_len);

/* Where a masked round's new carry waits for the relay: the upload buffer's body, unused until the masked DELTA is
 * sealed there (no upload is in flight while a job runs). The carry changes only in the save of the DELTA it
 * belongs to (device.py _upload): a round whose relay never comes leaves it as it was, as in Python. */
static uint8_t *held_carry(const fedtiny_node_config *c)
{
    return c->upload + FEDTINY_ENV_HEADER_BYTES; /* fits: the upload body holds a dense delta (uplink_bytes_max) */
}

/* device.py _send_masked: the masked DELTA of the held values once the relay has come, sealed as the upload */
static int seal_masked(fedtiny_node *node)
{
    const fedtiny_node_config *c = &node->config;
    fedtiny_node_secagg *sa = c->secagg;
    size_t body_len;
    int status;
    /* the round's carry (masked_uplink) before the body overwrites it; persisted with the DELTA by seal_upload
     * (masking fails only in a buffer smaller than fedtiny_node_sizes_secagg_of, which the configuration refuses) */
    memcpy(c->carry, held_carry(c), fedtiny_wire_delta_bytes(c->plan->wire));
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_CRYPTO); /* secure aggregation's steps count as the node's crypto */
    status = fedtiny_node_secagg_masked(sa, c->plan->wire, c->values, c->upload + FEDTINY_ENV_HEADER_BYTES,
                                        c->capacity.upload - FEDTINY_ENV_SEALED_BYTES(0u), &body_len);
    FEDTINY_PROFILE_LEAVE();
    if (status != FEDTINY_SECAGG_OK) {
        return FEDTINY_NODE_FROM_SECAGG(status);
    }
    sa->trained = 0u;
    return seal_upload(node, sa->job_round, sa->job_model_version, FEDTINY_ENV_FLAG_MASKED, body_len);
}

int fedtiny_node_receive(fedtiny_node *node, const char *topic, uint8_t *frame, size_t length, int64_t now_ms,
                         fedtiny_node_job *job)
{
    const fedtiny_node_config *c = &node->config;
    fedtiny_chunk_result chunk;
    fedtiny_env_header header;
    fedtiny_wire_task task;
    fedtiny_wire_settings settings;
    fedtiny_wire_ack ack;
    uint8_t *payload, *body;
    uint8_t source;
    uint32_t body_len, sent;
    size_t frame_len = 0;
    int status, for_this_plan = 0, applied = 0, can_mask = 0, action = SEND_NOTHING;

    if (strcmp(topic, node->down_topic) == 0) {
        source = 0u;
    } else if (strcmp(topic, node->bcast_topic) == 0) {
        source = 1u;
    } else {
        return FEDTINY_NODE_ERR_BAD_TOPIC;
    }
    status = fedtiny_reassembler_accept(&node->reassembler, frame, length, now_ms, source, &chunk);
    if (status != FEDTINY_CHUNK_OK || chunk.payload == NULL) {
        return status;
    }
    payload = chunk.payload;
    status = check_header(payload, chunk.payload_len);
    if (status != FEDTINY_ENV_OK) {
        return status;
    }
    if (load32(payload + 8) != c->fleet_id || load32(payload + 12) != (source == 0u ? c->device_id : 0u)) {
        return FEDTINY_NODE_ERR_WRONG_TOPIC; /* checked before opening commits anything */
    }
    if (chunk.payload_len > node->max_downlink_bytes &&
        !(secagg_on(node) && is_stage_downlink(payload[3]) &&
          chunk.payload_len <= FEDTINY_NODE_SECAGG_MAX_DOWNLINK)) {
        return FEDTINY_NODE_ERR_OVERSIZED;
    }
    status = fedtiny_env_open(&node->keys, payload, chunk.payload_len, fedtiny_env_replay_check, &node->replay,
                              &header, &body_len);
    if (status == FEDTINY_ENV_DUPLICATE) {
        return FEDTINY_NODE_OK; /* a QoS 1 duplicate */
    }
    if (status != FEDTINY_ENV_OK) {
        return status;
    }
    body = payload + FEDTINY_ENV_HEADER_BYTES;

    /* Everything that can refuse the message comes before anything changes. */
    if (header.type == FEDTINY_MSG_TASK) {
        status = fedtiny_wire_decode_task(body, body_len, &task);
        for_this_plan = status == FEDTINY_WIRE_OK &&
                        memcmp(task.plan_hash, c->plan->hash, FEDTINY_WIRE_HASH_BYTES) == 0;
        if (for_this_plan) {
            status = fedtiny_wire_task_settings(&task, &settings);
            if (status == FEDTINY_WIRE_OK && settings.noise_sigma > 0.0f && c->values == NULL) {
                status = FEDTINY_WIRE_ERR_BAD_TASK; /* never answer a noised round without noise */
            }
            if (status == FEDTINY_WIRE_OK && settings.masked && secagg_on(node) && settings.clip_norm > 0.0f &&
                c->plan->wire->n_tensors <= FEDTINY_NODE_SECAGG_MAX_BUFFERS) {
                int32_t bounds[FEDTINY_NODE_SECAGG_MAX_BUFFERS];
                can_mask = fedtiny_secagg_bounds(c->plan->wire, settings.clip_norm, settings.noise_sigma, bounds) ==
                           FEDTINY_SECAGG_OK;
            }
        }
    } else if (is_stage_downlink(header.type)) {
        status = fedtiny_node_secagg_check_body(header.type, body, body_len);
        if (status == FEDTINY_WIRE_OK) {
            if (!secagg_on(node)) {
                return FEDTINY_NODE_FROM_SECAGG(FEDTINY_SECAGG_ERR_BAD_STAGE); /* no round of this node's */
            }
            FEDTINY_PROFILE_ENTER(FEDTINY_PART_CRYPTO);
            status = fedtiny_node_secagg_stage(c->secagg, c->plan->wire, c->peers, header.type, header.run,
                                               header.round, body, body_len,
                                               c->secagg->stage + FEDTINY_ENV_HEADER_BYTES,
                                               FEDTINY_NODE_SECAGG_SHARES_BYTES, &frame_len);
            FEDTINY_PROFILE_LEAVE();
            if (status != FEDTINY_SECAGG_OK) {
                return FEDTINY_NODE_FROM_SECAGG(status);
            }
        }
    } else if (header.type == FEDTINY_MSG_GLOBAL_UPDATE) {
        status = fedtiny_wire_check_global_update(c->plan->wire, body, body_len);
        if (status == FEDTINY_WIRE_OK) {
            /* in place and atomic: on any error the global state is unchanged */
            status = fedtiny_wire_apply_global_update(c->plan->wire, body, body_len, node->state.model_version,
                                                      c->global_state);
            applied = status == FEDTINY_WIRE_OK;
            if (status == FEDTINY_WIRE_ERR_WRONG_VERSION) {
                status = FEDTINY_WIRE_OK; /* from a version this node does not hold: ignored, as device.py does */
            }
        }
    } else {
        status = fedtiny_wire_decode_ack(body, body_len, &ack);
    }
    if (status != FEDTINY_WIRE_OK) {
        return FEDTINY_NODE_FROM_WIRE(status);
    }

    /* the signature follows the payload (ciphertext and tag for an encrypted one) */
    fedtiny_env_replay_commit(&node->replay, &header, body + header.payload_len);
    keep_position(&node->state.replay[header.device_id == 0u ? 1 : 0], &header);
    if (header.run > node->state.run) {
        new_run(node, header.run);
    }
    if (header.round > node->state.round) {
        node->state.round = header.round;
    }
    if (header.type == FEDTINY_MSG_GLOBAL_UPDATE) {
        if (applied) {
            node->state.model_version = header.model_version;
        }
    } else if (header.type == FEDTINY_MSG_TASK) {
        /* ACK REJECTED: a TASK for another training plan; a new round's masked TASK the node cannot mask (no
         * peers' identities, as device.py without them; no clip norm; more buffers than it masks) */
        if (!for_this_plan || ((int64_t)header.round > node->state.trained_round && settings.masked && !can_mask)) {
            size_t reply_len;
            memset(&ack, 0, sizeof ack); /* unused by a TASK: the reply reuses it (one ACK on the stack) */
            ack.acked_type = header.type;
            ack.status = FEDTINY_WIRE_ACK_REJECTED;
            ack.acked_seq = header.seq;
            status = fedtiny_wire_encode_ack(&ack, small_body(c->frame), FEDTINY_WIRE_ACK_HEAD_BYTES, &reply_len);
            if (status != FEDTINY_WIRE_OK) {
                return FEDTINY_NODE_FROM_WIRE(status);
            }
            status = seal_small(node, FEDTINY_MSG_ACK, 0u, node->state.round, node->state.model_version,
                                (uint32_t)reply_len, c->frame, c->capacity.frame, &frame_len);
            if (status != FEDTINY_NODE_OK) {
                return status;
            }
            action = SEND_FRAME;
        } else if ((int64_t)header.round > node->state.trained_round) {
            fedtiny_node_task *pending = &node->state.pending_task;
            pending->present = 1u;
            pending->round = header.round;
            pending->model_version = header.model_version;
            pending->epochs = settings.epochs;
            pending->steps = settings.steps;
            pending->uplink_keep_pct = settings.uplink_keep_pct;
            pending->clip_norm = settings.clip_norm;
            pending->noise_sigma = settings.noise_sigma;
            pending->masked = settings.masked;
            if (settings.masked) { /* the round's secure aggregation starts with the node's signed keys */
                fedtiny_secagg_round ctx;
                ctx.fleet_id = c->fleet_id;
                ctx.run = node->state.run;
                ctx.round = header.round;
                FEDTINY_PROFILE_ENTER(FEDTINY_PART_CRYPTO);
                status = fedtiny_node_secagg_begin(c->secagg, c->plan->wire, c->identity, &ctx, c->device_id,
                                                   settings.clip_norm, settings.noise_sigma, settings.min_survivors,
                                                   c->secagg->stage + FEDTINY_ENV_HEADER_BYTES);
                FEDTINY_PROFILE_LEAVE();
                if (status == FEDTINY_SECAGG_OK) {
                    status = seal_stage(node, FEDTINY_MSG_SECAGG_KEYS, header.round, FEDTINY_SECAGG_KEYS_BYTES);
                }
                if (status != FEDTINY_NODE_OK) {
                    return status;
                }
                action = SEND_STAGE;
            }
        } /* else: a TASK for a round already answered */
    } else if (is_stage_downlink(header.type)) {
        if (header.type == FEDTINY_MSG_SECAGG_RELAY) {
            if (c->secagg->trained) {
                status = seal_masked(node);
                if (status != FEDTINY_NODE_OK) {
                    return status;
                }
                action = SEND_UPLOAD;
            }
        } else {
            status = seal_stage(node, header.type == FEDTINY_MSG_SECAGG_PEERS ? FEDTINY_MSG_SECAGG_SHARES
                                                                              : FEDTINY_MSG_SECAGG_REVEAL,
                                header.round, frame_len);
            if (status != FEDTINY_NODE_OK) {
                return status;
            }
            action = SEND_STAGE;
        }
    } else if (node->state.upload_len != 0u && ack.acked_type == FEDTINY_MSG_DELTA) {
        uint32_t upload_seq = load32(c->upload + 24);
        if (ack.status == FEDTINY_WIRE_ACK_OK && ack.acked_seq == upload_seq) {
            node->state.upload_len = 0u;
            node->upload_sent = 0u;
            status = seal_join(node, &frame_len); /* (re)announce now that the data stream is free */
            if (status != FEDTINY_NODE_OK) {
                return status;
            }
            action = SEND_FRAME;
        } else if (ack.status == FEDTINY_WIRE_ACK_MISSING_CHUNKS && ack.transfer_id == upload_seq) {
            action = SEND_MISSING;
        }
    }
    status = persist(node);
    if (status != FEDTINY_NODE_OK) {
        return status;
    }
    if (action == SEND_FRAME) {
        status = publish(node, FEDTINY_NODE_TOPIC_UP, c->frame, frame_len, 0);
    } else if (action == SEND_MISSING) {
        status = send_upload(node, now_ms, ack.missing, ack.n_missing, &sent);
        node->resent_chunks += sent;
    } else if (action == SEND_STAGE) {
        status = send_stage(node);
    } else if (action == SEND_UPLOAD) {
        status = send_upload(node, now_ms, NULL, 0u, &sent);
    }
    if (status != FEDTINY_NODE_OK) {
        return status;
    }
    return next_job(node, job);
}

/* ---- jobs -------------------------------------------------------------------------------------------------- */

int fedtiny_node_pending_job(const fedtiny_node *node, fedtiny_node_job *job)
{
    return next_job(node, job);
}

int fedtiny_node_superseded(const fedtiny_node *node, const fedtiny_node_job *job)
{
    const fedtiny_node_task *task = &node->state.pending_task;
    return !task->present || task->round != job->round;
}

int fedtiny_node_skip(fedtiny_node *node, const fedtiny_node_job *job)
{
    if (fedtiny_node_superseded(node, job)) {
        return FEDTINY_NODE_OK;
    }
    node->state.trained_round = job->round;
    node->state.pending_task.present = 0u;
    return persist(node);
}

/* update.uplink with device noise (step 4): the sent, clipped delta into config.values, discrete Gaussian noise
 * from the node's own stream for (run, round) added in place, then encoded. The noise is checked before the
 * carry changes, as Python raises before it keeps the new carry. */
static int noised_uplink(fedtiny_node *node, const fedtiny_node_job *job, const uint8_t *base_state,
                         const uint8_t *trained_state, const fedtiny_node_result *result, uint8_t *out,
                         size_t capacity, size_t *out_len)
{
    const fedtiny_node_config *c = &node->config;
    fedtiny_noise_stream stream;
    fedtiny_noise_source source;
    int status;
    if (c->values == NULL) {
        return FEDTINY_WIRE_ERR_ARGUMENT; /* not reached: such a node refuses a noised TASK */
    }
    status = fedtiny_noise_check(c->plan->wire, (double)job->noise_sigma);
    if (status == FEDTINY_WIRE_OK) {
        status = fedtiny_wire_uplink_values(c->plan->wire, base_state, trained_state, c->carry, job->uplink_keep_pct,
                                            job->clip_norm, c->values);
    }
    if (status != FEDTINY_WIRE_OK) {
        return status;
    }
    fedtiny_noise_stream_open(&stream, c->identity, node->state.run, job->round, &source);
    status = fedtiny_noise_add(c->plan->wire, c->values, (double)job->noise_sigma, &source, NULL);
    fedtiny_noise_stream_wipe(&stream);
    if (status == FEDTINY_WIRE_OK) {
        status = fedtiny_wire_encode_values(c->plan->wire, c->values, result->num_examples, result->loss,
                                            result->accuracy, result->personal_accuracy, out, capacity, out_len);
    }
    return status;
}

/* Seal the DELTA body at upload + header as the upload and persist it with everything it changes, in one save
 * (device.py _upload): the seq it used, the answered round, the carry and personalised model already in place.
 * A power cut before the save leaves the task pending and nothing sent; after it, the upload is resent. */
static int seal_upload(fedtiny_node *node, uint32_t round, uint32_t model_version, uint16_t flags, size_t body_len)
{
    const fedtiny_node_config *c = &node->config;
    size_t envelope_len;
    uint32_t seq = node->state.seq;
    int status = fedtiny_env_seal(&node->keys, FEDTINY_MSG_DELTA, flags, node->state.run, round, model_version, seq,
                                  c->upload + FEDTINY_ENV_HEADER_BYTES, (uint32_t)body_len, c->upload,
                                  c->capacity.upload, &envelope_len);
    if (status != FEDTINY_ENV_OK) {
        return status;
    }
    node->state.seq = seq + 1u;
    node->state.trained_round = round;
    node->state.pending_task.present = 0u;
    node->state.upload_chunk = c->chunk_size;
    node->state.upload_len = (uint32_t)envelope_len;
    return persist(node);
}

/* A masked job (device.py complete): the clipped (and noised, clamped to the round's bounds) delta into the values
 * buffer and the carry it leaves into held_carry, both held until the relay has come; then the masked DELTA. */
static int masked_uplink(fedtiny_node *node, const fedtiny_node_job *job, const uint8_t *base_state,
                         const uint8_t *trained_state, const fedtiny_node_result *result)
{
    const fedtiny_node_config *c = &node->config;
    fedtiny_node_secagg *sa = c->secagg;
    int status = FEDTINY_WIRE_OK;
    if (job->noise_sigma > 0.0f) {
        status = fedtiny_noise_check(c->plan->wire, (double)job->noise_sigma);
    }
    if (status == FEDTINY_WIRE_OK) {
        memcpy(held_carry(c), c->carry, fedtiny_wire_delta_bytes(c->plan->wire));
        status = fedtiny_wire_uplink_values(c->plan->wire, base_state, trained_state, held_carry(c),
                                            job->uplink_keep_pct, job->clip_norm, c->values);
    }
    if (status == FEDTINY_WIRE_OK && job->noise_sigma > 0.0f) {
        fedtiny_noise_stream stream;
        fedtiny_noise_source source;
        fedtiny_noise_stream_open(&stream, c->identity, node->state.run, job->round, &source);
        status = fedtiny_noise_add(c->plan->wire, c->values, (double)job->noise_sigma, &source, sa->bounds);
        fedtiny_noise_stream_wipe(&stream);
    }
    if (status != FEDTINY_WIRE_OK) {
        return FEDTINY_NODE_FROM_WIRE(status);
    }
    sa->trained = 1u;
    sa->job_round = job->round;
    sa->job_model_version = job->model_version;
    sa->num_examples = result->num_examples;
    sa->loss = result->loss;
    sa->accuracy = result->accuracy;
    sa->personal_accuracy = result->personal_accuracy;
    return FEDTINY_NODE_OK;
}

int fedtiny_node_complete(fedtiny_node *node, const fedtiny_node_job *job, const uint8_t *base_state,
                          const uint8_t *trained_state, const fedtiny_node_result *result, int64_t now_ms)
{
    const fedtiny_node_config *c = &node->config;
    uint8_t *body = c->upload + FEDTINY_ENV_HEADER_BYTES;
    size_t body_len;
    uint32_t sent;
    int status;
    node->state.rng_counter = result->rng_counter; /* the trainer drew its random numbers either way */
    if (fedtiny_node_superseded(node, job)) {
        return persist(node); /* its change is dropped: it was made from an older model */
    }
    if (job->masked && (!secagg_on(node) || !c->secagg->active || c->secagg->secrets.ctx.run != node->state.run ||
                        c->secagg->secrets.ctx.round != job->round)) {
        return fedtiny_node_skip(node, job); /* restarted during the round: a dropout of it */
    }
    if (job->masked) {
        status = masked_uplink(node, job, base_state, trained_state, result);
    } else if (job->noise_sigma > 0.0f) {
        status = noised_uplink(node, job, base_state, trained_state, result, body,
                               c->capacity.upload - FEDTINY_ENV_SEALED_BYTES(0u), &body_len);
        status = status != FEDTINY_WIRE_OK ? FEDTINY_NODE_FROM_WIRE(status) : FEDTINY_NODE_OK;
    } else {
        status = fedtiny_wire_uplink(c->plan->wire, base_state, trained_state, c->carry, job->uplink_keep_pct,
                                     job->clip_norm, result->num_examples, result->loss, result->accuracy,
                                     result->personal_accuracy, body,
                                     c->capacity.upload - FEDTINY_ENV_SEALED_BYTES(0u), &body_len);
        status = status != FEDTINY_WIRE_OK ? FEDTINY_NODE_FROM_WIRE(status) : FEDTINY_NODE_OK;
    }
    if (status != FEDTINY_NODE_OK) {
        return status;
    }
    if (c->personal != NULL) { /* the node's own model until its next answered round, saved with the DELTA */
        memcpy(c->personal, trained_state, fedtiny_wire_state_bytes(c->plan->wire));
        node->state.personal = 1u;
    }
    if (job->masked) {
        if (!c->secagg->relay_done) {
            return FEDTINY_NODE_OK; /* the masked DELTA waits for the neighbours' shares (the relay) */
        }
        status = seal_masked(node);
    } else {
        status = seal_upload(node, job->round, job->model_version, 0u, body_len);
    }
    if (status != FEDTINY_NODE_OK) {
        return status;
    }
    return send_upload(node, now_ms, NULL, 0u, &sent);
}

const uint8_t *fedtiny_node_inference_state(const fedtiny_node *node)
{
    return node->state.personal ? node->config.personal : node->config.global_state;
}
