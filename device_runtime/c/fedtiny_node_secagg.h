/* The node's secure-aggregation round (fedtiny/protocol/secagg.py SecAggDevice, as DeviceSession drives it), on
 * message bodies: the session (fedtiny_node.c) hands it the stage downlinks and takes back the bodies to seal.
 *
 *     begin      a masked TASK: the round's secrets, and the SECAGG_KEYS body
 *     stage      SECAGG_PEERS -> the SECAGG_SHARES body; SECAGG_RELAY -> the shares addressed to the node kept;
 *                SECAGG_UNMASK -> the SECAGG_REVEAL body (the same again for the same request)
 *     masked     the masked DELTA body (messages.MaskedDelta) of the values the uplink left in the node's values
 *                buffer (clipped, noised and clamped to the bounds), once the relay has come
 *
 * Every check SecAggDevice makes comes before anything changes and gives its reason (fedtiny_secagg_reason). The
 * round lives in the caller's RAM, plain numbers and bytes. A node keeps it across a reset: its record (the first
 * FEDTINY_NODE_SECAGG_RECORD_BYTES) is persisted whenever `changes` moves (a round begun, the peers answered, the
 * relay taken, the masked DELTA made, the reveal made), before the node's own record of the same call, and
 * restored with `trained` cleared (the values it held are gone: the task trains again); device.py persists
 * SecAggDevice.export at the same points. RAM: sizeof(fedtiny_node_secagg), about
 * 15.5 KB with its 5.2 KB stage buffer (the largest stage uplink, SECAGG_SHARES to 64 neighbours, sealed).
 * Stack (Cortex-M4, -O2 -fstack-usage): the peers stage 2.5 KB and the masked body 2.4 KB (each holds 64 keys of
 * 32 bytes a moment), under fedtiny_node_receive's 512 B, plus Monocypher's X25519 below them: within the node
 * firmware's 8 KB stack: the node firmware's peak in a masked round is 5,211 B below main (tests/test_firmware_secagg.py). */
#ifndef FEDTINY_NODE_SECAGG_H
#define FEDTINY_NODE_SECAGG_H

#include <stddef.h>
#include <stdint.h>

#include "fedtiny_envelope.h"
#include "fedtiny_secagg.h"
#include "fedtiny_wire.h"

#define FEDTINY_NODE_SECAGG_MAX_BUFFERS 64u /* trainable buffers a masked DELTA of this node may have */
#define FEDTINY_NODE_SECAGG_SHARES_BYTES (4u + 80u * FEDTINY_SECAGG_MAX_NEIGHBOURS)
#define FEDTINY_NODE_SECAGG_REVEAL_BYTES (4u + 40u * FEDTINY_SECAGG_MAX_NEIGHBOURS)
#define FEDTINY_NODE_SECAGG_STAGE_BYTES FEDTINY_ENV_SEALED_BYTES(FEDTINY_NODE_SECAGG_SHARES_BYTES)
/* secagg.MAX_STAGE_ENVELOPE: the largest stage downlink, SECAGG_PEERS with 64 neighbours */
#define FEDTINY_NODE_SECAGG_MAX_DOWNLINK (FEDTINY_ENV_HEADER_BYTES + 8u + 164u * FEDTINY_SECAGG_MAX_NEIGHBOURS + \
                                          FEDTINY_ENV_SIGNATURE_BYTES)
#define FEDTINY_NODE_SECAGG_MASKED_HEAD 20u /* MaskedDelta.HEAD, then k u8 per buffer, padded to 4 */

/* The fleet's public identities (identity.pub), by device id: the neighbours' signatures are checked with them. */
typedef struct {
    const uint32_t *ids;
    const uint8_t (*publics)[FEDTINY_ENV_PUBLIC_BYTES];
    uint32_t count;
} fedtiny_node_peers;

