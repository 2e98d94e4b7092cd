/* fedtiny_node_secagg.h: the node's secure-aggregation round, as secagg.SecAggDevice takes it. */
#include "fedtiny_node_secagg.h"

#include <string.h>

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static void wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static void wrf32(uint8_t *p, float f) { uint32_t u; memcpy(&u, &f, 4); wr32(p, u); }

#define PEER_ENTRY 164u  /* device id u32 | SECAGG_KEYS 160 */
#define SHARE_ENTRY 80u  /* device id u32 | ciphertext 76 */
#define REVEAL_ENTRY 40u /* about u32 | kind u8 | reserved u8 | index u16 | share 32 */
#define REVEAL_SELF_MASK 1u
#define REVEAL_PAIRWISE_KEY 2u

size_t fedtiny_node_secagg_size(void)
{
    return sizeof(fedtiny_node_secagg);
}

size_t fedtiny_node_secagg_record_bytes(void)
{
    return FEDTINY_NODE_SECAGG_RECORD_BYTES;
}

int fedtiny_node_secagg_restore(fedtiny_node_secagg *sa, const uint8_t *record, size_t record_len)
{
    if (record_len != 0u && record_len != FEDTINY_NODE_SECAGG_RECORD_BYTES) return FEDTINY_SECAGG_ERR_ARGUMENT;
    if (record_len != 0u) memmove(sa, record, record_len); /* record may be sa itself, loaded in place */
    memset((uint8_t *)sa + record_len, 0, sizeof *sa - record_len);
    sa->trained = 0u; /* the values it trained were in RAM: the pending task trains again */
    return FEDTINY_SECAGG_OK;
}

uint32_t fedtiny_node_secagg_masked_bytes_max(const fedtiny_wire_plan *plan)
{
    uint32_t head = FEDTINY_NODE_SECAGG_MASKED_HEAD + plan->n_tensors;
    return ((head + 3u) & ~3u) + 4u * fedtiny_wire_elements(plan);
}

int fedtiny_node_secagg_begin(fedtiny_node_secagg *sa, const fedtiny_wire_plan *plan, const uint8_t identity[64],
                              const fedtiny_secagg_round *ctx, uint32_t device_id, float clip_norm,
                              float noise_sigma, uint32_t min_survivors, uint8_t keys[FEDTINY_SECAGG_KEYS_BYTES])
{
    int32_t bounds[FEDTINY_NODE_SECAGG_MAX_BUFFERS];
    const int same = sa->active && sa->secrets.ctx.fleet_id == ctx->fleet_id && sa->secrets.ctx.run == ctx->run &&
                     sa->secrets.ctx.round == ctx->round;
    if (!same) {
        if (plan->n_tensors > FEDTINY_NODE_SECAGG_MAX_BUFFERS ||
            fedtiny_secagg_bounds(plan, clip_norm, noise_sigma, bounds) != FEDTINY_SECAGG_OK) {
            return FEDTINY_SECAGG_ERR_ARGUMENT;
        }
        const uint16_t changes = sa->changes;
        fedtiny_secagg_wipe(&sa->secrets);
        memset(sa, 0, offsetof(fedtiny_node_secagg, stage));
        sa->changes = (uint16_t)(changes + 1u);
        sa->active = 1u;
        fedtiny_secagg_derive(&sa->secrets, identity, ctx, device_id);
        sa->clip_norm = clip_norm;
        sa->noise_sigma = noise_sigma;
        sa->min_survivors = min_survivors;
        memcpy(sa->bounds, bounds, sizeof(int32_t) * plan->n_tensors);
    }
    fedtiny_secagg_keys(&sa->secrets, identity, keys);
    return FEDTINY_SECAGG_OK;
}

