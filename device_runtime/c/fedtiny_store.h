/* The node's persisted state in flash, written so that a power cut at any instruction leaves a whole record.
 *
 * The region is bank_count >= 2 banks of bank_size bytes each. A save writes one complete record to the bank
 * after the one holding the newest valid record (with two banks: the other one): erase it, program the payload,
 * then program the record header LAST. Until that header is whole, the bank fails its CRC and the newest record
 * stays where it was, untouched: an erase or program never reaches a bank other than the one being written.
 * A load takes the valid record (magic, format, lengths, CRC-32) with the highest generation.
 *
 *     bank = header area (FEDTINY_STORE_HEADER_BYTES + 4 * segment_count, padded with 0xFF to a whole number of
 *            program units) | payload (the segments one after the other) | 0xFF padding to a program unit
 *     header (little-endian): magic "FTST" u32 | format u16 | segment_count u16 | generation u32 |
 *            payload_len u32 | crc u32, then segment_count u32 lengths
 *     crc = CRC-32 (IEEE 802.3, zlib's) of payload | segment lengths | the header's first 16 bytes
 *
 * The CRC is computed in the order the bytes are programmed, so a save streams the caller's segments straight to
 * flash: no staging copy of the state, only one program unit of boundary bytes in the store. The CRC guards
 * against torn writes and decayed bits, not against an attacker: whoever can write the flash owns the node.
 *
 * Flash semantics the store obeys (and fedtiny_flash_ram.c checks): erase sets a whole bank to 0xFF; program
 * writes whole program units at unit-aligned offsets and can only clear bits; each unit is programmed at most
 * once between two erases (what flash with ECC demands).
 *
 * Portable C99, no malloc, no stdio. */
#ifndef FEDTINY_STORE_H
#define FEDTINY_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "fedtiny_crc32.h"

#define FEDTINY_STORE_MAGIC 0x54535446u /* "FTST" read as a little-endian u32 */
#define FEDTINY_STORE_FORMAT 1u
#define FEDTINY_STORE_HEADER_BYTES 20u
/* Limits, fixed at build time: they size the boundary buffer inside fedtiny_store. */
#ifndef FEDTINY_STORE_MAX_SEGMENTS
#define FEDTINY_STORE_MAX_SEGMENTS 8u
#endif
#ifndef FEDTINY_STORE_MAX_UNIT
#define FEDTINY_STORE_MAX_UNIT 64u /* the largest program unit a flash may have, a power of two */
#endif
/* The header area's size for n segments and a program unit u (both within the limits above). */
#define FEDTINY_STORE_ROUND_UP(x, u) ((((x) + (u) - 1u) / (u)) * (u))
#define FEDTINY_STORE_HEADER_AREA(n, u) FEDTINY_STORE_ROUND_UP(FEDTINY_STORE_HEADER_BYTES + 4u * (n), (u))
#define FEDTINY_STORE_BUFFER_BYTES FEDTINY_STORE_HEADER_AREA(FEDTINY_STORE_MAX_SEGMENTS, FEDTINY_STORE_MAX_UNIT)

/* The flash HAL. Offsets count from the start of the region: bank b spans [b * bank_size, (b + 1) * bank_size).
 * Each function returns 0, or a negative value when the flash failed or refused (a misaligned program, a bit
 * that would have to go from 0 to 1, a unit programmed twice): the store then returns FEDTINY_STORE_ERR_FLASH.
 * program's data is any caller memory (unaligned, in RAM): copy it as the flash controller needs. */
typedef struct {
    void *context;
    uint32_t bank_size;    /* a multiple of program_unit */
    uint32_t bank_count;   /* at least 2 */
    uint32_t program_unit; /* a power of two, at most FEDTINY_STORE_MAX_UNIT */
    int (*erase)(void *context, uint32_t bank);
    int (*program)(void *context, uint32_t offset, const uint8_t *data, uint32_t length);
    int (*read)(void *context, uint32_t offset, uint8_t *out, uint32_t length);
} fedtiny_flash;