typedef struct {
    uint8_t active;       /* a round is held (secrets derived) */
    uint8_t peers_done;   /* SECAGG_PEERS answered: neighbours known */
    uint8_t relay_done;   /* SECAGG_RELAY taken: held shares */
    uint8_t masked_sent;
    uint8_t revealed;
    uint8_t trained;      /* the round's values wait in the node's values buffer for the relay */
    uint16_t changes;     /* moves whenever the record changes in what a restart needs: persist it then */
    fedtiny_secagg_secrets secrets;
    float clip_norm, noise_sigma;
    uint32_t min_survivors;
    uint16_t cohort, threshold, n_neighbours;
    uint32_t ids[FEDTINY_SECAGG_MAX_NEIGHBOURS]; /* the neighbours in SECAGG_PEERS' order */
    uint8_t c_pk[FEDTINY_SECAGG_MAX_NEIGHBOURS][32];
    uint8_t s_pk[FEDTINY_SECAGG_MAX_NEIGHBOURS][32];
    uint8_t open_key[FEDTINY_SECAGG_MAX_NEIGHBOURS][32]; /* the key of the share each neighbour seals for it */
    uint8_t held[FEDTINY_SECAGG_MAX_NEIGHBOURS]; /* share index received from neighbour i (0: none) */
    uint8_t held_shares[FEDTINY_SECAGG_MAX_NEIGHBOURS][FEDTINY_SECAGG_SHARES_BYTES];
    uint16_t unmask_survivors, unmask_dropped; /* the SECAGG_UNMASK answered, as it came */
    uint32_t unmask_ids[FEDTINY_SECAGG_MAX_NEIGHBOURS];
    /* the trained round waiting for the relay (device.py's _held) */
    uint32_t job_round, job_model_version, num_examples;
    float loss, accuracy, personal_accuracy;
    int32_t bounds[FEDTINY_NODE_SECAGG_MAX_BUFFERS];
    uint8_t bits[FEDTINY_NODE_SECAGG_MAX_BUFFERS];
    uint8_t stage[FEDTINY_NODE_SECAGG_STAGE_BYTES]; /* a stage uplink, sealed, while it is sent */
} fedtiny_node_secagg;

/* What a node persists of its round: all but the stage reply (sent, or resent from a fresh seal, never read back). */
#define FEDTINY_NODE_SECAGG_RECORD_BYTES offsetof(fedtiny_node_secagg, stage)

/* A masked TASK for (ctx, device_id): a new round unless this one is held; the SECAGG_KEYS body into keys.
 * FEDTINY_SECAGG_ERR_ARGUMENT when the plan has more buffers than this node masks or the bounds are refused. */
int fedtiny_node_secagg_begin(fedtiny_node_secagg *sa, const fedtiny_wire_plan *plan, const uint8_t identity[64],
                              const fedtiny_secagg_round *ctx, uint32_t device_id, float clip_norm,
                              float noise_sigma, uint32_t min_survivors, uint8_t keys[FEDTINY_SECAGG_KEYS_BYTES]);

/* messages.decode_body's structural checks of a stage downlink (type FEDTINY_MSG_SECAGG_PEERS, _RELAY or
 * _UNMASK): FEDTINY_WIRE_OK or the wire status of its reason (truncated, trailing-bytes, oversized, bad-flags). */
int fedtiny_node_secagg_check_body(uint8_t type, const uint8_t *body, uint32_t len);

/* A checked stage downlink for (run, round) of its header: the round's checks (fedtiny_secagg statuses, nothing
 * changed on a refusal), then its reply body at reply (none for the relay: *reply_len 0). */
int fedtiny_node_secagg_stage(fedtiny_node_secagg *sa, const fedtiny_wire_plan *plan, const fedtiny_node_peers *peers,
                              uint8_t type, uint32_t run, uint32_t round, const uint8_t *body, uint32_t len,
                              uint8_t *reply, size_t capacity, size_t *reply_len);

/* The masked DELTA body of values (the node's values buffer: clipped, noised, clamped) into out; values is
 * clobbered. FEDTINY_SECAGG_ERR_BAD_STAGE before the relay. */
int fedtiny_node_secagg_masked(fedtiny_node_secagg *sa, const fedtiny_wire_plan *plan, int32_t *values,
                               uint8_t *out, size_t capacity, size_t *out_len);

/* sizeof(fedtiny_node_secagg) and FEDTINY_NODE_SECAGG_RECORD_BYTES, for a caller without the header (ctypes). */
size_t fedtiny_node_secagg_size(void);
size_t fedtiny_node_secagg_record_bytes(void);

/* A persisted record back in the round's RAM (record_len FEDTINY_NODE_SECAGG_RECORD_BYTES, or 0: no round held; it
 * may already be at sa, loaded in place), the trained values it waited with forgotten. FEDTINY_SECAGG_ERR_ARGUMENT
 * for a record of another length. */
int fedtiny_node_secagg_restore(fedtiny_node_secagg *sa, const uint8_t *record, size_t record_len);

/* The largest masked DELTA body of a plan (every value at 32 bits). */
uint32_t fedtiny_node_secagg_masked_bytes_max(const fedtiny_wire_plan *plan);

#endif
