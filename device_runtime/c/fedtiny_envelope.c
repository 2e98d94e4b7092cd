/* The fedtiny envelope on the node (protocol version 2): see fedtiny_envelope.h and docs/protocol.md. */
#include "fedtiny_envelope.h"
#include "fedtiny_profile.h"

#include <string.h>

#include "monocypher.h"

static const uint8_t MAGIC[2] = {'F', 'T'};
static const uint8_t KDF_SALT[10] = {'f', 'e', 'd', 't', 'i', 'n', 'y', '/', 'v', '2'};
static const uint8_t KDF_INFO[14] = {'f', 'e', 'd', 't', 'i', 'n', 'y', '/', 'v', '2', '/', 'e', '2', 'e'};
#define KNOWN_FLAGS 0x000Fu

/* ---- little-endian fields ---------------------------------------------------------------------------------- */

static void store16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void store32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint16_t load16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t load32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* header = magic "FT" | version u8 | type u8 | flags u16 | run u16 | fleet_id | device_id | round
 *          | model_version | seq | payload_len (u32 each) */
static void pack_header(uint8_t out[FEDTINY_ENV_HEADER_BYTES], const fedtiny_env_header *h)
{
    out[0] = MAGIC[0];
    out[1] = MAGIC[1];
    out[2] = (uint8_t)FEDTINY_ENV_VERSION;
    out[3] = h->type;
    store16(out + 4, h->flags);
    store16(out + 6, h->run);
    store32(out + 8, h->fleet_id);
    store32(out + 12, h->device_id);
    store32(out + 16, h->round);
    store32(out + 20, h->model_version);
    store32(out + 24, h->seq);
    store32(out + 28, h->payload_len);
}

/* nonce = round u32 | seq u32 | direction u8 | run u16 | 1 zero byte */
static void make_nonce(uint8_t nonce[12], const fedtiny_env_header *h, uint8_t direction)
{
    store32(nonce, h->round);
    store32(nonce + 4, h->seq);
    nonce[8] = direction;
    store16(nonce + 9, h->run);
    nonce[11] = 0u;
}

static int is_uplink_type(uint8_t type)
{
    return type == FEDTINY_MSG_JOIN || type == FEDTINY_MSG_DELTA || type == FEDTINY_MSG_ACK ||
           type == FEDTINY_MSG_STATUS || type == FEDTINY_MSG_LEAVE || type == FEDTINY_MSG_SECAGG_KEYS ||
           type == FEDTINY_MSG_SECAGG_SHARES || type == FEDTINY_MSG_SECAGG_REVEAL;
}

static int is_downlink_type(uint8_t type)
{
    return type == FEDTINY_MSG_TASK || type == FEDTINY_MSG_GLOBAL_UPDATE || type == FEDTINY_MSG_ACK ||
           type == FEDTINY_MSG_SECAGG_PEERS || type == FEDTINY_MSG_SECAGG_RELAY || type == FEDTINY_MSG_SECAGG_UNMASK;
}

static int is_encrypted_type(uint8_t type)
{
    return type == FEDTINY_MSG_DELTA || type == FEDTINY_MSG_GLOBAL_UPDATE || type == FEDTINY_MSG_SECAGG_REVEAL;
}