typedef enum {
    FEDTINY_STORE_OK = 0,
    FEDTINY_STORE_EMPTY = 1,            /* no record header in any bank: no save ever got to its header */
    FEDTINY_STORE_LOST = 2,             /* record headers, but none valid: a saved state was lost */
    FEDTINY_STORE_ERR_ARGUMENT = -1,    /* a bad geometry, NULL where a pointer is needed, too many segments */
    FEDTINY_STORE_ERR_TOO_LARGE = -2,   /* the segments do not fit one bank */
    FEDTINY_STORE_ERR_FLASH = -3,       /* the HAL failed: the newest record before the call is still the newest */
    FEDTINY_STORE_ERR_VERIFY = -4,      /* what was programmed does not read back with its CRC; nothing changed */
    FEDTINY_STORE_ERR_LAYOUT = -5,      /* load: the record has another number of segments than asked for */
    FEDTINY_STORE_ERR_BUFFER = -6,      /* load: a segment is larger than the buffer given for it */
    FEDTINY_STORE_ERR_GENERATION = -7,  /* save: the generation counter is exhausted (2^32 - 1 saves) */
    FEDTINY_STORE_ERR_NOT_OPEN = -8     /* save or load before fedtiny_store_open */
} fedtiny_store_status;

/* A name for a status ("ok", "empty", "lost", "flash", ...), for logs. */
const char *fedtiny_store_reason(int status);

/* The newest valid record, as fedtiny_store_open finds it. On memory-mapped flash, segment i starts at the
 * region's base address + segment_offset[i] and can be used in place. */
typedef struct {
    uint32_t generation;
    uint32_t crc;
    uint32_t bank;
    uint32_t segment_count;
    uint32_t payload_len;
    uint32_t segment_len[FEDTINY_STORE_MAX_SEGMENTS];
    uint32_t segment_offset[FEDTINY_STORE_MAX_SEGMENTS]; /* region offsets */
} fedtiny_store_record;

typedef struct {
    const fedtiny_flash *flash;
    int status; /* OK: `newest` is the newest valid record; EMPTY or LOST: there is none; set by open and save */
    fedtiny_store_record newest;
    uint8_t buffer[FEDTINY_STORE_BUFFER_BYTES]; /* the header area, and bytes of a unit that spans segments */
} fedtiny_store;

/* One piece of the state to save: `length` bytes at `data` (NULL only when length is 0). */
typedef struct {
    const void *data;
    uint32_t length;
} fedtiny_store_segment;

/* Where load puts one segment: up to `capacity` bytes at `data`; `length` gets the stored length. data NULL
 * skips the segment (its bytes are still CRC-checked in flash; read it in place through the record). */
typedef struct {
    void *data;
    uint32_t capacity;
    uint32_t length;
} fedtiny_store_buffer;

/* Check the geometry and find the newest valid record: FEDTINY_STORE_OK (then *record, which may be NULL, is
 * filled), FEDTINY_STORE_EMPTY, FEDTINY_STORE_LOST, or an error. EMPTY and LOST both mean "no state".
 * EMPTY: no bank has a byte of a header, so no save ever completed (one cut during the very first save's payload
 * leaves EMPTY too: that save had not returned, so nothing that depended on it happened). LOST: a header exists
 * but no record is valid, so a record that was saved whole has decayed or been damaged; so has every other
 * bank's. (A cut while the very first save programs its header, a few microseconds, also reads as LOST.) */
int fedtiny_store_open(fedtiny_store *store, const fedtiny_flash *flash, fedtiny_store_record *record);

/* Read the newest record's segments into buffers (count must equal the record's segment_count) and check the
 * bytes read against its CRC once more. FEDTINY_STORE_EMPTY or FEDTINY_STORE_LOST when there is none. */
int fedtiny_store_load(fedtiny_store *store, fedtiny_store_buffer *buffers, uint32_t count);

/* Save the segments as a new record of generation newest + 1 (1 for the first) and read it back. On success it
 * is the newest; on any error the previous newest record is still the one a load returns, also after a power
 * cut at any point of the call. The segments may point into the flash region itself, except into the bank
 * being written (that is never the newest record's bank). */
int fedtiny_store_save(fedtiny_store *store, const fedtiny_store_segment *segments, uint32_t count);

/* The largest payload (sum of segment lengths) one bank takes with n segments. */
uint32_t fedtiny_store_capacity(const fedtiny_flash *flash, uint32_t segment_count);


#endif
