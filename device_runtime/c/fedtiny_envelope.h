/* The fedtiny envelope, protocol version 2 (docs/protocol.md), on the node: derive the two per-direction keys,
 * seal uplinks, open downlinks, byte for byte what fedtiny/protocol/envelope.py writes and reads.
 *
 *     envelope = header (32) | payload (payload_len) | EdDSA signature (64) over header | payload
 *
 * Portable C99, no malloc, no stdio: every buffer is the caller's, and a downlink is verified and decrypted in
 * the buffer it was reassembled in. The primitives are Monocypher 4.0.3's (monocypher.c/.h are fetched at build
 * time by fedtiny_device.monocypher_sources, never committed): EdDSA with BLAKE2b (crypto_eddsa_*), X25519,
 * keyed BLAKE2b for the key derivation, ChaCha20-Poly1305 as in RFC 8439 (crypto_aead_init_ietf).
 *
 * The node must never seal two messages with the same (run, round, seq): persist seq before sending and never
 * reset it (a repeated nonce under the same key breaks ChaCha20-Poly1305). Opening checks everything in the
 * order envelope.py does and returns the same reason (fedtiny_env_reason); replay protection is the caller's
 * state, reached through a check hook before decryption and a commit after the body has been applied
 * (fedtiny_env_replay below is one).
 */
#ifndef FEDTINY_ENVELOPE_H
#define FEDTINY_ENVELOPE_H

#include <stddef.h>
#include <stdint.h>

#define FEDTINY_ENV_VERSION 2u
#define FEDTINY_ENV_HEADER_BYTES 32u
#define FEDTINY_ENV_SIGNATURE_BYTES 64u
#define FEDTINY_ENV_TAG_BYTES 16u
#define FEDTINY_ENV_IDENTITY_BYTES 64u /* identity.key: EdDSA seed (32) | X25519 secret scalar (32) */
#define FEDTINY_ENV_PUBLIC_BYTES 64u   /* identity.pub: EdDSA public key (32) | X25519 public key (32) */
/* The largest sealed envelope for a body of n bytes (encrypted types add the tag). */
#define FEDTINY_ENV_SEALED_BYTES(n) \
    (FEDTINY_ENV_HEADER_BYTES + (n) + FEDTINY_ENV_TAG_BYTES + FEDTINY_ENV_SIGNATURE_BYTES)

/* Message types (fedtiny/protocol/messages.py MessageType) and header flags (envelope.py Flags). */
enum {
    FEDTINY_MSG_JOIN = 1,
    FEDTINY_MSG_TASK = 2,
    FEDTINY_MSG_GLOBAL_UPDATE = 3,
    FEDTINY_MSG_DELTA = 4,
    FEDTINY_MSG_ACK = 5,
    FEDTINY_MSG_STATUS = 6,
    FEDTINY_MSG_LEAVE = 7,
    FEDTINY_MSG_SECAGG_KEYS = 8,   /* up: the round's keys, signed */
    FEDTINY_MSG_SECAGG_PEERS = 9,  /* down: the neighbours' keys, cohort, threshold */
    FEDTINY_MSG_SECAGG_SHARES = 10, /* up: shares encrypted to each neighbour */
    FEDTINY_MSG_SECAGG_RELAY = 11, /* down: the shares for this node */
    FEDTINY_MSG_SECAGG_UNMASK = 12, /* down: survivors and dropped */
    FEDTINY_MSG_SECAGG_REVEAL = 13 /* up, encrypted: the shares to unmask */
};
enum {
    FEDTINY_ENV_FLAG_DOWNLINK = 0x1,
    FEDTINY_ENV_FLAG_ENCRYPTED = 0x2,
    FEDTINY_ENV_FLAG_MASKED = 0x4,
    FEDTINY_ENV_FLAG_LAST_WILL = 0x8
};
enum { FEDTINY_ENV_UP = 0, FEDTINY_ENV_DOWN = 1 };

