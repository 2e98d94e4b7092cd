/* Bare-metal firmware for Cortex-M (QEMU mps2-an386) that runs a device's secure-aggregation and noise steps
 * (fedtiny_secagg.c, fedtiny_noise.c) once each between the instruction-count markers, for a plan's node_plan.c
 * and the round in secagg_vectors.c (fedtiny_device.csecagg.render_secagg_vectors):
 *
 *   keys     fedtiny_secagg_derive + fedtiny_secagg_keys: round secrets, two X25519 public keys, commitment, sign
 *   verify   fedtiny_secagg_check_keys of one neighbour's keys
 *   share    fedtiny_secagg_share + fedtiny_secagg_share_keys (one X25519: both directions' keys) + sealing, for
 *            one neighbour (threshold t)
 *   open     opening the share that neighbour sealed for this device, with the key kept from `share`
 *   noise    fedtiny_noise_add over every trainable element (distributed DP's noise, clamped to the bounds)
 *   mask     fedtiny_secagg_mask: clamp, the self mask and d pairwise masks (d X25519 agreements), packing
 *
 * It prints "op NAME stack BYTES" per operation, "packed HEX" (the masked values, for the host to compare with
 * the Python device's), and exits 0, or 1 if an operation failed. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fedtiny_boot.h"
#include "fedtiny_node.h"
#include "fedtiny_noise.h"
#include "fedtiny_secagg.h"

extern const fedtiny_node_plan fedtiny_node_plan_data;
extern const uint32_t sv_fleet_id, sv_run, sv_round, sv_device_id, sv_threshold, sv_cohort, sv_n_neighbours;
extern const uint32_t sv_neighbour_ids[];
extern const uint8_t sv_neighbour_keys[][FEDTINY_SECAGG_KEYS_BYTES];
extern const uint8_t sv_neighbour_public[FEDTINY_ENV_PUBLIC_BYTES];
extern const uint8_t sv_identity[FEDTINY_ENV_IDENTITY_BYTES];
extern const uint8_t sv_sealed_share[FEDTINY_SECAGG_SHARE_CIPHERTEXT];
extern const float sv_clip_norm, sv_noise_sigma;
extern const int32_t sv_values[];
extern const uint32_t sv_n_values;

#define MAX_VALUES 16384u
static int32_t values[MAX_VALUES];
static uint8_t packed[4u * MAX_VALUES];
static uint8_t s_pk[FEDTINY_SECAGG_MAX_NEIGHBOURS][32];
static fedtiny_secagg_secrets secrets;
static fedtiny_noise_stream stream;

int main(void)
{
    uint8_t base; /* the stack depth of main's frame: operations are measured below it */
    const fedtiny_wire_plan *plan = fedtiny_node_plan_data.wire;
    fedtiny_secagg_round ctx;
    fedtiny_noise_source source;
    uint8_t keys[FEDTINY_SECAGG_KEYS_BYTES], shares[FEDTINY_SECAGG_SHARES_BYTES];
    uint8_t sealed[FEDTINY_SECAGG_SHARE_CIPHERTEXT], opened[FEDTINY_SECAGG_SHARES_BYTES], bits[256];
    uint8_t seal_key[32], open_key[32];
    int32_t bounds[256];
    unsigned index = 0, i;
    size_t packed_len = 0;
    int status, failed = 0;

    if (sv_n_values > MAX_VALUES || plan->n_tensors > 256u || sv_n_values != fedtiny_wire_elements(plan)) {
        printf("secagg firmware: the plan does not fit this firmware\n");
        return 1;
    }
    ctx.fleet_id = sv_fleet_id;
    ctx.run = sv_run;
    ctx.round = sv_round;
    for (i = 0; i < sv_n_neighbours; i++) {
        memcpy(s_pk[i], sv_neighbour_keys[i] + 32, 32);
    }
    memcpy(values, sv_values, 4u * sv_n_values);
    failed |= fedtiny_secagg_bounds(plan, sv_clip_norm, sv_noise_sigma, bounds) != FEDTINY_SECAGG_OK;
    failed |= fedtiny_secagg_bits(plan, bounds, sv_cohort, bits) != FEDTINY_SECAGG_OK;

    fedtiny_stack_paint();
    fedtiny_mark_begin();
    fedtiny_secagg_derive(&secrets, sv_identity, &ctx, sv_device_id);
    fedtiny_secagg_keys(&secrets, sv_identity, keys);
    fedtiny_mark_end();
    printf("op keys stack %lu\n", (unsigned long)fedtiny_stack_peak(&base));

    fedtiny_stack_paint();
    fedtiny_mark_begin();
    status = fedtiny_secagg_check_keys(sv_neighbour_public, &ctx, sv_neighbour_ids[0], sv_neighbour_keys[0]);
    fedtiny_mark_end();
    printf("op verify stack %lu\n", (unsigned long)fedtiny_stack_peak(&base));
    failed |= status != FEDTINY_SECAGG_OK;

    fedtiny_stack_paint();
    fedtiny_mark_begin();
    status = fedtiny_secagg_share(&secrets, sv_threshold, 1u, shares);
    if (status == FEDTINY_SECAGG_OK) { /* as the node's session: one agreement, the opening key kept */
        status = fedtiny_secagg_share_keys(&secrets, sv_neighbour_keys[0], sv_neighbour_ids[0], seal_key, open_key);
    }
    if (status == FEDTINY_SECAGG_OK) {
        status = fedtiny_secagg_seal_share_with(&secrets, seal_key, sv_neighbour_ids[0], 1u, shares, sealed);
    }
    fedtiny_mark_end();
    printf("op share stack %lu\n", (unsigned long)fedtiny_stack_peak(&base));
    failed |= status != FEDTINY_SECAGG_OK;

    fedtiny_stack_paint();
    fedtiny_mark_begin();
    status = fedtiny_secagg_open_share_with(&secrets, open_key, sv_neighbour_ids[0], sv_sealed_share, &index, opened);
    fedtiny_mark_end();
    printf("op open stack %lu\n", (unsigned long)fedtiny_stack_peak(&base));
    failed |= status != FEDTINY_SECAGG_OK;

    fedtiny_noise_stream_open(&stream, sv_identity, sv_run, sv_round, &source);
    fedtiny_stack_paint();
    fedtiny_mark_begin();
    status = sv_noise_sigma > 0.0f ? fedtiny_noise_add(plan, values, (double)sv_noise_sigma, &source, bounds)
                                   : FEDTINY_WIRE_OK;
    fedtiny_mark_end();
    printf("op noise stack %lu\n", (unsigned long)fedtiny_stack_peak(&base));
    failed |= status != FEDTINY_WIRE_OK;

    fedtiny_stack_paint();
    fedtiny_mark_begin();
    status = fedtiny_secagg_mask(plan, &secrets, bounds, bits, sv_neighbour_ids, (const uint8_t (*)[32])s_pk,
                                 sv_n_neighbours, values, packed, sizeof packed, &packed_len);
    fedtiny_mark_end();
    printf("op mask stack %lu\n", (unsigned long)fedtiny_stack_peak(&base));
    failed |= status != FEDTINY_SECAGG_OK;

    printf("keys ");
    for (i = 0; i < sizeof keys; i++) {
        printf("%02x", keys[i]);
    }
    printf("\nopened %u ", index);
    for (i = 0; i < sizeof opened; i++) {
        printf("%02x", opened[i]);
    }
    printf("\npacked ");
    for (i = 0; i < packed_len; i++) {
        printf("%02x", packed[i]);
    }
    printf("\n");
    return failed;
}