/* messages._counted: head bytes, then n entries of `entry` bytes (n the u16 at n_at), at most 64 */
static int check_counted(const uint8_t *body, uint32_t len, uint32_t head, uint32_t n_at, uint32_t entry)
{
    uint32_t n, expected;
    if (len < head) return FEDTINY_WIRE_ERR_TRUNCATED;
    n = rd16(body + n_at);
    if (n > FEDTINY_SECAGG_MAX_NEIGHBOURS) return FEDTINY_WIRE_ERR_OVERSIZED;
    expected = head + n * entry;
    if (len != expected) return len < expected ? FEDTINY_WIRE_ERR_TRUNCATED : FEDTINY_WIRE_ERR_TRAILING_BYTES;
    return FEDTINY_WIRE_OK;
}

int fedtiny_node_secagg_check_body(uint8_t type, const uint8_t *body, uint32_t len)
{
    int status;
    if (type == FEDTINY_MSG_SECAGG_PEERS) {
        status = check_counted(body, len, 8u, 4u, PEER_ENTRY);
        return status ? status : rd16(body + 6) ? FEDTINY_WIRE_ERR_BAD_FLAGS : FEDTINY_WIRE_OK;
    }
    if (type == FEDTINY_MSG_SECAGG_RELAY) {
        status = check_counted(body, len, 4u, 0u, SHARE_ENTRY);
        return status ? status : rd16(body + 2) ? FEDTINY_WIRE_ERR_BAD_FLAGS : FEDTINY_WIRE_OK;
    }
    if (type == FEDTINY_MSG_SECAGG_UNMASK) {
        uint32_t n, expected;
        if (len < 4u) return FEDTINY_WIRE_ERR_TRUNCATED;
        n = (uint32_t)rd16(body) + rd16(body + 2);
        if (n > FEDTINY_SECAGG_MAX_NEIGHBOURS) return FEDTINY_WIRE_ERR_OVERSIZED;
        expected = 4u + 4u * n;
        if (len != expected) return len < expected ? FEDTINY_WIRE_ERR_TRUNCATED : FEDTINY_WIRE_ERR_TRAILING_BYTES;
        return FEDTINY_WIRE_OK;
    }
    return FEDTINY_WIRE_ERR_ARGUMENT;
}

static int neighbour_slot(const fedtiny_node_secagg *sa, uint32_t id)
{
    unsigned i;
    for (i = 0; i < sa->n_neighbours; i++) {
        if (sa->ids[i] == id) return (int)i;
    }
    return -1;
}

static const uint8_t *peer_public(const fedtiny_node_peers *peers, uint32_t id)
{
    uint32_t i;
    for (i = 0; i < peers->count; i++) {
        if (peers->ids[i] == id) return peers->publics[i];
    }
    return NULL;
}