/* Results: 0 or 1 for an accepted or a duplicate message, negative for a rejection. */
typedef enum {
    FEDTINY_ENV_OK = 0,
    FEDTINY_ENV_DUPLICATE = 1, /* a QoS 1 redelivery of a message already accepted: drop it quietly */
    FEDTINY_ENV_ERR_ARGUMENT = -1, /* the caller's mistake: a type or flag the node may not send, a bad key */
    FEDTINY_ENV_ERR_BUFFER = -2,   /* the output buffer is too small */
    FEDTINY_ENV_ERR_TRUNCATED = -3,
    FEDTINY_ENV_ERR_TRAILING_BYTES = -4,
    FEDTINY_ENV_ERR_BAD_MAGIC = -5,
    FEDTINY_ENV_ERR_BAD_VERSION = -6,
    FEDTINY_ENV_ERR_BAD_FLAGS = -7,
    FEDTINY_ENV_ERR_BAD_TYPE = -8,
    FEDTINY_ENV_ERR_WRONG_FLEET = -9,
    FEDTINY_ENV_ERR_BAD_DIRECTION = -10,
    FEDTINY_ENV_ERR_WRONG_DEVICE = -11,
    FEDTINY_ENV_ERR_BAD_SIGNATURE = -12,
    FEDTINY_ENV_ERR_REPLAY = -13,
    FEDTINY_ENV_ERR_STALE = -14,
    FEDTINY_ENV_ERR_BAD_CIPHERTEXT = -15
} fedtiny_env_status;

/* The reason token envelope.py's ProtocolError carries for a status ("bad-signature", ...), or "ok". */
const char *fedtiny_env_reason(int status);

typedef struct {
    uint8_t type;
    uint16_t flags;
    uint16_t run; /* the coordinator's run: its own in a downlink, the one the node follows in an uplink */
    uint32_t fleet_id;
    uint32_t device_id; /* the sender of an uplink, the addressee of a downlink (0 = broadcast) */
    uint32_t round;
    uint32_t model_version;
    uint32_t seq;
    uint32_t payload_len; /* body bytes, + FEDTINY_ENV_TAG_BYTES when encrypted */
} fedtiny_env_header;

/* A node's keys, derived once at start-up (one X25519 and one EdDSA key pair): 168 bytes to keep in RAM. */
typedef struct {
    uint32_t fleet_id;
    uint32_t device_id;
    uint8_t sign_secret[64];      /* Monocypher EdDSA secret key: seed | this node's public key */
    uint8_t coordinator_sign[32]; /* the coordinator's EdDSA public key: every downlink must verify under it */
    uint8_t up_key[32];           /* ChaCha20-Poly1305 key of the uplink direction */
    uint8_t down_key[32];         /* ... of the downlink direction */
} fedtiny_env_node;

/* Derive the node's keys from its identity.key and the coordinator's identity.pub (coordinator.pub).
 * FEDTINY_ENV_ERR_ARGUMENT if the X25519 agreement is all zero (a low-order coordinator key). */
int fedtiny_env_node_init(fedtiny_env_node *node, uint32_t fleet_id, uint32_t device_id,
                          const uint8_t identity[FEDTINY_ENV_IDENTITY_BYTES],
                          const uint8_t coordinator_public[FEDTINY_ENV_PUBLIC_BYTES]);
void fedtiny_env_node_wipe(fedtiny_env_node *node);

/* The ChaCha20-Poly1305 key of one direction between a device and the coordinator, from either end:
 *     prk = BLAKE2b-512(key = "fedtiny/v2", X25519(own, peer))
 *     key = BLAKE2b-256(key = prk, "fedtiny/v2/e2e" | fleet_id u32 | device_id u32 | direction u8 | 0x01) */
void fedtiny_env_derive_key(uint8_t key[32], const uint8_t own_x25519_secret[32],
                            const uint8_t peer_x25519_public[32], uint32_t fleet_id, uint32_t device_id,
                            uint8_t direction);

