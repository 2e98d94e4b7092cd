/* fedtiny_secagg.h: a device's steps of secure aggregation, as fedtiny/protocol/secagg.py takes them. */
#include "fedtiny_secagg.h"

#include <math.h>
#include <string.h>

#include "monocypher.h"

static const char LABEL[] = "fedtiny/secagg/v1"; /* secagg.LABEL, without the NUL */
static const char COMMIT_KEY[] = "fedtiny/secagg/v1/commit";
#define LABEL_LEN (sizeof LABEL - 1u)

const char *fedtiny_secagg_reason(int status)
{
    switch (status) {
    case FEDTINY_SECAGG_OK: return "ok";
    case FEDTINY_SECAGG_ERR_ARGUMENT: return "argument";
    case FEDTINY_SECAGG_ERR_BAD_KEY: return "bad-key";
    case FEDTINY_SECAGG_ERR_BAD_SIGNATURE: return "bad-signature";
    case FEDTINY_SECAGG_ERR_BAD_SHARE: return "bad-share";
    case FEDTINY_SECAGG_ERR_BAD_COHORT: return "bad-cohort";
    case FEDTINY_SECAGG_ERR_BUFFER: return "buffer";
    case FEDTINY_SECAGG_ERR_BAD_STAGE: return "bad-stage";
    case FEDTINY_SECAGG_ERR_BAD_PEERS: return "bad-peers";
    case FEDTINY_SECAGG_ERR_BAD_THRESHOLD: return "bad-threshold";
    case FEDTINY_SECAGG_ERR_UNKNOWN_PEER: return "unknown-peer";
    case FEDTINY_SECAGG_ERR_BAD_RELAY: return "bad-relay";
    case FEDTINY_SECAGG_ERR_TOO_FEW_NEIGHBOURS: return "too-few-neighbours";
    case FEDTINY_SECAGG_ERR_BAD_UNMASK: return "bad-unmask";
    case FEDTINY_SECAGG_ERR_TOO_FEW_SURVIVORS: return "too-few-survivors";
    default: return "unknown";
    }
}

static void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

size_t fedtiny_secagg_info(const fedtiny_secagg_round *ctx, const char *kind, const uint32_t *ids, unsigned n_ids,
                           uint8_t out[64])
{
    size_t kind_len = strlen(kind), at = LABEL_LEN + 1u + kind_len;
    unsigned i;
    memcpy(out, LABEL, LABEL_LEN);
    out[LABEL_LEN] = '/';
    memcpy(out + LABEL_LEN + 1u, kind, kind_len);
    wr32(out + at, ctx->fleet_id);
    wr32(out + at + 4u, ctx->run);
    wr32(out + at + 8u, ctx->round);
    at += 12u;
    for (i = 0; i < n_ids; i++, at += 4u) {
        wr32(out + at, ids[i]);
    }
    return at;
}

void fedtiny_secagg_kdf(uint8_t out[32], const uint8_t *secret, size_t secret_len, const uint8_t *info,
                        size_t info_len)
{
    uint8_t prk[64], message[65];
    crypto_blake2b_keyed(prk, sizeof prk, (const uint8_t *)LABEL, LABEL_LEN, secret, secret_len);
    memcpy(message, info, info_len);
    message[info_len] = 0x01u;
    crypto_blake2b_keyed(out, 32, prk, sizeof prk, message, info_len + 1u);
    crypto_wipe(prk, sizeof prk);
}

/* An X25519 agreement; FEDTINY_SECAGG_ERR_BAD_KEY when it is all zero (a small-order public key). */
static int agree(uint8_t shared[32], const uint8_t secret[32], const uint8_t public_key[32])
{
    uint8_t any = 0;
    int i;
    crypto_x25519(shared, secret, public_key);
    for (i = 0; i < 32; i++) {
        any |= shared[i];
    }
    return any ? FEDTINY_SECAGG_OK : FEDTINY_SECAGG_ERR_BAD_KEY;
}

