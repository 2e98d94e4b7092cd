/* A device's steps of secure aggregation in C (fedtiny/protocol/secagg.py, SecAggDevice): the same keys,
 * signatures, share encryption, moduli, masks and packing as the Python device session, from the same identity,
 * fleet, run and round, so that a C node and Python nodes can sum in one round.
 *
 *     fedtiny_secagg_derive       RoundSecrets.derive: c_sk, s_sk and the self-mask seed from the identity secret
 *     fedtiny_secagg_keys         SecAggKeys: c_pk | s_pk | commitment | EdDSA signature (160 bytes)
 *     fedtiny_secagg_check_keys   secagg.check_keys: a neighbour's keys signed by its identity
 *     fedtiny_secagg_share        Shamir shares over GF(2^128) of the seed and of s_sk's two halves, for one
 *                                 neighbour's index: pycryptodome's Shamir.combine on the coordinator recovers them
 *     fedtiny_secagg_seal_share   seal_share / open_share: ChaCha20-Poly1305 (RFC 8439) under the X25519 agreement
 *     fedtiny_secagg_open_share   of c_sk and the neighbour's c_pk
 *     fedtiny_secagg_bounds       value_bounds and modulus_bits: what each buffer's values and the round's sum take
 *     fedtiny_secagg_bits
 *     fedtiny_secagg_mask         SecAggDevice.masked: clamp, add the self mask and the pairwise masks (ChaCha20
 *                                 keystreams) in Z/2^k, pack each buffer's k-bit values LSB first
 *
 * Primitives: Monocypher 4.0.3 (X25519, EdDSA with BLAKE2b as the envelope signs, keyed BLAKE2b, ChaCha20,
 * ChaCha20-Poly1305). Shamir's polynomial is evaluated at the share's index (1..64) by Horner's rule: the only
 * field arithmetic is a multiplication by that small index, done as shifts by x with the reduction by
 * x^128 + x^7 + x^2 + x + 1 (pycryptodome's field: 16 bytes big-endian, the least significant bit the constant
 * coefficient); tests/test_secagg_c.py combines the shares with pycryptodome on random secrets. The polynomial's
 * random coefficients come from a key derived beside the round secrets (a node has no entropy source to spare):
 * the same shares after a restart, unpredictable to anyone without the identity secret.
 *
 * Portable C99, no malloc; RAM: the 128-byte fedtiny_secagg_secrets, a ChaCha20 block and the info strings on
 * the stack. The masked values are computed in the caller's int32 values (4 bytes per trainable element). */
#ifndef FEDTINY_SECAGG_H
#define FEDTINY_SECAGG_H

#include <stddef.h>
#include <stdint.h>

#include "fedtiny_wire.h"

#define FEDTINY_SECAGG_MAX_NEIGHBOURS 64u  /* messages.SECAGG_MAX_NEIGHBOURS */
#define FEDTINY_SECAGG_KEYS_BYTES 160u     /* messages.SecAggKeys.LAYOUT */
#define FEDTINY_SECAGG_SHARE_PLAIN 60u     /* secagg._SHARE_PLAIN */
#define FEDTINY_SECAGG_SHARE_CIPHERTEXT 76u /* messages.SECAGG_SHARE_CIPHERTEXT: the plain text and the tag */
#define FEDTINY_SECAGG_SHARES_BYTES 48u    /* a neighbour's shares: the seed's, s_sk's low and high half's */
#define FEDTINY_SECAGG_NOISE_TAIL 12u      /* secagg.NOISE_TAIL */

