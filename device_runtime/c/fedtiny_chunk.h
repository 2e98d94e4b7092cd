/* Chunking on the node: fedtiny/protocol/chunking.py in C, byte for byte and reason for reason.
 *
 * Every MQTT payload is one chunk frame (little-endian, 24-byte header):
 *
 *     magic "FC" | version u8 | reserved u8 | transfer_id u32 | index u32 | count u32 | total_len u32
 *     | chunk_size u32 | data
 *
 * fedtiny_chunk_frame writes frame `index` of a payload into a caller buffer, so a large upload is published one
 * frame at a time and never needs all its frames at once. The reassembler is chunking.Reassembler as the device
 * session configures it: two open transfers, a budget of declared bytes, a ttl, no eviction. It writes every
 * chunk straight to its offset in one caller buffer and keeps a bitmap of received indexes in another; with at
 * most two transfers, the first sits at the bottom of both buffers and the second at the top, so freeing one
 * never fragments the space the next needs (two transfers fit whenever their total_len sum fits the budget, as
 * Python checks). Portable C99, no malloc, no stdio; time is the caller's (milliseconds, any monotonic clock).
 */
#ifndef FEDTINY_CHUNK_H
#define FEDTINY_CHUNK_H

#include <stddef.h>
#include <stdint.h>

#define FEDTINY_CHUNK_HEADER_BYTES 24u
#define FEDTINY_CHUNK_MIN_PAYLOAD 256u          /* Arduino PubSubClient's default buffer */
#define FEDTINY_CHUNK_MAX_PAYLOAD (256u * 1024u) /* Azure IoT Hub's message limit */
#define FEDTINY_CHUNK_MAX_TRANSFERS 2u
/* The bitmap bytes a reassembler with a budget of max_bytes needs: two transfers hold at most max_bytes
 * chunks between them (a buffered transfer has at least one byte per chunk), each rounded up to whole bytes. */
#define FEDTINY_CHUNK_BITMAP_BYTES(max_bytes) ((max_bytes) / 8u + 2u)

/* Results. The errors carry chunking.py's ProtocolError reasons (fedtiny_chunk_reason); their numbers do not
 * overlap fedtiny_env_status, so one int can carry either. */
typedef enum {
    FEDTINY_CHUNK_OK = 0,
    FEDTINY_CHUNK_ERR_ARGUMENT = -100, /* the caller's mistake (split's ValueError): payload size out of range */
    FEDTINY_CHUNK_ERR_BUFFER = -101,   /* the output buffer is too small */
    FEDTINY_CHUNK_ERR_TRUNCATED = -102,
    FEDTINY_CHUNK_ERR_TRAILING_BYTES = -103,
    FEDTINY_CHUNK_ERR_BAD_MAGIC = -104,
    FEDTINY_CHUNK_ERR_BAD_VERSION = -105,
    FEDTINY_CHUNK_ERR_BAD_FLAGS = -106,
    FEDTINY_CHUNK_ERR_BAD_CHUNK = -107,
    FEDTINY_CHUNK_ERR_OVERSIZED = -108,
    FEDTINY_CHUNK_ERR_TOO_MANY_TRANSFERS = -109,
    FEDTINY_CHUNK_ERR_INCONSISTENT = -110
} fedtiny_chunk_status;

/* The reason token chunking.py's ProtocolError carries for a status ("bad-chunk", ...), or "ok". */
const char *fedtiny_chunk_reason(int status);

/* ---- split ----------------------------------------------------------------------------------------------- */

/* How many frames chunking.split makes of total_len bytes at max_payload bytes per frame (header included). */
uint32_t fedtiny_chunk_count(uint32_t total_len, uint32_t max_payload);

/* Frame `index` of chunking.split(payload, transfer_id, max_payload) into out (at most max_payload bytes).
 * FEDTINY_CHUNK_ERR_ARGUMENT if max_payload is outside 256..256 KiB or index is not below the count. */
int fedtiny_chunk_frame(const uint8_t *payload, uint32_t total_len, uint32_t transfer_id, uint32_t max_payload,
                        uint32_t index, uint8_t *out, size_t out_capacity, size_t *out_len);

/* ---- parse ----------------------------------------------------------------------------------------------- */

typedef struct {
    uint32_t transfer_id;
    uint32_t index;
    uint32_t count;
    uint32_t total_len;
    uint32_t chunk_size; /* data bytes of every chunk but the last */
    uint32_t data_len;
    uint8_t *data; /* inside the frame */
} fedtiny_chunk;

/* One frame checked on its own, as chunking.parse_chunk. */
int fedtiny_chunk_parse(uint8_t *frame, size_t length, fedtiny_chunk *chunk);

/* ---- reassemble ------------------------------------------------------------------------------------------ */

typedef struct {
    uint8_t open;
    uint8_t at_top; /* placed at the top end of the data and bitmap buffers */
    uint8_t source; /* the caller's name for where the frames come from (the device session: its topic) */
    uint32_t transfer_id;
    uint32_t count;
    uint32_t total_len;
    uint32_t chunk_size;
    uint32_t received; /* chunks in */
    uint32_t data_offset;
    uint32_t bitmap_offset;
    int64_t last_seen;
} fedtiny_chunk_transfer;

typedef struct {
    uint8_t *data;       /* max_bytes */
    uint8_t *bitmap;     /* FEDTINY_CHUNK_BITMAP_BYTES(max_bytes) */
    uint32_t max_bytes;  /* declared bytes of all open transfers together */
    int64_t ttl_ms;      /* a transfer idle for longer is dropped */
    fedtiny_chunk_transfer transfers[FEDTINY_CHUNK_MAX_TRANSFERS];
} fedtiny_reassembler;

typedef struct {
    uint8_t duplicate;    /* a chunk already received (same data): nothing changed but its transfer's clock */
    uint8_t *payload;     /* the whole payload once its last chunk is in, else NULL */
    uint32_t payload_len;
} fedtiny_chunk_result;

void fedtiny_reassembler_init(fedtiny_reassembler *r, uint8_t *data, uint32_t max_bytes, uint8_t *bitmap,
                              int64_t ttl_ms);

/* Add one frame from `source`, as Reassembler.accept(frame, now, source). A transfer of one chunk is not
 * buffered: its payload is the frame's data, in the caller's frame. A completed transfer is closed before this
 * returns, and its payload stays in the data buffer until the next accept. An error changes nothing but the
 * expiry of idle transfers, which every accept does first (as Python's does). */
int fedtiny_reassembler_accept(fedtiny_reassembler *r, uint8_t *frame, size_t length, int64_t now_ms,
                               uint8_t source, fedtiny_chunk_result *result);

/* Drop transfers idle for more than ttl_ms; how many were dropped. */
uint32_t fedtiny_reassembler_expire(fedtiny_reassembler *r, int64_t now_ms);

/* Declared bytes of the open transfers (Reassembler.reserved_bytes), and how many are open. */
uint32_t fedtiny_reassembler_reserved(const fedtiny_reassembler *r);
uint32_t fedtiny_reassembler_open(const fedtiny_reassembler *r);

#endif