void fedtiny_secagg_derive(fedtiny_secagg_secrets *secrets, const uint8_t identity[64],
                           const fedtiny_secagg_round *ctx, uint32_t device_id)
{
    uint8_t info[64], root[64], part[32];
    size_t n = fedtiny_secagg_info(ctx, "secrets", &device_id, 1u, info);
    memset(secrets, 0, sizeof *secrets);
    secrets->ctx = *ctx;
    secrets->device_id = device_id;
    crypto_blake2b_keyed(root, sizeof root, identity, 64, info, n);
    crypto_blake2b_keyed(secrets->c_sk, 32, root, sizeof root, (const uint8_t *)"c", 1);
    crypto_blake2b_keyed(secrets->s_sk, 32, root, sizeof root, (const uint8_t *)"s", 1);
    crypto_blake2b_keyed(part, 32, root, sizeof root, (const uint8_t *)"b", 1);
    memcpy(secrets->b_seed, part, 16); /* RoundSecrets: part(b"b")[:16] */
    /* the key of this node's Shamir coefficients (secagg.py RoundSecrets.shamir_key, shamir_split) */
    crypto_blake2b_keyed(secrets->coefficient_key, 32, root, sizeof root, (const uint8_t *)"shamir", 6);
    crypto_wipe(root, sizeof root);
    crypto_wipe(part, sizeof part);
}

void fedtiny_secagg_wipe(fedtiny_secagg_secrets *secrets)
{
    crypto_wipe(secrets, sizeof *secrets);
}

/* secagg.keys_message: info("keys", id) | c_pk | s_pk | commitment (at most 64 + 96 bytes). */
static size_t keys_message(const fedtiny_secagg_round *ctx, uint32_t device_id, const uint8_t keys[96],
                           uint8_t out[160])
{
    size_t n = fedtiny_secagg_info(ctx, "keys", &device_id, 1u, out);
    memcpy(out + n, keys, 96);
    return n + 96u;
}

void fedtiny_secagg_keys(const fedtiny_secagg_secrets *secrets, const uint8_t identity[64],
                         uint8_t out[FEDTINY_SECAGG_KEYS_BYTES])
{
    uint8_t seed[32], sign_secret[64], sign_public[32], message[160];
    size_t n;
    crypto_x25519_public_key(out, secrets->c_sk);
    crypto_x25519_public_key(out + 32, secrets->s_sk);
    crypto_blake2b_keyed(out + 64, 32, (const uint8_t *)COMMIT_KEY, sizeof COMMIT_KEY - 1u, secrets->b_seed, 16);
    n = keys_message(&secrets->ctx, secrets->device_id, out, message);
    memcpy(seed, identity, sizeof seed); /* crypto_eddsa_key_pair wipes the seed it is given */
    crypto_eddsa_key_pair(sign_secret, sign_public, seed);
    crypto_eddsa_sign(out + 96, sign_secret, message, n);
    crypto_wipe(sign_secret, sizeof sign_secret);
}

int fedtiny_secagg_check_keys(const uint8_t peer_public[64], const fedtiny_secagg_round *ctx, uint32_t peer_id,
                              const uint8_t keys[FEDTINY_SECAGG_KEYS_BYTES])
{
    uint8_t message[160];
    size_t n = keys_message(ctx, peer_id, keys, message);
    return crypto_eddsa_check(keys + 96, peer_public, message, n) ? FEDTINY_SECAGG_ERR_BAD_SIGNATURE
                                                                 : FEDTINY_SECAGG_OK;
}

/* ---- Shamir's sharing over pycryptodome's GF(2^128) ---------------------------------------------------------- */

typedef struct {
    uint64_t hi, lo; /* the 16-byte big-endian encoding: bit 0 of lo is the constant coefficient */
} gf128;

static gf128 gf_load(const uint8_t b[16])
{
    gf128 a = {0, 0};
    int i;
    for (i = 0; i < 8; i++) {
        a.hi = (a.hi << 8) | b[i];
        a.lo = (a.lo << 8) | b[8 + i];
    }
    return a;
}

static void gf_store(gf128 a, uint8_t b[16])
{
    int i;
    for (i = 7; i >= 0; i--) {
        b[i] = (uint8_t)a.hi;
        b[8 + i] = (uint8_t)a.lo;
        a.hi >>= 8;
        a.lo >>= 8;
    }
}

/* a * x, reduced by x^128 + x^7 + x^2 + x + 1 (0x87 below x^128) */
static gf128 gf_times_x(gf128 a)
{
    uint64_t carry = a.hi >> 63;
    a.hi = (a.hi << 1) | (a.lo >> 63);
    a.lo = (a.lo << 1) ^ (carry * 0x87u);
    return a;
}