enum {
    FEDTINY_SECAGG_OK = 0,
    FEDTINY_SECAGG_ERR_ARGUMENT = -1,     /* the caller's mistake (a threshold, index or count out of range) */
    FEDTINY_SECAGG_ERR_BAD_KEY = -2,      /* "bad-key": an X25519 agreement with a small-order public key */
    FEDTINY_SECAGG_ERR_BAD_SIGNATURE = -3, /* "bad-signature": keys not signed by the neighbour's identity */
    FEDTINY_SECAGG_ERR_BAD_SHARE = -4,    /* "bad-share": a share that does not decrypt or names another pair */
    FEDTINY_SECAGG_ERR_BAD_COHORT = -5,   /* "bad-cohort": the cohort's sum needs more than 32 bits per value */
    FEDTINY_SECAGG_ERR_BUFFER = -6,       /* the output buffer is too small */
    /* the device's round refusing a stage message (SecAggDevice's ProtocolError reasons) */
    FEDTINY_SECAGG_ERR_BAD_STAGE = -7,    /* "bad-stage": not this round's, or out of order */
    FEDTINY_SECAGG_ERR_BAD_PEERS = -8,    /* "bad-peers" */
    FEDTINY_SECAGG_ERR_BAD_THRESHOLD = -9, /* "bad-threshold" */
    FEDTINY_SECAGG_ERR_UNKNOWN_PEER = -10, /* "unknown-peer" */
    FEDTINY_SECAGG_ERR_BAD_RELAY = -11,   /* "bad-relay" */
    FEDTINY_SECAGG_ERR_TOO_FEW_NEIGHBOURS = -12, /* "too-few-neighbours" */
    FEDTINY_SECAGG_ERR_BAD_UNMASK = -13,  /* "bad-unmask" */
    FEDTINY_SECAGG_ERR_TOO_FEW_SURVIVORS = -14 /* "too-few-survivors" */
};

/* The "reason" token of a status, as secagg.py's ProtocolError names it. */
const char *fedtiny_secagg_reason(int status);

/* secagg.RoundContext: what binds every secret and signature to one round of one run of one fleet. */
typedef struct {
    uint32_t fleet_id, run, round;
} fedtiny_secagg_round;

/* A device's secrets for one round (secagg.RoundSecrets), and the key of its Shamir coefficients. */
typedef struct {
    fedtiny_secagg_round ctx;
    uint32_t device_id;
    uint8_t c_sk[32];
    uint8_t s_sk[32];
    uint8_t b_seed[16];
    uint8_t coefficient_key[32];
} fedtiny_secagg_secrets;

/* ctx.info(kind, ids...): "fedtiny/secagg/v1/" kind, then fleet, run, round and ids as u32 LE. Returns its
 * length (at most 64 for secagg.py's kinds and up to 2 ids). */
size_t fedtiny_secagg_info(const fedtiny_secagg_round *ctx, const char *kind, const uint32_t *ids, unsigned n_ids,
                           uint8_t out[64]);
/* secagg.kdf: 32 bytes, keyed BLAKE2b in the envelope's HKDF shape. */
void fedtiny_secagg_kdf(uint8_t out[32], const uint8_t *secret, size_t secret_len, const uint8_t *info,
                        size_t info_len);

void fedtiny_secagg_derive(fedtiny_secagg_secrets *secrets, const uint8_t identity[64],
                           const fedtiny_secagg_round *ctx, uint32_t device_id);
void fedtiny_secagg_wipe(fedtiny_secagg_secrets *secrets);
/* SECAGG_KEYS' body: c_pk | s_pk | commitment(b_seed) | the EdDSA signature of secagg.keys_message. */
void fedtiny_secagg_keys(const fedtiny_secagg_secrets *secrets, const uint8_t identity[64],
                         uint8_t out[FEDTINY_SECAGG_KEYS_BYTES]);
/* FEDTINY_SECAGG_OK if keys (a neighbour's SECAGG_KEYS body) carry peer_id's signature under its public identity
 * (identity.pub: EdDSA key | X25519 key), else FEDTINY_SECAGG_ERR_BAD_SIGNATURE. */
int fedtiny_secagg_check_keys(const uint8_t peer_public[64], const fedtiny_secagg_round *ctx, uint32_t peer_id,
                              const uint8_t keys[FEDTINY_SECAGG_KEYS_BYTES]);

/* The shares of index (1..64) for a threshold t (1..64): out = the seed's | s_sk[:16]'s | s_sk[16:]'s share,
 * each the degree t-1 polynomial with that secret as constant term evaluated at index. */
int fedtiny_secagg_share(const fedtiny_secagg_secrets *secrets, unsigned threshold, unsigned index,
                         uint8_t out[FEDTINY_SECAGG_SHARES_BYTES]);

/* share_key in both directions from one X25519 agreement of c_sk with a neighbour's c_pk: the key of the shares
 * this device seals for `peer`, and of those `peer` seals for it (a node keeps the second from the peers stage to
 * the relay instead of agreeing again). FEDTINY_SECAGG_ERR_BAD_KEY for a small-order c_pk. */