const char *fedtiny_env_reason(int status)
{
    switch (status) {
    case FEDTINY_ENV_OK: return "ok";
    case FEDTINY_ENV_DUPLICATE: return "duplicate";
    case FEDTINY_ENV_ERR_ARGUMENT: return "argument";
    case FEDTINY_ENV_ERR_BUFFER: return "buffer";
    case FEDTINY_ENV_ERR_TRUNCATED: return "truncated";
    case FEDTINY_ENV_ERR_TRAILING_BYTES: return "trailing-bytes";
    case FEDTINY_ENV_ERR_BAD_MAGIC: return "bad-magic";
    case FEDTINY_ENV_ERR_BAD_VERSION: return "bad-version";
    case FEDTINY_ENV_ERR_BAD_FLAGS: return "bad-flags";
    case FEDTINY_ENV_ERR_BAD_TYPE: return "bad-type";
    case FEDTINY_ENV_ERR_WRONG_FLEET: return "wrong-fleet";
    case FEDTINY_ENV_ERR_BAD_DIRECTION: return "bad-direction";
    case FEDTINY_ENV_ERR_WRONG_DEVICE: return "wrong-device";
    case FEDTINY_ENV_ERR_BAD_SIGNATURE: return "bad-signature";
    case FEDTINY_ENV_ERR_REPLAY: return "replay";
    case FEDTINY_ENV_ERR_STALE: return "stale";
    case FEDTINY_ENV_ERR_BAD_CIPHERTEXT: return "bad-ciphertext";
    default: return "unknown";
    }
}

/* ---- keys -------------------------------------------------------------------------------------------------- */

/* HKDF's extract and one expand block, with keyed BLAKE2b in place of HMAC. */
static void derive_from_shared(uint8_t key[32], const uint8_t shared[32], uint32_t fleet_id, uint32_t device_id,
                               uint8_t direction)
{
    uint8_t prk[64];
    uint8_t info[sizeof KDF_INFO + 10];
    crypto_blake2b_keyed(prk, sizeof prk, KDF_SALT, sizeof KDF_SALT, shared, 32);
    memcpy(info, KDF_INFO, sizeof KDF_INFO);
    store32(info + sizeof KDF_INFO, fleet_id);
    store32(info + sizeof KDF_INFO + 4, device_id);
    info[sizeof KDF_INFO + 8] = direction;
    info[sizeof KDF_INFO + 9] = 0x01u;
    crypto_blake2b_keyed(key, 32, prk, sizeof prk, info, sizeof info);
    crypto_wipe(prk, sizeof prk);
}

void fedtiny_env_derive_key(uint8_t key[32], const uint8_t own_x25519_secret[32],
                            const uint8_t peer_x25519_public[32], uint32_t fleet_id, uint32_t device_id,
                            uint8_t direction)
{
    uint8_t shared[32];
    crypto_x25519(shared, own_x25519_secret, peer_x25519_public);
    derive_from_shared(key, shared, fleet_id, device_id, direction);
    crypto_wipe(shared, sizeof shared);
}

static int node_init_unprofiled(fedtiny_env_node *node, uint32_t fleet_id, uint32_t device_id,
                                const uint8_t identity[FEDTINY_ENV_IDENTITY_BYTES],
                                const uint8_t coordinator_public[FEDTINY_ENV_PUBLIC_BYTES])
{
    static const uint8_t zero[32] = {0};
    uint8_t seed[32], public_key[32], shared[32];
    int low_order;
    memset(node, 0, sizeof *node);
    node->fleet_id = fleet_id;
    node->device_id = device_id;
    memcpy(seed, identity, sizeof seed); /* crypto_eddsa_key_pair wipes the seed it is given */
    crypto_eddsa_key_pair(node->sign_secret, public_key, seed);
    memcpy(node->coordinator_sign, coordinator_public, 32);
    crypto_x25519(shared, identity + 32, coordinator_public + 32);
    low_order = crypto_verify32(shared, zero) == 0;
    derive_from_shared(node->up_key, shared, fleet_id, device_id, FEDTINY_ENV_UP);
    derive_from_shared(node->down_key, shared, fleet_id, device_id, FEDTINY_ENV_DOWN);
    crypto_wipe(shared, sizeof shared);
    if (low_order) {
        fedtiny_env_node_wipe(node);
        return FEDTINY_ENV_ERR_ARGUMENT;
    }
    return FEDTINY_ENV_OK;
}

void fedtiny_env_node_wipe(fedtiny_env_node *node)
{
    crypto_wipe(node, sizeof *node);
}