/* a * k for a small k (the share's index: an element of degree below 7), bit by bit from the top */
static gf128 gf_times_small(gf128 a, unsigned k)
{
    gf128 r = {0, 0};
    int bit;
    for (bit = 7; bit >= 0; bit--) {
        r = gf_times_x(r);
        if ((k >> bit) & 1u) {
            r.hi ^= a.hi;
            r.lo ^= a.lo;
        }
    }
    return r;
}

/* Coefficient `degree` (1..t-1) of the polynomial of secret `which` (0: seed, 1: s_sk low, 2: s_sk high). */
static gf128 coefficient(const fedtiny_secagg_secrets *secrets, unsigned which, unsigned degree)
{
    uint8_t tag[2], out[16];
    gf128 c;
    tag[0] = (uint8_t)which;
    tag[1] = (uint8_t)degree;
    crypto_blake2b_keyed(out, sizeof out, secrets->coefficient_key, 32, tag, sizeof tag);
    c = gf_load(out);
    crypto_wipe(out, sizeof out);
    return c;
}

int fedtiny_secagg_share(const fedtiny_secagg_secrets *secrets, unsigned threshold, unsigned index,
                         uint8_t out[FEDTINY_SECAGG_SHARES_BYTES])
{
    const uint8_t *secret[3];
    unsigned which, degree;
    if (threshold < 1u || threshold > FEDTINY_SECAGG_MAX_NEIGHBOURS || index < 1u ||
        index > FEDTINY_SECAGG_MAX_NEIGHBOURS) {
        return FEDTINY_SECAGG_ERR_ARGUMENT;
    }
    secret[0] = secrets->b_seed;
    secret[1] = secrets->s_sk;
    secret[2] = secrets->s_sk + 16;
    for (which = 0; which < 3u; which++) {
        gf128 y = {0, 0}, s;
        for (degree = threshold - 1u; degree >= 1u; degree--) { /* Horner, the highest degree first */
            gf128 c = coefficient(secrets, which, degree);
            y.hi ^= c.hi;
            y.lo ^= c.lo;
            y = gf_times_small(y, index);
        }
        s = gf_load(secret[which]);
        y.hi ^= s.hi;
        y.lo ^= s.lo;
        gf_store(y, out + 16u * which);
    }
    return FEDTINY_SECAGG_OK;
}

/* ---- share encryption --------------------------------------------------------------------------------------- */

static void share_kdf(uint8_t key[32], const fedtiny_secagg_round *ctx, const uint8_t shared[32], uint32_t sender,
                      uint32_t receiver)
{
    uint8_t info[64];
    uint32_t ids[2];
    ids[0] = sender;
    ids[1] = receiver;
    fedtiny_secagg_kdf(key, shared, 32, info, fedtiny_secagg_info(ctx, "share", ids, 2u, info));
}

int fedtiny_secagg_share_keys(const fedtiny_secagg_secrets *secrets, const uint8_t peer_c_pk[32], uint32_t peer,
                              uint8_t seal_key[32], uint8_t open_key[32])
{
    uint8_t shared[32];
    int status = agree(shared, secrets->c_sk, peer_c_pk);
    if (status == FEDTINY_SECAGG_OK) {
        share_kdf(seal_key, &secrets->ctx, shared, secrets->device_id, peer);
        share_kdf(open_key, &secrets->ctx, shared, peer, secrets->device_id);
    }
    crypto_wipe(shared, sizeof shared);
    return status;
}

static size_t share_aad(const fedtiny_secagg_round *ctx, uint32_t sender, uint32_t receiver, uint8_t info[64])
{
    uint32_t ids[2];
    ids[0] = sender;
    ids[1] = receiver;
    return fedtiny_secagg_info(ctx, "share-aad", ids, 2u, info);
}