int fedtiny_secagg_share_keys(const fedtiny_secagg_secrets *secrets, const uint8_t peer_c_pk[32], uint32_t peer,
                              uint8_t seal_key[32], uint8_t open_key[32]);
/* seal_share / open_share under a key of fedtiny_secagg_share_keys. */
int fedtiny_secagg_seal_share_with(const fedtiny_secagg_secrets *secrets, const uint8_t key[32], uint32_t receiver,
                                   unsigned index, const uint8_t shares[FEDTINY_SECAGG_SHARES_BYTES],
                                   uint8_t out[FEDTINY_SECAGG_SHARE_CIPHERTEXT]);
int fedtiny_secagg_open_share_with(const fedtiny_secagg_secrets *secrets, const uint8_t key[32], uint32_t sender,
                                   const uint8_t ciphertext[FEDTINY_SECAGG_SHARE_CIPHERTEXT], unsigned *index,
                                   uint8_t shares[FEDTINY_SECAGG_SHARES_BYTES]);

/* seal_share: the shares for `receiver` under share_key(c_sk, receiver's c_pk) with AAD info("share-aad", sender,
 * receiver). FEDTINY_SECAGG_ERR_BAD_KEY for a small-order c_pk. */
int fedtiny_secagg_seal_share(const fedtiny_secagg_secrets *secrets, const uint8_t peer_c_pk[32], uint32_t receiver,
                              unsigned index, const uint8_t shares[FEDTINY_SECAGG_SHARES_BYTES],
                              uint8_t out[FEDTINY_SECAGG_SHARE_CIPHERTEXT]);
/* open_share: a share `sender` sealed for this device: *index (1..64) and its three shares; BAD_SHARE if it does
 * not decrypt or names another pair, index or a reserved field, BAD_KEY for a small-order c_pk. */
int fedtiny_secagg_open_share(const fedtiny_secagg_secrets *secrets, const uint8_t peer_c_pk[32], uint32_t sender,
                              const uint8_t ciphertext[FEDTINY_SECAGG_SHARE_CIPHERTEXT], unsigned *index,
                              uint8_t shares[FEDTINY_SECAGG_SHARES_BYTES]);

/* value_bounds: per trainable buffer B (values of a clipped, noised and clamped delta lie in [-B, B]).
 * clip_norm must be > 0 (FEDTINY_SECAGG_ERR_ARGUMENT); noise_sigma 0 for none (ERR_ARGUMENT if a row's noise
 * exceeds 2^40 LSB^2, as row_sigma2 refuses). */
int fedtiny_secagg_bounds(const fedtiny_wire_plan *plan, float clip_norm, float noise_sigma, int32_t *bounds);
/* modulus_bits: k per buffer with 2^k > 2 * cohort * B; FEDTINY_SECAGG_ERR_BAD_COHORT if a k exceeds 32. */
int fedtiny_secagg_bits(const fedtiny_wire_plan *plan, const int32_t *bounds, uint32_t cohort, uint8_t *bits);
/* The packed values' bytes: each buffer's elements * k bits, rounded up to 4 bytes. */
uint32_t fedtiny_secagg_packed_bytes(const fedtiny_wire_plan *plan, const uint8_t *bits);

/* SecAggDevice.masked's values: each of values (fedtiny_wire_uplink_values' layout) clamped to its buffer's
 * [-B, B], plus the self mask, plus the pairwise mask of each neighbour in `neighbours` (whose s_pk are given in
 * the same order; added when this device's id is the smaller, else subtracted), modulo 2^k, packed into `packed`
 * (fedtiny_secagg_packed_bytes). values is clobbered. BAD_KEY for a small-order s_pk (nothing is packed). Where
 * capacity holds 32 bytes per neighbour, packed also keeps the pairwise masks' keys between checking every
 * agreement and adding the masks (wiped before packing), so that each X25519 agreement runs once. */
int fedtiny_secagg_mask(const fedtiny_wire_plan *plan, const fedtiny_secagg_secrets *secrets, const int32_t *bounds,
                        const uint8_t *bits, const uint32_t *neighbours, const uint8_t (*s_pk)[32],
                        unsigned n_neighbours, int32_t *values, uint8_t *packed, size_t capacity, size_t *packed_len);

#endif