/* ---- seal an uplink ---------------------------------------------------------------------------------------- */

static int seal_unprofiled(const fedtiny_env_node *node, uint8_t type, uint16_t flags, uint16_t run,
                           uint32_t round, uint32_t model_version, uint32_t seq, const uint8_t *body,
                           uint32_t body_len, uint8_t *out, size_t out_capacity, size_t *out_len)
{
    fedtiny_env_header h;
    uint8_t *payload = out + FEDTINY_ENV_HEADER_BYTES;
    uint64_t total;
    int encrypted = is_encrypted_type(type);
    if (!is_uplink_type(type) || (flags & ~(FEDTINY_ENV_FLAG_MASKED | FEDTINY_ENV_FLAG_LAST_WILL)) ||
        ((flags & FEDTINY_ENV_FLAG_MASKED) && type != FEDTINY_MSG_DELTA) ||
        ((flags & FEDTINY_ENV_FLAG_LAST_WILL) && type != FEDTINY_MSG_STATUS) ||
        body_len > UINT32_MAX - FEDTINY_ENV_TAG_BYTES) {
        return FEDTINY_ENV_ERR_ARGUMENT;
    }
    h.type = type;
    h.flags = (uint16_t)(flags | (encrypted ? FEDTINY_ENV_FLAG_ENCRYPTED : 0u));
    h.run = run;
    h.fleet_id = node->fleet_id;
    h.device_id = node->device_id;
    h.round = round;
    h.model_version = model_version;
    h.seq = seq;
    h.payload_len = body_len + (encrypted ? FEDTINY_ENV_TAG_BYTES : 0u);
    total = (uint64_t)FEDTINY_ENV_HEADER_BYTES + h.payload_len + FEDTINY_ENV_SIGNATURE_BYTES;
    if (total > out_capacity) {
        return FEDTINY_ENV_ERR_BUFFER;
    }
    if (body != payload && body_len > 0u) {
        memmove(payload, body, body_len);
    }
    pack_header(out, &h);
    if (encrypted) {
        crypto_aead_ctx ctx;
        uint8_t nonce[12];
        make_nonce(nonce, &h, FEDTINY_ENV_UP);
        crypto_aead_init_ietf(&ctx, node->up_key, nonce);
        crypto_aead_write(&ctx, payload, payload + body_len, out, FEDTINY_ENV_HEADER_BYTES, payload, body_len);
        crypto_wipe(&ctx, sizeof ctx);
    }
    crypto_eddsa_sign(payload + h.payload_len, node->sign_secret, out, FEDTINY_ENV_HEADER_BYTES + h.payload_len);
    *out_len = (size_t)total;
    return FEDTINY_ENV_OK;
}

/* ---- open a downlink --------------------------------------------------------------------------------------- */