int fedtiny_secagg_seal_share_with(const fedtiny_secagg_secrets *secrets, const uint8_t key[32], uint32_t receiver,
                                   unsigned index, const uint8_t shares[FEDTINY_SECAGG_SHARES_BYTES],
                                   uint8_t out[FEDTINY_SECAGG_SHARE_CIPHERTEXT])
{
    static const uint8_t nonce[12] = {0};
    uint8_t plain[FEDTINY_SECAGG_SHARE_PLAIN], aad[64];
    crypto_aead_ctx ctx;
    size_t n;
    if (index < 1u || index > FEDTINY_SECAGG_MAX_NEIGHBOURS) {
        return FEDTINY_SECAGG_ERR_ARGUMENT;
    }
    wr32(plain, secrets->device_id); /* from | to | index u16 | reserved u16 | b | s_lo | s_hi */
    wr32(plain + 4, receiver);
    plain[8] = (uint8_t)index;
    plain[9] = (uint8_t)(index >> 8);
    plain[10] = plain[11] = 0;
    memcpy(plain + 12, shares, FEDTINY_SECAGG_SHARES_BYTES);
    n = share_aad(&secrets->ctx, secrets->device_id, receiver, aad);
    crypto_aead_init_ietf(&ctx, key, nonce);
    crypto_aead_write(&ctx, out, out + FEDTINY_SECAGG_SHARE_PLAIN, aad, n, plain, sizeof plain);
    crypto_wipe(&ctx, sizeof ctx);
    crypto_wipe(plain, sizeof plain);
    return FEDTINY_SECAGG_OK;
}

int fedtiny_secagg_open_share_with(const fedtiny_secagg_secrets *secrets, const uint8_t key[32], uint32_t sender,
                                   const uint8_t ciphertext[FEDTINY_SECAGG_SHARE_CIPHERTEXT], unsigned *index,
                                   uint8_t shares[FEDTINY_SECAGG_SHARES_BYTES])
{
    static const uint8_t nonce[12] = {0};
    uint8_t plain[FEDTINY_SECAGG_SHARE_PLAIN], aad[64];
    crypto_aead_ctx ctx;
    unsigned got;
    size_t n = share_aad(&secrets->ctx, sender, secrets->device_id, aad);
    int status;
    crypto_aead_init_ietf(&ctx, key, nonce);
    status = crypto_aead_read(&ctx, plain, ciphertext + FEDTINY_SECAGG_SHARE_PLAIN, aad, n, ciphertext,
                              FEDTINY_SECAGG_SHARE_PLAIN) ? FEDTINY_SECAGG_ERR_BAD_SHARE : FEDTINY_SECAGG_OK;
    crypto_wipe(&ctx, sizeof ctx);
    got = (unsigned)plain[8] | ((unsigned)plain[9] << 8);
    if (status == FEDTINY_SECAGG_OK &&
        (rd32(plain) != sender || rd32(plain + 4) != secrets->device_id || plain[10] != 0 || plain[11] != 0 ||
         got < 1u || got > FEDTINY_SECAGG_MAX_NEIGHBOURS)) {
        status = FEDTINY_SECAGG_ERR_BAD_SHARE;
    }
    if (status == FEDTINY_SECAGG_OK) {
        *index = got;
        memcpy(shares, plain + 12, FEDTINY_SECAGG_SHARES_BYTES);
    }
    crypto_wipe(plain, sizeof plain);
    return status;
}

int fedtiny_secagg_seal_share(const fedtiny_secagg_secrets *secrets, const uint8_t peer_c_pk[32], uint32_t receiver,
                              unsigned index, const uint8_t shares[FEDTINY_SECAGG_SHARES_BYTES],
                              uint8_t out[FEDTINY_SECAGG_SHARE_CIPHERTEXT])
{
    uint8_t seal_key[32], open_key[32];
    int status = fedtiny_secagg_share_keys(secrets, peer_c_pk, receiver, seal_key, open_key);
    if (status == FEDTINY_SECAGG_OK) {
        status = fedtiny_secagg_seal_share_with(secrets, seal_key, receiver, index, shares, out);
    }
    crypto_wipe(seal_key, sizeof seal_key);
    crypto_wipe(open_key, sizeof open_key);
    return status;
}

int fedtiny_secagg_open_share(const fedtiny_secagg_secrets *secrets, const uint8_t peer_c_pk[32], uint32_t sender,
                              const uint8_t ciphertext[FEDTINY_SECAGG_SHARE_CIPHERTEXT], unsigned *index,
                              uint8_t shares[FEDTINY_SECAGG_SHARES_BYTES])
{
    uint8_t seal_key[32], open_key[32];
    int status = fedtiny_secagg_share_keys(secrets, peer_c_pk, sender, seal_key, open_key);
    if (status == FEDTINY_SECAGG_OK) {
        status = fedtiny_secagg_open_share_with(secrets, open_key, sender, ciphertext, index, shares);
    }
    crypto_wipe(seal_key, sizeof seal_key);
    crypto_wipe(open_key, sizeof open_key);
    return status;
}

