/* A device's differential-privacy noise in C (fedtiny/protocol/noise.py): the same integers from the same key,
 * run and round as the Python device session, for the node's uplink (a noised plain DELTA: fedtiny_node_complete;
 * and the masked DELTA of secure aggregation).
 *
 *     fedtiny_noise_key           noise.noise_key: keyed BLAKE2b (Monocypher) of a fixed message under the node's
 *                                 64-byte identity secret
 *     fedtiny_noise_stream_init   noise.NoiseStream: 64-bit little-endian words of the ChaCha20 keystream (RFC 8439,
 *                                 Monocypher's crypto_chacha20_ietf), nonce = run u32 LE | round u64 LE, block 0 on;
 *                                 a fedtiny_noise_source for fedtiny_wire_discrete_gaussian
 *     fedtiny_noise_add           noise.add_noise: discrete Gaussian integers of standard deviation sigma (real
 *                                 units) on every element of a delta (fedtiny_wire_uplink_values'), clamped
 *
 * No malloc, no floats beyond fedtiny_wire_row_sigma2's one division and product per row; the sampler itself is
 * integer arithmetic (fedtiny_wire.c). RAM: the 116-byte stream state (a keystream block, the key and nonce).
 * Cortex-M4 (arm-none-eabi-gcc -O2): 664 B of code beside the wire's sampler and Monocypher; fedtiny_noise_add's
 * frame about 100 B (-fstack-usage) on top of fedtiny_wire_discrete_gaussian's. */
#ifndef FEDTINY_NOISE_H
#define FEDTINY_NOISE_H

#include <stdint.h>

#include "fedtiny_wire.h"

#define FEDTINY_NOISE_KEY_BYTES 32u
#define FEDTINY_NOISE_IDENTITY_BYTES 64u

typedef struct {
    uint8_t key[FEDTINY_NOISE_KEY_BYTES];
    uint8_t nonce[12];
    uint32_t counter; /* the next keystream block */
    uint8_t block[64];
    uint8_t next; /* the next unread word of block, 8 when it is spent */
} fedtiny_noise_stream;

/* key = BLAKE2b-256 keyed with identity (64 bytes: EdDSA seed | X25519 scalar) of "fedtiny dp noise key v1". */
void fedtiny_noise_key(const uint8_t identity[FEDTINY_NOISE_IDENTITY_BYTES], uint8_t key[FEDTINY_NOISE_KEY_BYTES]);

/* The stream for (key, run, round), and src drawing its words (src->used counts them). */
void fedtiny_noise_stream_init(fedtiny_noise_stream *stream, const uint8_t key[FEDTINY_NOISE_KEY_BYTES], uint32_t run,
                               uint64_t round, fedtiny_noise_source *src);

/* The stream of the node's own noise key (fedtiny_noise_key of identity) for (run, round): what the uplink draws
 * from (device.py's NoiseStream(noise_key(identity), run, round)); the key is not kept beyond the stream. */
void fedtiny_noise_stream_open(fedtiny_noise_stream *stream, const uint8_t identity[FEDTINY_NOISE_IDENTITY_BYTES],
                               uint32_t run, uint64_t round, fedtiny_noise_source *src);

/* Wipe the stream's key and keystream. */
void fedtiny_noise_stream_wipe(fedtiny_noise_stream *stream);

/* FEDTINY_WIRE_OK if every row's s = fedtiny_wire_row_sigma2(sigma, the row's scale) is at most 2^40 LSB^2 and
 * sigma > 0, else FEDTINY_WIRE_ERR_ARGUMENT: what fedtiny_noise_add would refuse, asked before anything changes. */
int fedtiny_noise_check(const fedtiny_wire_plan *plan, double sigma);

/* noise.add_noise over values in place (fedtiny_wire_uplink_values' layout: every trainable element as int32,
 * buffers in plan order back to back): rows in order, elements in order, each plus one discrete Gaussian of
 * s = fedtiny_wire_row_sigma2(sigma, the row's scale) LSB^2, then clamped to [-limit, limit]: limits[t] per buffer
 * (secure aggregation's secagg.value_bounds), or with limits NULL a DELTA's (255 for a weight, 2^31 - 1 for a
 * bias). FEDTINY_WIRE_ERR_ARGUMENT for sigma <= 0 or a row whose s exceeds 2^40 LSB^2 (values are then partly
 * noised: fedtiny_noise_check first). */
int fedtiny_noise_add(const fedtiny_wire_plan *plan, int32_t *values, double sigma, fedtiny_noise_source *src,
                      const int32_t *limits);

#endif
