/* Chunking on the node: see fedtiny_chunk.h and fedtiny/protocol/chunking.py. */
#include "fedtiny_chunk.h"

#include <string.h>

#define VERSION 1u

static void store32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t load32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

const char *fedtiny_chunk_reason(int status)
{
    switch (status) {
    case FEDTINY_CHUNK_OK: return "ok";
    case FEDTINY_CHUNK_ERR_ARGUMENT: return "argument";
    case FEDTINY_CHUNK_ERR_BUFFER: return "buffer";
    case FEDTINY_CHUNK_ERR_TRUNCATED: return "truncated";
    case FEDTINY_CHUNK_ERR_TRAILING_BYTES: return "trailing-bytes";
    case FEDTINY_CHUNK_ERR_BAD_MAGIC: return "bad-magic";
    case FEDTINY_CHUNK_ERR_BAD_VERSION: return "bad-version";
    case FEDTINY_CHUNK_ERR_BAD_FLAGS: return "bad-flags";
    case FEDTINY_CHUNK_ERR_BAD_CHUNK: return "bad-chunk";
    case FEDTINY_CHUNK_ERR_OVERSIZED: return "oversized";
    case FEDTINY_CHUNK_ERR_TOO_MANY_TRANSFERS: return "too-many-transfers";
    case FEDTINY_CHUNK_ERR_INCONSISTENT: return "inconsistent-chunk";
    default: return "unknown";
    }
}

/* max(1, ceil(total_len / size)), as chunking.chunk_count and parse_chunk compute it */
static uint32_t count_for(uint32_t total_len, uint32_t size)
{
    uint32_t n = total_len / size + (total_len % size != 0u);
    return n ? n : 1u;
}

/* ---- split ------------------------------------------------------------------------------------------------- */

uint32_t fedtiny_chunk_count(uint32_t total_len, uint32_t max_payload)
{
    return count_for(total_len, max_payload - FEDTINY_CHUNK_HEADER_BYTES);
}

int fedtiny_chunk_frame(const uint8_t *payload, uint32_t total_len, uint32_t transfer_id, uint32_t max_payload,
                        uint32_t index, uint8_t *out, size_t out_capacity, size_t *out_len)
{
    uint32_t size, count, start, n;
    if (max_payload < FEDTINY_CHUNK_MIN_PAYLOAD || max_payload > FEDTINY_CHUNK_MAX_PAYLOAD) {
        return FEDTINY_CHUNK_ERR_ARGUMENT;
    }
    size = max_payload - FEDTINY_CHUNK_HEADER_BYTES;
    count = count_for(total_len, size);
    if (index >= count) {
        return FEDTINY_CHUNK_ERR_ARGUMENT;
    }
    start = index * size; /* below total_len (or 0): no overflow */
    n = total_len - start < size ? total_len - start : size;
    if (out_capacity < (size_t)FEDTINY_CHUNK_HEADER_BYTES + n) {
        return FEDTINY_CHUNK_ERR_BUFFER;
    }
    out[0] = 'F';
    out[1] = 'C';
    out[2] = (uint8_t)VERSION;
    out[3] = 0u;
    store32(out + 4, transfer_id);
    store32(out + 8, index);
    store32(out + 12, count);
    store32(out + 16, total_len);
    store32(out + 20, size);
    if (n > 0u) {
        memmove(out + FEDTINY_CHUNK_HEADER_BYTES, payload + start, n);
    }
    *out_len = (size_t)FEDTINY_CHUNK_HEADER_BYTES + n;
    return FEDTINY_CHUNK_OK;
}

/* ---- parse ------------------------------------------------------------------------------------------------- */