/* ---- moduli and masks --------------------------------------------------------------------------------------- */

static uint64_t isqrt(uint64_t v)
{
    uint64_t r = (uint64_t)sqrt((double)v);
    while (r > 0 && r * r > v) r--;
    while ((r + 1u) * (r + 1u) <= v) r++;
    return r;
}

int fedtiny_secagg_bounds(const fedtiny_wire_plan *plan, float clip_norm, float noise_sigma, int32_t *bounds)
{
    uint16_t t;
    if (!(clip_norm > 0.0f) || !(noise_sigma >= 0.0f)) {
        return FEDTINY_SECAGG_ERR_ARGUMENT;
    }
    for (t = 0; t < plan->n_tensors; t++) {
        const fedtiny_wire_tensor *tensor = &plan->tensors[t];
        const int64_t limit = tensor->dtype == FEDTINY_WIRE_DTYPE_INT8 ? 255 : INT32_MAX;
        int64_t most = 0;
        uint32_t r;
        for (r = 0; r < tensor->rows; r++) {
            const double q = floor((double)clip_norm / tensor->scales[r]) + 1.0; /* as math.floor(c / s) + 1 */
            int64_t b = q >= (double)limit ? limit : (int64_t)q;
            if (noise_sigma > 0.0f) {
                uint64_t sigma2;
                if (fedtiny_wire_row_sigma2((double)noise_sigma, tensor->scales[r], &sigma2) != FEDTINY_WIRE_OK) {
                    return FEDTINY_SECAGG_ERR_ARGUMENT;
                }
                b += (int64_t)FEDTINY_SECAGG_NOISE_TAIL * (int64_t)(isqrt(sigma2) + 1u);
            }
            if (b > most) most = b;
        }
        bounds[t] = (int32_t)(most > INT32_MAX ? INT32_MAX : most);
    }
    return FEDTINY_SECAGG_OK;
}

int fedtiny_secagg_bits(const fedtiny_wire_plan *plan, const int32_t *bounds, uint32_t cohort, uint8_t *bits)
{
    uint16_t t;
    if (cohort < 1u) {
        return FEDTINY_SECAGG_ERR_BAD_COHORT;
    }
    for (t = 0; t < plan->n_tensors; t++) {
        uint64_t span = 2u * (uint64_t)cohort * (uint64_t)bounds[t]; /* < 2^65 would need care: cohort < 2^16 */
        uint8_t k = 0;
        while (span) {
            k++;
            span >>= 1;
        }
        if (k > 32u) {
            return FEDTINY_SECAGG_ERR_BAD_COHORT;
        }
        bits[t] = k;
    }
    return FEDTINY_SECAGG_OK;
}

static uint64_t tensor_elements(const fedtiny_wire_tensor *t)
{
    return (uint64_t)t->rows * t->inner;
}

uint32_t fedtiny_secagg_packed_bytes(const fedtiny_wire_plan *plan, const uint8_t *bits)
{
    uint64_t total = 0;
    uint16_t t;
    for (t = 0; t < plan->n_tensors; t++) {
        uint64_t n = (tensor_elements(&plan->tensors[t]) * bits[t] + 7u) / 8u;
        total += (n + 3u) & ~(uint64_t)3u;
    }
    return (uint32_t)total;
}

/* values += sign * (the ChaCha20 keystream of key, nonce 0, counter 0, one u32 LE word per element, in plan order) */
static void add_mask(uint32_t *values, uint32_t count, const uint8_t key[32], int subtract)
{
    static const uint8_t nonce[12] = {0};
    uint8_t block[256]; /* four ChaCha20 blocks a call: the call's setup is paid once per 64 words */
    uint32_t e = 0, counter = 0;
    while (e < count) {
        unsigned w;
        counter = crypto_chacha20_ietf(block, NULL, sizeof block, key, nonce, counter);
        for (w = 0; w < sizeof block / 4u && e < count; w++, e++) {
            const uint32_t m = rd32(block + 4u * w);
            values[e] = subtract ? values[e] - m : values[e] + m;
        }
    }
    crypto_wipe(block, sizeof block);
}

/* The pairwise mask's key with neighbour v from the X25519 agreement: the KDF of "mask" and both ids, smaller
 * first (info: 64 bytes of room). */