/* SecAggDevice.on_peers: checks, then the shares sealed to each neighbour in id order, index = position + 1 */
static int on_peers(fedtiny_node_secagg *sa, const fedtiny_wire_plan *plan, const fedtiny_node_peers *peers,
                    const uint8_t *body, uint8_t *reply, size_t capacity, size_t *reply_len)
{
    const uint16_t cohort = rd16(body), t = rd16(body + 2), n = rd16(body + 4);
    const uint8_t *entries = body + 8;
    uint8_t bits[FEDTINY_NODE_SECAGG_MAX_BUFFERS], shares[FEDTINY_SECAGG_SHARES_BYTES];
    uint8_t open_keys[FEDTINY_SECAGG_MAX_NEIGHBOURS][32]; /* by position in id order, until all are sealed */
    uint32_t order[FEDTINY_SECAGG_MAX_NEIGHBOURS];
    unsigned i, j, majority = n / 2u + 1u;
    int status;
    if (sa->peers_done) return FEDTINY_SECAGG_ERR_BAD_STAGE;
    if (n == 0u) return FEDTINY_SECAGG_ERR_BAD_PEERS;
    for (i = 0; i < n; i++) {
        const uint32_t id = rd32(entries + PEER_ENTRY * i);
        if (id == sa->secrets.device_id) return FEDTINY_SECAGG_ERR_BAD_PEERS;
        for (j = 0; j < i; j++) {
            if (rd32(entries + PEER_ENTRY * j) == id) return FEDTINY_SECAGG_ERR_BAD_PEERS;
        }
    }
    if (t < majority || t > n || (uint32_t)cohort < (uint32_t)n + 1u) return FEDTINY_SECAGG_ERR_BAD_THRESHOLD;
    status = fedtiny_secagg_bits(plan, sa->bounds, cohort, bits);
    if (status != FEDTINY_SECAGG_OK) return status;
    for (i = 0; i < n; i++) {
        const uint32_t id = rd32(entries + PEER_ENTRY * i);
        const uint8_t *public_key = peer_public(peers, id);
        if (public_key == NULL) return FEDTINY_SECAGG_ERR_UNKNOWN_PEER;
        status = fedtiny_secagg_check_keys(public_key, &sa->secrets.ctx, id, entries + PEER_ENTRY * i + 4u);
        if (status != FEDTINY_SECAGG_OK) return status;
    }
    if (capacity < 4u + SHARE_ENTRY * n) return FEDTINY_SECAGG_ERR_BUFFER;
    for (i = 0; i < n; i++) { /* sorted ids: an insertion sort of at most 64 */
        uint32_t id = rd32(entries + PEER_ENTRY * i);
        for (j = i; j > 0 && order[j - 1] > id; j--) order[j] = order[j - 1];
        order[j] = id;
    }
    wr16(reply, n);
    wr16(reply + 2, 0u);
    for (i = 0; i < n; i++) {
        const uint8_t *keys = NULL;
        for (j = 0; j < n; j++) {
            if (rd32(entries + PEER_ENTRY * j) == order[i]) keys = entries + PEER_ENTRY * j + 4u;
        }
        uint8_t seal_key[32];
        status = fedtiny_secagg_share(&sa->secrets, t, i + 1u, shares);
        if (status == FEDTINY_SECAGG_OK) { /* one agreement: the key the relay's share opens with is kept */
            status = fedtiny_secagg_share_keys(&sa->secrets, keys, order[i], seal_key, open_keys[i]);
        }
        if (status == FEDTINY_SECAGG_OK) {
            wr32(reply + 4u + SHARE_ENTRY * i, order[i]);
            status = fedtiny_secagg_seal_share_with(&sa->secrets, seal_key, order[i], i + 1u, shares,
                                                    reply + 8u + SHARE_ENTRY * i);
        }
        memset(seal_key, 0, sizeof seal_key);
        if (status != FEDTINY_SECAGG_OK) { /* a small-order c_pk: nothing kept */
            memset(open_keys, 0, sizeof open_keys);
            return status;
        }
    }
    for (i = 0; i < n; i++) { /* kept in SECAGG_PEERS' order */
        for (j = 0; j < n; j++) {
            if (order[j] == rd32(entries + PEER_ENTRY * i)) memcpy(sa->open_key[i], open_keys[j], 32);
        }
        sa->ids[i] = rd32(entries + PEER_ENTRY * i);
        memcpy(sa->c_pk[i], entries + PEER_ENTRY * i + 4u, 32);
        memcpy(sa->s_pk[i], entries + PEER_ENTRY * i + 36u, 32);
    }
    memset(open_keys, 0, sizeof open_keys);
    memcpy(sa->bits, bits, plan->n_tensors);
    sa->n_neighbours = n;
    sa->cohort = cohort;
    sa->threshold = t;
    sa->peers_done = 1u;
    sa->changes++;
    *reply_len = 4u + SHARE_ENTRY * n;
    return FEDTINY_SECAGG_OK;
}