static int open_unprofiled(const fedtiny_env_node *node, uint8_t *envelope, size_t length,
                           fedtiny_env_replay_hook hook, void *hook_context, fedtiny_env_header *header,
                           uint32_t *body_len)
{
    fedtiny_env_header h;
    uint8_t *payload = envelope + FEDTINY_ENV_HEADER_BYTES;
    const uint8_t *signature;
    uint64_t expected;
    uint32_t n;
    int encrypted;
    if (length < FEDTINY_ENV_HEADER_BYTES) {
        return FEDTINY_ENV_ERR_TRUNCATED;
    }
    if (envelope[0] != MAGIC[0] || envelope[1] != MAGIC[1]) {
        return FEDTINY_ENV_ERR_BAD_MAGIC;
    }
    if (envelope[2] != FEDTINY_ENV_VERSION) {
        return FEDTINY_ENV_ERR_BAD_VERSION;
    }
    h.type = envelope[3];
    h.flags = load16(envelope + 4);
    if (h.flags & ~KNOWN_FLAGS) {
        return FEDTINY_ENV_ERR_BAD_FLAGS;
    }
    h.run = load16(envelope + 6);
    if (h.type < FEDTINY_MSG_JOIN || h.type > FEDTINY_MSG_SECAGG_REVEAL) {
        return FEDTINY_ENV_ERR_BAD_TYPE;
    }
    h.fleet_id = load32(envelope + 8);
    h.device_id = load32(envelope + 12);
    h.round = load32(envelope + 16);
    h.model_version = load32(envelope + 20);
    h.seq = load32(envelope + 24);
    h.payload_len = load32(envelope + 28);
    if (h.fleet_id != node->fleet_id) {
        return FEDTINY_ENV_ERR_WRONG_FLEET;
    }
    expected = (uint64_t)FEDTINY_ENV_HEADER_BYTES + h.payload_len + FEDTINY_ENV_SIGNATURE_BYTES;
    if ((uint64_t)length != expected) {
        return (uint64_t)length < expected ? FEDTINY_ENV_ERR_TRUNCATED : FEDTINY_ENV_ERR_TRAILING_BYTES;
    }
    if (!(h.flags & FEDTINY_ENV_FLAG_DOWNLINK)) {
        return FEDTINY_ENV_ERR_BAD_DIRECTION; /* a node only accepts downlinks */
    }
    if (h.device_id != node->device_id && h.device_id != 0u) {
        return FEDTINY_ENV_ERR_WRONG_DEVICE;
    }
    if (!is_downlink_type(h.type)) {
        return FEDTINY_ENV_ERR_BAD_DIRECTION;
    }
    encrypted = (h.flags & FEDTINY_ENV_FLAG_ENCRYPTED) != 0u;
    if (encrypted != is_encrypted_type(h.type) ||
        ((h.flags & FEDTINY_ENV_FLAG_MASKED) && h.type != FEDTINY_MSG_DELTA) ||
        ((h.flags & FEDTINY_ENV_FLAG_LAST_WILL) && h.type != FEDTINY_MSG_STATUS) ||
        (encrypted && h.device_id == 0u)) {
        return FEDTINY_ENV_ERR_BAD_FLAGS;
    }
    signature = payload + h.payload_len;
    if (crypto_eddsa_check(signature, node->coordinator_sign, envelope, FEDTINY_ENV_HEADER_BYTES + h.payload_len)) {
        return FEDTINY_ENV_ERR_BAD_SIGNATURE;
    }
    if (hook != NULL) {
        int verdict = hook(hook_context, &h, signature);
        if (verdict != FEDTINY_ENV_OK) {
            return verdict;
        }
    }
    n = h.payload_len;
    if (encrypted) {
        crypto_aead_ctx ctx;
        uint8_t nonce[12];
        int mismatch;
        if (h.payload_len < FEDTINY_ENV_TAG_BYTES) {
            return FEDTINY_ENV_ERR_BAD_CIPHERTEXT;
        }
        n = h.payload_len - FEDTINY_ENV_TAG_BYTES;
        make_nonce(nonce, &h, FEDTINY_ENV_DOWN);
        crypto_aead_init_ietf(&ctx, node->down_key, nonce);
        /* Monocypher checks the tag before it decrypts: a forged payload leaves the buffer as it was. */
        mismatch = crypto_aead_read(&ctx, payload, payload + n, envelope, FEDTINY_ENV_HEADER_BYTES, payload, n);
        crypto_wipe(&ctx, sizeof ctx);
        if (mismatch) {
            return FEDTINY_ENV_ERR_BAD_CIPHERTEXT;
        }
    }
    *body_len = n;
    *header = h;
    return FEDTINY_ENV_OK;
}

/* ---- replay window ----------------------------------------------------------------------------------------- */

static fedtiny_env_stream *stream_of(fedtiny_env_replay *replay, const fedtiny_env_header *header)
{
    return header->device_id == 0u ? &replay->broadcast : &replay->addressed;
}