static void mask_key(uint8_t key[32], const uint8_t shared[32], const fedtiny_secagg_secrets *secrets, uint32_t v,
                     uint8_t *info)
{
    uint32_t ids[2];
    ids[0] = secrets->device_id < v ? secrets->device_id : v;
    ids[1] = secrets->device_id < v ? v : secrets->device_id;
    fedtiny_secagg_kdf(key, shared, 32, info, fedtiny_secagg_info(&secrets->ctx, "mask", ids, 2u, info));
}

int fedtiny_secagg_mask(const fedtiny_wire_plan *plan, const fedtiny_secagg_secrets *secrets, const int32_t *bounds,
                        const uint8_t *bits, const uint32_t *neighbours, const uint8_t (*s_pk)[32],
                        unsigned n_neighbours, int32_t *values, uint8_t *packed, size_t capacity, size_t *packed_len)
{
    /* the masks are sums modulo 2^32 of the values' two's complement: 2^k divides 2^32, so reducing at the end
     * gives SecAggDevice.masked's values modulo 2^k */
    uint32_t *sums = (uint32_t *)values;
    const uint32_t count = fedtiny_wire_elements(plan), need = fedtiny_secagg_packed_bytes(plan, bits);
    uint8_t key[32], info[64];
    uint32_t e = 0, at = 0;
    uint16_t t;
    unsigned i;
    /* Each pairwise mask's key, kept in `packed` (not yet written) between the check and the masks where it
     * fits: an X25519 agreement costs about 1.2 M instructions on the M4, the rest of a mask far less. */
    const int keep = (size_t)n_neighbours * 32u <= capacity;
    if (capacity < need) {
        return FEDTINY_SECAGG_ERR_BUFFER;
    }
    for (i = 0; i < n_neighbours; i++) { /* every agreement first: a bad key refuses before anything changes */
        uint8_t shared[32];
        int status = agree(shared, secrets->s_sk, s_pk[i]);
        if (status == FEDTINY_SECAGG_OK && keep) {
            mask_key(packed + 32u * i, shared, secrets, neighbours[i], info);
        }
        crypto_wipe(shared, sizeof shared);
        if (status != FEDTINY_SECAGG_OK) {
            if (keep) {
                crypto_wipe(packed, 32u * i);
            }
            return status;
        }
    }
    for (t = 0; t < plan->n_tensors; t++) { /* clamp to [-B, B] */
        const int32_t b = bounds[t];
        uint64_t k, n = tensor_elements(&plan->tensors[t]);
        for (k = 0; k < n; k++, e++) {
            values[e] = values[e] > b ? b : values[e] < -b ? -b : values[e];
        }
    }
    fedtiny_secagg_kdf(key, secrets->b_seed, 16, info,
                       fedtiny_secagg_info(&secrets->ctx, "self", &secrets->device_id, 1u, info));
    add_mask(sums, count, key, 0);
    for (i = 0; i < n_neighbours; i++) {
        if (keep) {
            memcpy(key, packed + 32u * i, sizeof key);
        } else {
            uint8_t shared[32];
            (void)agree(shared, secrets->s_sk, s_pk[i]);
            mask_key(key, shared, secrets, neighbours[i], info);
            crypto_wipe(shared, sizeof shared);
        }
        add_mask(sums, count, key, secrets->device_id > neighbours[i]);
    }
    crypto_wipe(key, sizeof key);
    if (keep) {
        crypto_wipe(packed, 32u * n_neighbours);
    }
    /* pack each buffer's k-bit values LSB first, zero-padded to 4 bytes */
    memset(packed, 0, need);
    for (t = 0, e = 0; t < plan->n_tensors; t++) {
        const unsigned k = bits[t];
        const uint32_t mask = k >= 32u ? 0xFFFFFFFFu : ((uint32_t)1 << k) - 1u;
        uint64_t j, n = tensor_elements(&plan->tensors[t]), bit = 0;
        for (j = 0; j < n; j++, e++, bit += k) {
            const uint64_t v = (uint64_t)(sums[e] & mask) << (bit & 7u); /* at most 39 bits */
            uint64_t byte = at + bit / 8u;
            unsigned s;
            for (s = 0; s < 5u && (v >> (8u * s)) != 0; s++) {
                packed[byte + s] |= (uint8_t)(v >> (8u * s));
            }
        }
        at += (uint32_t)((((n * k + 7u) / 8u) + 3u) & ~(uint64_t)3u);
    }
    *packed_len = need;
    return FEDTINY_SECAGG_OK;
}