/* SecAggDevice.on_relay: the shares addressed to this node, opened; all or nothing */
static int on_relay(fedtiny_node_secagg *sa, const uint8_t *body)
{
    const uint16_t n = rd16(body);
    uint8_t held[FEDTINY_SECAGG_MAX_NEIGHBOURS];
    unsigned i, j, index;
    int status;
    if (!sa->peers_done || sa->relay_done) return FEDTINY_SECAGG_ERR_BAD_STAGE;
    for (i = 0; i < n; i++) {
        const uint32_t id = rd32(body + 4u + SHARE_ENTRY * i);
        for (j = 0; j < i; j++) {
            if (rd32(body + 4u + SHARE_ENTRY * j) == id) return FEDTINY_SECAGG_ERR_BAD_RELAY;
        }
        if (neighbour_slot(sa, id) < 0) return FEDTINY_SECAGG_ERR_BAD_RELAY;
    }
    if (n < sa->threshold) return FEDTINY_SECAGG_ERR_TOO_FEW_NEIGHBOURS;
    memset(held, 0, sizeof held);
    for (i = 0; i < n; i++) { /* opened into place only once every one has opened */
        const uint32_t id = rd32(body + 4u + SHARE_ENTRY * i);
        const int slot = neighbour_slot(sa, id);
        uint8_t shares[FEDTINY_SECAGG_SHARES_BYTES];
        status = fedtiny_secagg_open_share_with(&sa->secrets, sa->open_key[slot], id, body + 8u + SHARE_ENTRY * i,
                                                &index, shares);
        if (status != FEDTINY_SECAGG_OK) {
            memset(sa->held_shares, 0, sizeof sa->held_shares);
            return status;
        }
        held[slot] = (uint8_t)index;
        memcpy(sa->held_shares[slot], shares, sizeof shares);
    }
    memcpy(sa->held, held, sizeof held);
    sa->relay_done = 1u;
    sa->changes++;
    return FEDTINY_SECAGG_OK;
}

/* SecAggDevice.on_unmask: one reveal per round; the same request again gets the same answer */
static int on_unmask(fedtiny_node_secagg *sa, const uint8_t *body, uint32_t len, uint8_t *reply, size_t capacity,
                     size_t *reply_len)
{
    const uint16_t n_s = rd16(body), n_d = rd16(body + 2);
    uint32_t order[FEDTINY_SECAGG_MAX_NEIGHBOURS];
    unsigned i, j, n = (unsigned)n_s + n_d, n_held = 0;
    if (sa->revealed) {
        if (n_s != sa->unmask_survivors || n_d != sa->unmask_dropped) return FEDTINY_SECAGG_ERR_BAD_UNMASK;
        for (i = 0; i < n; i++) {
            if (rd32(body + 4u + 4u * i) != sa->unmask_ids[i]) return FEDTINY_SECAGG_ERR_BAD_UNMASK;
        }
    } else {
        if (!sa->masked_sent) return FEDTINY_SECAGG_ERR_BAD_STAGE;
        for (i = 0; i < sa->n_neighbours; i++) n_held += sa->held[i] != 0u;
        for (i = 0; i < n; i++) { /* distinct, all held, every held one named */
            const uint32_t id = rd32(body + 4u + 4u * i);
            const int slot = neighbour_slot(sa, id);
            if (slot < 0 || !sa->held[slot]) return FEDTINY_SECAGG_ERR_BAD_UNMASK;
            for (j = 0; j < i; j++) {
                if (rd32(body + 4u + 4u * j) == id) return FEDTINY_SECAGG_ERR_BAD_UNMASK;
            }
        }
        if (n != n_held) return FEDTINY_SECAGG_ERR_BAD_UNMASK;
        if ((uint32_t)n_s + 1u < sa->threshold || (uint32_t)n_s + 1u < sa->min_survivors) {
            return FEDTINY_SECAGG_ERR_TOO_FEW_SURVIVORS;
        }
    }
    (void)len;
    if (capacity < 4u + REVEAL_ENTRY * n) return FEDTINY_SECAGG_ERR_BUFFER;
    for (i = 0; i < n; i++) { /* entries in id order */
        uint32_t id = rd32(body + 4u + 4u * i);
        for (j = i; j > 0 && order[j - 1] > id; j--) order[j] = order[j - 1];
        order[j] = id;
    }
    wr16(reply, (uint16_t)n);
    wr16(reply + 2, 0u);
    for (i = 0; i < n; i++) {
        uint8_t *entry = reply + 4u + REVEAL_ENTRY * i;
        const int slot = neighbour_slot(sa, order[i]);
        int survivor = 0;
        for (j = 0; j < n_s; j++) survivor |= rd32(body + 4u + 4u * j) == order[i];
        wr32(entry, order[i]);
        entry[4] = survivor ? REVEAL_SELF_MASK : REVEAL_PAIRWISE_KEY;
        entry[5] = 0u;
        wr16(entry + 6, sa->held[slot]);
        if (survivor) { /* the seed's share and 16 zero bytes; never both kinds for one neighbour */
            memcpy(entry + 8, sa->held_shares[slot], 16);
            memset(entry + 24, 0, 16);
        } else {
            memcpy(entry + 8, sa->held_shares[slot] + 16, 32);
        }
    }
    if (!sa->revealed) {
        sa->revealed = 1u;
        sa->changes++;
        sa->unmask_survivors = n_s;
        sa->unmask_dropped = n_d;
        for (i = 0; i < n; i++) sa->unmask_ids[i] = rd32(body + 4u + 4u * i);
    }
    *reply_len = 4u + REVEAL_ENTRY * n;
    return FEDTINY_SECAGG_OK;
}

