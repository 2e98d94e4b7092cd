/* Bare-metal firmware for Cortex-M (QEMU mps2-an386) that runs the node's crypto once per operation between the
 * instruction-count markers (tools/insn_count.c counts each region) and measures each operation's peak stack:
 *
 *   keys     fedtiny_env_node_init: EdDSA key pair, one X25519, two key derivations
 *   x25519   crypto_x25519 alone
 *   sign     crypto_eddsa_sign of a 32-byte header
 *   verify   crypto_eddsa_check of it
 *   seal     fedtiny_env_seal of the DELTA body in crypto_vectors.c (encrypt + sign)
 *   open     fedtiny_env_open of the coordinator's GLOBAL_UPDATE in crypto_vectors.c (verify + decrypt)
 *
 * It prints one line "op NAME stack BYTES" per operation, then "uplink HEX" (the sealed DELTA, for the host to
 * open) and "downlink STATUS body_len N fnv XXXXXXXX" (FNV-1a 32 of the decrypted body), and exits 0, or 1 if an
 * operation failed. crypto_vectors.c is written by fedtiny_device.cruntime.render_crypto_vectors. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fedtiny_boot.h"
#include "fedtiny_envelope.h"
#include "monocypher.h"

extern const uint32_t fedtiny_cv_fleet_id, fedtiny_cv_device_id, fedtiny_cv_round, fedtiny_cv_seq;
extern const uint16_t fedtiny_cv_run;
extern const uint8_t fedtiny_cv_identity[FEDTINY_ENV_IDENTITY_BYTES];
extern const uint8_t fedtiny_cv_coordinator[FEDTINY_ENV_PUBLIC_BYTES];
extern const uint32_t fedtiny_cv_uplink_body_len, fedtiny_cv_downlink_len;
extern const uint8_t fedtiny_cv_uplink_body[];
extern const uint8_t fedtiny_cv_downlink[];

static fedtiny_env_node node;
static fedtiny_env_replay replay;
static uint8_t uplink[FEDTINY_ENV_SEALED_BYTES(2048)];
static uint8_t downlink[FEDTINY_ENV_SEALED_BYTES(2048)];

static uint32_t fnv1a(const uint8_t *bytes, uint32_t n)
{
    uint32_t h = 2166136261u;
    uint32_t i;
    for (i = 0; i < n; i++) {
        h = (h ^ bytes[i]) * 16777619u;
    }
    return h;
}

int main(void)
{
    uint8_t base; /* the stack depth of main's frame: operations are measured below it */
    uint8_t shared[32], message[32], signature[64];
    fedtiny_env_header header;
    size_t uplink_len = 0;
    uint32_t body_len = 0, i;
    int status, failed = 0;

    fedtiny_stack_paint();
    fedtiny_mark_begin();
    status = fedtiny_env_node_init(&node, fedtiny_cv_fleet_id, fedtiny_cv_device_id, fedtiny_cv_identity,
                                   fedtiny_cv_coordinator);
    fedtiny_mark_end();
    printf("op keys stack %lu\n", (unsigned long)fedtiny_stack_peak(&base));
    failed |= status != FEDTINY_ENV_OK;

    fedtiny_stack_paint();
    fedtiny_mark_begin();
    crypto_x25519(shared, fedtiny_cv_identity + 32, fedtiny_cv_coordinator + 32);
    fedtiny_mark_end();
    printf("op x25519 stack %lu\n", (unsigned long)fedtiny_stack_peak(&base));

    memcpy(message, fedtiny_cv_downlink, sizeof message);
    fedtiny_stack_paint();
    fedtiny_mark_begin();
    crypto_eddsa_sign(signature, node.sign_secret, message, sizeof message);
    fedtiny_mark_end();
    printf("op sign stack %lu\n", (unsigned long)fedtiny_stack_peak(&base));

    fedtiny_stack_paint();
    fedtiny_mark_begin();
    status = crypto_eddsa_check(signature, node.sign_secret + 32, message, sizeof message);
    fedtiny_mark_end();
    printf("op verify stack %lu\n", (unsigned long)fedtiny_stack_peak(&base));
    failed |= status != 0;

    fedtiny_stack_paint();
    fedtiny_mark_begin();
    status = fedtiny_env_seal(&node, FEDTINY_MSG_DELTA, 0u, fedtiny_cv_run, fedtiny_cv_round, 0u, fedtiny_cv_seq,
                              fedtiny_cv_uplink_body, fedtiny_cv_uplink_body_len, uplink, sizeof uplink,
                              &uplink_len);
    fedtiny_mark_end();
    printf("op seal stack %lu\n", (unsigned long)fedtiny_stack_peak(&base));
    failed |= status != FEDTINY_ENV_OK;

    memcpy(downlink, fedtiny_cv_downlink, fedtiny_cv_downlink_len);
    fedtiny_stack_paint();
    fedtiny_mark_begin();
    status = fedtiny_env_open(&node, downlink, fedtiny_cv_downlink_len, fedtiny_env_replay_check, &replay, &header,
                              &body_len);
    fedtiny_mark_end();
    printf("op open stack %lu\n", (unsigned long)fedtiny_stack_peak(&base));
    failed |= status != FEDTINY_ENV_OK;

    printf("uplink ");
    for (i = 0; i < uplink_len; i++) {
        printf("%02x", uplink[i]);
    }
    printf("\ndownlink %s body_len %lu fnv %08lx\n", fedtiny_env_reason(status), (unsigned long)body_len,
           (unsigned long)fnv1a(downlink + FEDTINY_ENV_HEADER_BYTES, body_len));
    return failed;
}