int fedtiny_chunk_parse(uint8_t *frame, size_t length, fedtiny_chunk *chunk)
{
    fedtiny_chunk c;
    uint32_t expected;
    size_t data_len;
    if (length < FEDTINY_CHUNK_HEADER_BYTES) {
        return FEDTINY_CHUNK_ERR_TRUNCATED;
    }
    if (frame[0] != 'F' || frame[1] != 'C') {
        return FEDTINY_CHUNK_ERR_BAD_MAGIC;
    }
    if (frame[2] != VERSION) {
        return FEDTINY_CHUNK_ERR_BAD_VERSION;
    }
    if (frame[3] != 0u) {
        return FEDTINY_CHUNK_ERR_BAD_FLAGS;
    }
    c.transfer_id = load32(frame + 4);
    c.index = load32(frame + 8);
    c.count = load32(frame + 12);
    c.total_len = load32(frame + 16);
    c.chunk_size = load32(frame + 20);
    if (c.chunk_size == 0u || c.chunk_size > FEDTINY_CHUNK_MAX_PAYLOAD - FEDTINY_CHUNK_HEADER_BYTES) {
        return FEDTINY_CHUNK_ERR_BAD_CHUNK;
    }
    if (c.count != count_for(c.total_len, c.chunk_size) || c.index >= c.count) {
        return FEDTINY_CHUNK_ERR_BAD_CHUNK;
    }
    /* index < count = ceil(total_len / chunk_size), so index * chunk_size < total_len (or both are 0) */
    expected = c.total_len - c.index * c.chunk_size;
    if (expected > c.chunk_size) {
        expected = c.chunk_size;
    }
    data_len = length - FEDTINY_CHUNK_HEADER_BYTES;
    if (data_len != expected) {
        return data_len < expected ? FEDTINY_CHUNK_ERR_TRUNCATED : FEDTINY_CHUNK_ERR_TRAILING_BYTES;
    }
    c.data_len = expected;
    c.data = frame + FEDTINY_CHUNK_HEADER_BYTES;
    *chunk = c;
    return FEDTINY_CHUNK_OK;
}

/* ---- reassemble -------------------------------------------------------------------------------------------- */

void fedtiny_reassembler_init(fedtiny_reassembler *r, uint8_t *data, uint32_t max_bytes, uint8_t *bitmap,
                              int64_t ttl_ms)
{
    memset(r, 0, sizeof *r);
    r->data = data;
    r->bitmap = bitmap;
    r->max_bytes = max_bytes;
    r->ttl_ms = ttl_ms;
}

uint32_t fedtiny_reassembler_expire(fedtiny_reassembler *r, int64_t now_ms)
{
    uint32_t i, dropped = 0;
    for (i = 0; i < FEDTINY_CHUNK_MAX_TRANSFERS; i++) {
        fedtiny_chunk_transfer *t = &r->transfers[i];
        if (t->open && now_ms - t->last_seen > r->ttl_ms) {
            t->open = 0u;
            dropped++;
        }
    }
    return dropped;
}

uint32_t fedtiny_reassembler_reserved(const fedtiny_reassembler *r)
{
    uint32_t i, total = 0;
    for (i = 0; i < FEDTINY_CHUNK_MAX_TRANSFERS; i++) {
        if (r->transfers[i].open) {
            total += r->transfers[i].total_len;
        }
    }
    return total;
}

uint32_t fedtiny_reassembler_open(const fedtiny_reassembler *r)
{
    uint32_t i, n = 0;
    for (i = 0; i < FEDTINY_CHUNK_MAX_TRANSFERS; i++) {
        n += r->transfers[i].open;
    }
    return n;
}

static uint32_t bitmap_bytes(uint32_t count)
{
    return count / 8u + (count % 8u != 0u);
}

/* Open a transfer for chunk c in a free slot, at the end of the buffers the other open transfer leaves free
 * (the caller has checked that there is a free slot and that the budget holds it). */