int fedtiny_node_secagg_stage(fedtiny_node_secagg *sa, const fedtiny_wire_plan *plan, const fedtiny_node_peers *peers,
                              uint8_t type, uint32_t run, uint32_t round, const uint8_t *body, uint32_t len,
                              uint8_t *reply, size_t capacity, size_t *reply_len)
{
    *reply_len = 0u;
    if (!sa->active || sa->secrets.ctx.run != run || sa->secrets.ctx.round != round) {
        return FEDTINY_SECAGG_ERR_BAD_STAGE; /* not this node's secure-aggregation round */
    }
    if (type == FEDTINY_MSG_SECAGG_PEERS) return on_peers(sa, plan, peers, body, reply, capacity, reply_len);
    if (type == FEDTINY_MSG_SECAGG_RELAY) return on_relay(sa, body);
    return on_unmask(sa, body, len, reply, capacity, reply_len);
}

int fedtiny_node_secagg_masked(fedtiny_node_secagg *sa, const fedtiny_wire_plan *plan, int32_t *values,
                               uint8_t *out, size_t capacity, size_t *out_len)
{
    uint32_t ids[FEDTINY_SECAGG_MAX_NEIGHBOURS];
    const uint8_t(*s_pk)[32] = (const uint8_t(*)[32])sa->s_pk;
    uint8_t held_pk[FEDTINY_SECAGG_MAX_NEIGHBOURS][32];
    uint32_t head = FEDTINY_NODE_SECAGG_MASKED_HEAD + plan->n_tensors, n = 0;
    size_t packed_len;
    unsigned i;
    int status;
    if (!sa->relay_done) return FEDTINY_SECAGG_ERR_BAD_STAGE;
    head = (head + 3u) & ~3u;
    if (capacity < head) return FEDTINY_SECAGG_ERR_BUFFER;
    for (i = 0; i < sa->n_neighbours; i++) { /* the pairwise masks of the neighbours whose shares came */
        if (!sa->held[i]) continue;
        ids[n] = sa->ids[i];
        memcpy(held_pk[n], s_pk[i], 32);
        n++;
    }
    status = fedtiny_secagg_mask(plan, &sa->secrets, sa->bounds, sa->bits, ids, (const uint8_t(*)[32])held_pk, n,
                                 values, out + head, capacity - head, &packed_len);
    if (status != FEDTINY_SECAGG_OK) return status;
    memset(out, 0, head);
    wr32(out, sa->num_examples);
    wrf32(out + 4, sa->loss);
    wrf32(out + 8, sa->accuracy);
    wrf32(out + 12, sa->personal_accuracy < 0.0f ? -1.0f : sa->personal_accuracy);
    wr16(out + 16, sa->cohort);
    wr16(out + 18, plan->n_tensors);
    memcpy(out + FEDTINY_NODE_SECAGG_MASKED_HEAD, sa->bits, plan->n_tensors);
    if (!sa->masked_sent) sa->changes++;
    sa->masked_sent = 1u;
    *out_len = head + packed_len;
    return FEDTINY_SECAGG_OK;
}
