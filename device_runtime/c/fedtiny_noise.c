/* fedtiny_noise.h: a device's differential-privacy noise, as fedtiny/protocol/noise.py draws it. */
#include "fedtiny_noise.h"

#include <string.h>

#include "monocypher.h"

static const char NOISE_KEY_MESSAGE[] = "fedtiny dp noise key v1"; /* noise.NOISE_KEY_MESSAGE, without the NUL */

void fedtiny_noise_key(const uint8_t identity[FEDTINY_NOISE_IDENTITY_BYTES], uint8_t key[FEDTINY_NOISE_KEY_BYTES])
{
    crypto_blake2b_keyed(key, FEDTINY_NOISE_KEY_BYTES, identity, FEDTINY_NOISE_IDENTITY_BYTES,
                         (const uint8_t *)NOISE_KEY_MESSAGE, sizeof NOISE_KEY_MESSAGE - 1u);
}

static uint64_t stream_word(void *ctx)
{
    fedtiny_noise_stream *s = (fedtiny_noise_stream *)ctx;
    uint64_t word = 0;
    int i;
    if (s->next >= 8u) { /* the next 64 bytes of keystream: ChaCha20 of zeros (a NULL plain text) */
        s->counter = crypto_chacha20_ietf(s->block, NULL, sizeof s->block, s->key, s->nonce, s->counter);
        s->next = 0u;
    }
    for (i = 7; i >= 0; i--) {
        word = (word << 8) | s->block[8u * s->next + (unsigned)i];
    }
    s->next++;
    return word;
}

void fedtiny_noise_stream_init(fedtiny_noise_stream *stream, const uint8_t key[FEDTINY_NOISE_KEY_BYTES], uint32_t run,
                               uint64_t round, fedtiny_noise_source *src)
{
    int i;
    memcpy(stream->key, key, FEDTINY_NOISE_KEY_BYTES);
    for (i = 0; i < 4; i++) {
        stream->nonce[i] = (uint8_t)(run >> (8 * i));
    }
    for (i = 0; i < 8; i++) {
        stream->nonce[4 + i] = (uint8_t)(round >> (8 * i));
    }
    stream->counter = 0u;
    stream->next = 8u;
    src->word = stream_word;
    src->ctx = stream;
    src->used = 0u;
}

void fedtiny_noise_stream_open(fedtiny_noise_stream *stream, const uint8_t identity[FEDTINY_NOISE_IDENTITY_BYTES],
                               uint32_t run, uint64_t round, fedtiny_noise_source *src)
{
    uint8_t key[FEDTINY_NOISE_KEY_BYTES];
    fedtiny_noise_key(identity, key);
    fedtiny_noise_stream_init(stream, key, run, round, src);
    crypto_wipe(key, sizeof key);
}

void fedtiny_noise_stream_wipe(fedtiny_noise_stream *stream)
{
    crypto_wipe(stream, sizeof *stream);
}

int fedtiny_noise_check(const fedtiny_wire_plan *plan, double sigma)
{
    uint16_t t;
    uint32_t r;
    uint64_t sigma2;
    if (!(sigma > 0.0)) return FEDTINY_WIRE_ERR_ARGUMENT;
    for (t = 0; t < plan->n_tensors; t++) {
        for (r = 0; r < plan->tensors[t].rows; r++) {
            int status = fedtiny_wire_row_sigma2(sigma, plan->tensors[t].scales[r], &sigma2);
            if (status) return status;
        }
    }
    return FEDTINY_WIRE_OK;
}

int fedtiny_noise_add(const fedtiny_wire_plan *plan, int32_t *values, double sigma, fedtiny_noise_source *src,
                      const int32_t *limits)
{
    uint16_t t;
    size_t k = 0;
    if (!(sigma > 0.0)) return FEDTINY_WIRE_ERR_ARGUMENT;
    for (t = 0; t < plan->n_tensors; t++) {
        const fedtiny_wire_tensor *tensor = &plan->tensors[t];
        const int64_t limit = limits != NULL ? (int64_t)limits[t]
                              : tensor->dtype == FEDTINY_WIRE_DTYPE_INT8 ? 255 : (int64_t)INT32_MAX;
        uint32_t r, j;
        for (r = 0; r < tensor->rows; r++) {
            uint64_t sigma2;
            int status = fedtiny_wire_row_sigma2(sigma, tensor->scales[r], &sigma2);
            if (status) return status;
            for (j = 0; j < tensor->inner; j++, k++) {
                int64_t noise, value;
                status = fedtiny_wire_discrete_gaussian(src, sigma2, &noise);
                if (status) return status;
                value = (int64_t)values[k] + noise;
                values[k] = (int32_t)(value > limit ? limit : value < -limit ? -limit : value);
            }
        }
    }
    return FEDTINY_WIRE_OK;
}