/* (run, round, seq) compared in that order, as envelope.Header.position */
static int newer(const fedtiny_env_header *h, const fedtiny_env_stream *s)
{
    if (!s->accepted_any) {
        return 1;
    }
    if (h->run != s->last_run) {
        return h->run > s->last_run;
    }
    if (h->round != s->last_round) {
        return h->round > s->last_round;
    }
    return h->seq > s->last_seq;
}

static int same_position(const fedtiny_env_header *h, const fedtiny_env_seen *seen)
{
    return seen->run == h->run && seen->round == h->round && seen->seq == h->seq;
}

int fedtiny_env_replay_check(void *replay, const fedtiny_env_header *header,
                             const uint8_t signature[FEDTINY_ENV_SIGNATURE_BYTES])
{
    const fedtiny_env_stream *s = stream_of((fedtiny_env_replay *)replay, header);
    uint8_t i;
    if (newer(header, s)) {
        return FEDTINY_ENV_OK;
    }
    for (i = 0; i < s->count; i++) {
        const fedtiny_env_seen *seen = &s->recent[i];
        if (same_position(header, seen)) {
            return crypto_verify64(seen->signature, signature) == 0 ? FEDTINY_ENV_DUPLICATE : FEDTINY_ENV_ERR_REPLAY;
        }
    }
    return FEDTINY_ENV_ERR_STALE;
}

void fedtiny_env_replay_commit(fedtiny_env_replay *replay, const fedtiny_env_header *header,
                               const uint8_t signature[FEDTINY_ENV_SIGNATURE_BYTES])
{
    fedtiny_env_stream *s = stream_of(replay, header);
    fedtiny_env_seen *seen = &s->recent[s->next];
    s->accepted_any = 1u;
    s->last_run = header->run;
    s->last_round = header->round;
    s->last_seq = header->seq;
    seen->run = header->run;
    seen->round = header->round;
    seen->seq = header->seq;
    memcpy(seen->signature, signature, FEDTINY_ENV_SIGNATURE_BYTES);
    s->next = (uint8_t)((s->next + 1u) % FEDTINY_ENV_REPLAY_WINDOW);
    if (s->count < FEDTINY_ENV_REPLAY_WINDOW) {
        s->count++;
    }
}

/* The public entry points: the work above, counted as the node's crypto (fedtiny_profile.h). */
int fedtiny_env_node_init(fedtiny_env_node *node, uint32_t fleet_id, uint32_t device_id,
                          const uint8_t identity[FEDTINY_ENV_IDENTITY_BYTES],
                          const uint8_t coordinator_public[FEDTINY_ENV_PUBLIC_BYTES])
{
    int status;
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_CRYPTO);
    status = node_init_unprofiled(node, fleet_id, device_id, identity, coordinator_public);
    FEDTINY_PROFILE_LEAVE();
    return status;
}

int fedtiny_env_seal(const fedtiny_env_node *node, uint8_t type, uint16_t flags, uint16_t run, uint32_t round,
                     uint32_t model_version, uint32_t seq, const uint8_t *body, uint32_t body_len, uint8_t *out,
                     size_t out_capacity, size_t *out_len)
{
    int status;
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_CRYPTO);
    status = seal_unprofiled(node, type, flags, run, round, model_version, seq, body, body_len, out, out_capacity,
                             out_len);
    FEDTINY_PROFILE_LEAVE();
    return status;
}

int fedtiny_env_open(const fedtiny_env_node *node, uint8_t *envelope, size_t length, fedtiny_env_replay_hook hook,
                     void *hook_context, fedtiny_env_header *header, uint32_t *body_len)
{
    int status;
    FEDTINY_PROFILE_ENTER(FEDTINY_PART_CRYPTO);
    status = open_unprofiled(node, envelope, length, hook, hook_context, header, body_len);
    FEDTINY_PROFILE_LEAVE();
    return status;
}
