/* For the "unsigned" fuzz builds only, never for a node: every signature verifies and decryption is a copy.
 * run_c_fuzz.py compiles fedtiny_envelope.c and this file with
 *     -Dcrypto_eddsa_check=fuzz_eddsa_check -Dcrypto_aead_read=fuzz_aead_read
 * so the envelope calls these instead of Monocypher's, and its seeds carry plaintext where ciphertext was.
 * That lets libFuzzer's mutations reach what only a coordinator's signature unlocks: the session's handling
 * of every decoded body. */
#include <string.h>

#include "monocypher.h"

int crypto_eddsa_check(const uint8_t signature[64], const uint8_t public_key[32], const uint8_t *message,
                       size_t message_size)
{
    (void)signature;
    (void)public_key;
    (void)message;
    (void)message_size;
    return 0;
}

int crypto_aead_read(crypto_aead_ctx *ctx, uint8_t *plain_text, const uint8_t mac[16], const uint8_t *ad,
                     size_t ad_size, const uint8_t *cipher_text, size_t text_size)
{
    (void)ctx;
    (void)mac;
    (void)ad;
    (void)ad_size;
    memmove(plain_text, cipher_text, text_size);
    return 0;
}