static fedtiny_chunk_transfer *open_transfer(fedtiny_reassembler *r, const fedtiny_chunk *c, uint8_t source,
                                             int64_t now_ms)
{
    fedtiny_chunk_transfer *slot = NULL;
    uint8_t top = 0u;
    uint32_t i;
    for (i = 0; i < FEDTINY_CHUNK_MAX_TRANSFERS; i++) {
        if (!r->transfers[i].open) {
            if (slot == NULL) {
                slot = &r->transfers[i];
            }
        } else if (!r->transfers[i].at_top) {
            top = 1u; /* the bottom is taken */
        }
    }
    slot->open = 1u;
    slot->at_top = top;
    slot->source = source;
    slot->transfer_id = c->transfer_id;
    slot->count = c->count;
    slot->total_len = c->total_len;
    slot->chunk_size = c->chunk_size;
    slot->received = 0u;
    slot->data_offset = top ? r->max_bytes - c->total_len : 0u;
    slot->bitmap_offset = top ? FEDTINY_CHUNK_BITMAP_BYTES(r->max_bytes) - bitmap_bytes(c->count) : 0u;
    slot->last_seen = now_ms;
    memset(r->bitmap + slot->bitmap_offset, 0, bitmap_bytes(c->count));
    return slot;
}

int fedtiny_reassembler_accept(fedtiny_reassembler *r, uint8_t *frame, size_t length, int64_t now_ms,
                               uint8_t source, fedtiny_chunk_result *result)
{
    fedtiny_chunk c;
    fedtiny_chunk_transfer *t = NULL;
    uint8_t *bits, *dest;
    uint8_t bit;
    uint32_t i;
    int status = fedtiny_chunk_parse(frame, length, &c);
    if (status != FEDTINY_CHUNK_OK) {
        return status;
    }
    fedtiny_reassembler_expire(r, now_ms);
    result->duplicate = 0u;
    result->payload = NULL;
    result->payload_len = 0u;
    for (i = 0; i < FEDTINY_CHUNK_MAX_TRANSFERS; i++) {
        fedtiny_chunk_transfer *s = &r->transfers[i];
        if (s->open && s->source == source && s->transfer_id == c.transfer_id) {
            t = s;
        }
    }
    if (t == NULL) {
        if (c.count == 1u) { /* a one-chunk transfer never needs buffering */
            result->payload = c.data;
            result->payload_len = c.data_len;
            return FEDTINY_CHUNK_OK;
        }
        if (c.total_len > r->max_bytes) {
            return FEDTINY_CHUNK_ERR_OVERSIZED;
        }
        if (fedtiny_reassembler_open(r) >= FEDTINY_CHUNK_MAX_TRANSFERS) {
            return FEDTINY_CHUNK_ERR_TOO_MANY_TRANSFERS;
        }
        if ((uint64_t)fedtiny_reassembler_reserved(r) + c.total_len > r->max_bytes) {
            return FEDTINY_CHUNK_ERR_OVERSIZED;
        }
        t = open_transfer(r, &c, source, now_ms);
    } else if (t->count != c.count || t->total_len != c.total_len || t->chunk_size != c.chunk_size) {
        return FEDTINY_CHUNK_ERR_INCONSISTENT; /* the chunk disagrees with its transfer's shape */
    }
    bits = r->bitmap + t->bitmap_offset + c.index / 8u;
    bit = (uint8_t)(1u << (c.index % 8u));
    dest = r->data + t->data_offset + c.index * c.chunk_size;
    if (*bits & bit) {
        if (memcmp(dest, c.data, c.data_len) != 0) {
            return FEDTINY_CHUNK_ERR_INCONSISTENT; /* resent with different data */
        }
        t->last_seen = now_ms;
        result->duplicate = 1u;
        return FEDTINY_CHUNK_OK;
    }
    memcpy(dest, c.data, c.data_len);
    *bits |= bit;
    t->received++;
    t->last_seen = now_ms;
    if (t->received == t->count) {
        t->open = 0u;
        result->payload = r->data + t->data_offset;
        result->payload_len = t->total_len;
    }
    return FEDTINY_CHUNK_OK;
}