/* Seal one uplink of `type` (JOIN, DELTA, ACK, STATUS, LEAVE) at position (run, round, seq) into out:
 * header | payload | signature, and its length into *out_len. run is the coordinator's run the node follows
 * (0 until it has seen one), round the round it answers. A DELTA is encrypted. flags: MASKED (DELTA only) and
 * LAST_WILL (STATUS only); the rest follows from the type. body may be out + FEDTINY_ENV_HEADER_BYTES (the body
 * was encoded in place: no second buffer), otherwise it must not overlap out. out needs
 * FEDTINY_ENV_SEALED_BYTES(body_len) bytes at most. */
int fedtiny_env_seal(const fedtiny_env_node *node, uint8_t type, uint16_t flags, uint16_t run, uint32_t round,
                     uint32_t model_version, uint32_t seq, const uint8_t *body, uint32_t body_len, uint8_t *out,
                     size_t out_capacity, size_t *out_len);

/* The replay hook, called once the signature has verified and before decryption. It returns FEDTINY_ENV_OK for
 * a new message, FEDTINY_ENV_DUPLICATE, FEDTINY_ENV_ERR_REPLAY or FEDTINY_ENV_ERR_STALE, and changes nothing.
 * The signature identifies the whole envelope (EdDSA is deterministic and Monocypher refuses a malleated one). */
typedef int (*fedtiny_env_replay_hook)(void *context, const fedtiny_env_header *header,
                                       const uint8_t signature[FEDTINY_ENV_SIGNATURE_BYTES]);

/* Open one downlink in place: check the header (fleet, direction, addressee, type, flags, length), verify the
 * coordinator's signature, ask the replay hook (may be NULL: no check), decrypt. On FEDTINY_ENV_OK, *header is
 * filled and the body is the *body_len bytes at envelope + FEDTINY_ENV_HEADER_BYTES; the signature stays at
 * envelope + FEDTINY_ENV_HEADER_BYTES + header->payload_len for the commit. Any other result leaves the replay
 * state untouched, and the buffer too unless the result is OK. */
int fedtiny_env_open(const fedtiny_env_node *node, uint8_t *envelope, size_t length, fedtiny_env_replay_hook hook,
                     void *hook_context, fedtiny_env_header *header, uint32_t *body_len);

/* A replay window for the node's two downlink streams (addressed to it, broadcast), as envelope.ReplayGuard
 * keeps them: a message must be newer in (run, round, seq) than the stream's last accepted one; an older one
 * whose signature equals one of the last FEDTINY_ENV_REPLAY_WINDOW accepted at that position is a duplicate.
 * Persist `last` of each stream with the node's state, as the coordinator checkpoints its own. */
#ifndef FEDTINY_ENV_REPLAY_WINDOW
#define FEDTINY_ENV_REPLAY_WINDOW 4
#endif
typedef struct {
    uint16_t run;
    uint32_t round, seq;
    uint8_t signature[FEDTINY_ENV_SIGNATURE_BYTES];
} fedtiny_env_seen;
typedef struct {
    uint8_t accepted_any; /* 0 until the first accepted message */
    uint8_t next;         /* ring position of the next entry of `recent` */
    uint8_t count;        /* filled entries of `recent` */
    uint16_t last_run;
    uint32_t last_round, last_seq;
    fedtiny_env_seen recent[FEDTINY_ENV_REPLAY_WINDOW];
} fedtiny_env_stream;
typedef struct {
    fedtiny_env_stream addressed; /* downlinks with this node's device id */
    fedtiny_env_stream broadcast; /* downlinks with device id 0 */
} fedtiny_env_replay;

int fedtiny_env_replay_check(void *replay, const fedtiny_env_header *header,
                             const uint8_t signature[FEDTINY_ENV_SIGNATURE_BYTES]);
void fedtiny_env_replay_commit(fedtiny_env_replay *replay, const fedtiny_env_header *header,
                               const uint8_t signature[FEDTINY_ENV_SIGNATURE_BYTES]);

#endif
