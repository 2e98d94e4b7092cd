/* Two-bank (or more) persisted state: see fedtiny_store.h for the record layout and the power-cut argument. */
#include "fedtiny_store.h"

#include <string.h>

#define SCAN_BYTES 128u /* bytes read per HAL call when checking a CRC or an erased bank (on the stack) */

const char *fedtiny_store_reason(int status)
{
    switch (status) {
    case FEDTINY_STORE_OK: return "ok";
    case FEDTINY_STORE_EMPTY: return "empty";
    case FEDTINY_STORE_LOST: return "lost";
    case FEDTINY_STORE_ERR_ARGUMENT: return "argument";
    case FEDTINY_STORE_ERR_TOO_LARGE: return "too-large";
    case FEDTINY_STORE_ERR_FLASH: return "flash";
    case FEDTINY_STORE_ERR_VERIFY: return "verify";
    case FEDTINY_STORE_ERR_LAYOUT: return "layout";
    case FEDTINY_STORE_ERR_BUFFER: return "buffer";
    case FEDTINY_STORE_ERR_GENERATION: return "generation";
    case FEDTINY_STORE_ERR_NOT_OPEN: return "not-open";
    default: return "unknown";
    }
}

/* ---- little-endian fields ------------------------------------------------------------------------------------ */

static void put_u16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_u16(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* The header's first 16 bytes (what the CRC covers of it, after payload and lengths). */
static void header_fields(uint8_t out[16], uint32_t segment_count, uint32_t generation, uint32_t payload_len)
{
    put_u32(out, FEDTINY_STORE_MAGIC);
    put_u16(out + 4, FEDTINY_STORE_FORMAT);
    put_u16(out + 6, segment_count);
    put_u32(out + 8, generation);
    put_u32(out + 12, payload_len);
}

/* The CRC's tail: segment lengths, then the header's first 16 bytes. */
static uint32_t crc_tail(uint32_t crc, const fedtiny_store_record *r)
{
    uint8_t bytes[16];
    uint32_t i;
    for (i = 0; i < r->segment_count; i++) {
        put_u32(bytes, r->segment_len[i]);
        crc = fedtiny_crc32(crc, bytes, 4);
    }
    header_fields(bytes, r->segment_count, r->generation, r->payload_len);
    return fedtiny_crc32(crc, bytes, 16);
}

/* ---- geometry ------------------------------------------------------------------------------------------------ */

static int geometry_ok(const fedtiny_flash *f)
{
    uint32_t unit;
    if (f == NULL || f->erase == NULL || f->program == NULL || f->read == NULL) {
        return 0;
    }
    unit = f->program_unit;
    if (unit == 0u || unit > FEDTINY_STORE_MAX_UNIT || (unit & (unit - 1u)) != 0u || f->bank_count < 2u ||
        f->bank_size % unit != 0u || f->bank_size < FEDTINY_STORE_HEADER_AREA(FEDTINY_STORE_MAX_SEGMENTS, unit)) {
        return 0;
    }
    return f->bank_size <= UINT32_MAX / f->bank_count; /* every region offset fits a u32 */
}

static uint32_t header_area(const fedtiny_flash *f, uint32_t segment_count)
{
    return FEDTINY_STORE_HEADER_AREA(segment_count, f->program_unit);
}

uint32_t fedtiny_store_capacity(const fedtiny_flash *flash, uint32_t segment_count)
{
    if (!geometry_ok(flash) || segment_count > FEDTINY_STORE_MAX_SEGMENTS) {
        return 0u;
    }
    /* The payload is padded to whole units after the header area, which is itself whole units. */
    return flash->bank_size - header_area(flash, segment_count);
}

/* ---- reading a bank ------------------------------------------------------------------------------------------ */

/* CRC of `length` flash bytes at offset, read SCAN_BYTES at a time. */
static int crc_flash(const fedtiny_flash *f, uint32_t offset, uint32_t length, uint32_t *crc)
{
    uint8_t scan[SCAN_BYTES];
    while (length > 0u) {
        uint32_t n = length < SCAN_BYTES ? length : SCAN_BYTES;
        if (f->read(f->context, offset, scan, n) != 0) {
            return FEDTINY_STORE_ERR_FLASH;
        }
        *crc = fedtiny_crc32(*crc, scan, n);
        offset += n;
        length -= n;
    }
    return FEDTINY_STORE_OK;
}

/* 1 if bank holds a valid record (then *r describes it), 0 if not, FEDTINY_STORE_ERR_FLASH if reading failed.
 * Every length is checked against the bank before it is used, so garbage never sends a read out of the bank. */
static int check_bank(const fedtiny_flash *f, uint32_t bank, fedtiny_store_record *r)
{
    uint8_t head[FEDTINY_STORE_HEADER_BYTES + 4u * FEDTINY_STORE_MAX_SEGMENTS];
    uint32_t base = bank * f->bank_size, count, i, sum = 0u, offset, crc = 0u;
    int status;

    if (f->read(f->context, base, head, FEDTINY_STORE_HEADER_BYTES) != 0) {
        return FEDTINY_STORE_ERR_FLASH;
    }
    count = get_u16(head + 6);
    if (get_u32(head) != FEDTINY_STORE_MAGIC || get_u16(head + 4) != FEDTINY_STORE_FORMAT ||
        count > FEDTINY_STORE_MAX_SEGMENTS) {
        return 0;
    }
    r->segment_count = count;
    r->generation = get_u32(head + 8);
    r->payload_len = get_u32(head + 12);
    r->crc = get_u32(head + 16);
    r->bank = bank;
    if (r->payload_len > fedtiny_store_capacity(f, count)) {
        return 0;
    }
    if (count > 0u && f->read(f->context, base + FEDTINY_STORE_HEADER_BYTES, head + FEDTINY_STORE_HEADER_BYTES,
                               4u * count) != 0) {
        return FEDTINY_STORE_ERR_FLASH;
    }
    offset = base + header_area(f, count);
    for (i = 0; i < count; i++) {
        uint32_t len = get_u32(head + FEDTINY_STORE_HEADER_BYTES + 4u * i);
        if (len > r->payload_len - sum) {
            return 0;
        }
        r->segment_len[i] = len;
        r->segment_offset[i] = offset;
        offset += len;
        sum += len;
    }
    if (sum != r->payload_len) {
        return 0;
    }
    status = crc_flash(f, base + header_area(f, count), r->payload_len, &crc);
    if (status != FEDTINY_STORE_OK) {
        return status;
    }
    return crc_tail(crc, r) == r->crc ? 1 : 0;
}

/* 1 if the bank's first FEDTINY_STORE_HEADER_BYTES are 0xFF: no record header was ever begun there (a save
 * programs the header last, so one cut during its payload leaves this true), 0 if not, or FEDTINY_STORE_ERR_FLASH. */
static int header_erased(const fedtiny_flash *f, uint32_t bank)
{
    uint8_t head[FEDTINY_STORE_HEADER_BYTES];
    uint32_t i;
    if (f->read(f->context, bank * f->bank_size, head, FEDTINY_STORE_HEADER_BYTES) != 0) {
        return FEDTINY_STORE_ERR_FLASH;
    }
    for (i = 0; i < FEDTINY_STORE_HEADER_BYTES; i++) {
        if (head[i] != 0xFFu) {
            return 0;
        }
    }
    return 1;
}

int fedtiny_store_open(fedtiny_store *store, const fedtiny_flash *flash, fedtiny_store_record *record)
{
    fedtiny_store_record candidate;
    uint32_t bank;
    int found = 0, erased = 1;

    if (store == NULL) {
        return FEDTINY_STORE_ERR_ARGUMENT;
    }
    store->flash = NULL; /* not open until this succeeds */
    if (!geometry_ok(flash)) {
        return FEDTINY_STORE_ERR_ARGUMENT;
    }
    for (bank = 0; bank < flash->bank_count; bank++) {
        int valid = check_bank(flash, bank, &candidate);
        if (valid < 0) {
            return valid;
        }
        /* Generations are distinct by construction; the lower bank wins a tie so the choice is deterministic. */
        if (valid == 1 && (!found || candidate.generation > store->newest.generation)) {
            store->newest = candidate;
            found = 1;
        }
    }
    if (found) {
        store->status = FEDTINY_STORE_OK;
    } else {
        for (bank = 0; bank < flash->bank_count && erased == 1; bank++) {
            erased = header_erased(flash, bank);
        }
        if (erased < 0) {
            return erased;
        }
        store->status = erased ? FEDTINY_STORE_EMPTY : FEDTINY_STORE_LOST;
    }
    store->flash = flash;
    if (found && record != NULL) {
        *record = store->newest;
    }
    return store->status;
}

int fedtiny_store_load(fedtiny_store *store, fedtiny_store_buffer *buffers, uint32_t count)
{
    const fedtiny_flash *f;
    const fedtiny_store_record *r;
    uint32_t i, crc = 0u;

    if (store == NULL || store->flash == NULL) {
        return FEDTINY_STORE_ERR_NOT_OPEN;
    }
    if (store->status != FEDTINY_STORE_OK) {
        return store->status;
    }
    f = store->flash;
    r = &store->newest;
    if (count != r->segment_count) {
        return FEDTINY_STORE_ERR_LAYOUT;
    }
    if (count > 0u && buffers == NULL) {
        return FEDTINY_STORE_ERR_ARGUMENT;
    }
    for (i = 0; i < count; i++) {
        buffers[i].length = r->segment_len[i];
        if (buffers[i].data != NULL && r->segment_len[i] > buffers[i].capacity) {
            return FEDTINY_STORE_ERR_BUFFER;
        }
    }
    for (i = 0; i < count; i++) {
        if (buffers[i].data == NULL) {
            int status = crc_flash(f, r->segment_offset[i], r->segment_len[i], &crc);
            if (status != FEDTINY_STORE_OK) {
                return status;
            }
        } else if (r->segment_len[i] > 0u) {
            if (f->read(f->context, r->segment_offset[i], (uint8_t *)buffers[i].data, r->segment_len[i]) != 0) {
                return FEDTINY_STORE_ERR_FLASH;
            }
            crc = fedtiny_crc32(crc, (const uint8_t *)buffers[i].data, r->segment_len[i]);
        }
    }
    /* The bytes handed out are the bytes the CRC was checked on: a flash that changed since open is caught. */
    return crc_tail(crc, r) == r->crc ? FEDTINY_STORE_OK : FEDTINY_STORE_ERR_VERIFY;
}

/* Program the segments one after the other from offset on, whole units only: a unit that spans two segments
 * (or ends the payload) is gathered in store->buffer, everything else goes to the HAL from the caller's memory. */
static int program_payload(fedtiny_store *store, uint32_t offset, const fedtiny_store_segment *segments,
                           uint32_t count, uint32_t *crc)
{
    const fedtiny_flash *f = store->flash;
    uint32_t unit = f->program_unit, fill = 0u, i;

    for (i = 0; i < count; i++) {
        const uint8_t *p = (const uint8_t *)segments[i].data;
        uint32_t n = segments[i].length;
        if (n == 0u) {
            continue;
        }
        *crc = fedtiny_crc32(*crc, p, n);
        if (fill > 0u) {
            uint32_t take = unit - fill < n ? unit - fill : n;
            memcpy(store->buffer + fill, p, take);
            fill += take;
            p += take;
            n -= take;
            if (fill == unit) {
                if (f->program(f->context, offset, store->buffer, unit) != 0) {
                    return FEDTINY_STORE_ERR_FLASH;
                }
                offset += unit;
                fill = 0u;
            }
        }
        if (n >= unit) { /* here fill == 0 */
            uint32_t whole = n - n % unit;
            if (f->program(f->context, offset, p, whole) != 0) {
                return FEDTINY_STORE_ERR_FLASH;
            }
            offset += whole;
            p += whole;
            n -= whole;
        }
        if (n > 0u) { /* fewer than a unit left, and fill == 0 */
            memcpy(store->buffer, p, n);
            fill = n;
        }
    }
    if (fill > 0u) {
        memset(store->buffer + fill, 0xFF, unit - fill);
        if (f->program(f->context, offset, store->buffer, unit) != 0) {
            return FEDTINY_STORE_ERR_FLASH;
        }
    }
    return FEDTINY_STORE_OK;
}

int fedtiny_store_save(fedtiny_store *store, const fedtiny_store_segment *segments, uint32_t count)
{
    const fedtiny_flash *f;
    fedtiny_store_record r, back;
    uint32_t i, area, base, crc = 0u, offset;
    int status;

    if (store == NULL || store->flash == NULL) {
        return FEDTINY_STORE_ERR_NOT_OPEN;
    }
    f = store->flash;
    if (count > FEDTINY_STORE_MAX_SEGMENTS || (count > 0u && segments == NULL)) {
        return FEDTINY_STORE_ERR_ARGUMENT;
    }
    memset(&r, 0, sizeof r);
    r.segment_count = count;
    area = header_area(f, count);
    offset = area;
    for (i = 0; i < count; i++) {
        if (segments[i].data == NULL && segments[i].length > 0u) {
            return FEDTINY_STORE_ERR_ARGUMENT;
        }
        if (segments[i].length > fedtiny_store_capacity(f, count) - r.payload_len) {
            return FEDTINY_STORE_ERR_TOO_LARGE;
        }
        r.segment_len[i] = segments[i].length;
        r.payload_len += segments[i].length;
    }
    if (store->status == FEDTINY_STORE_OK) {
        if (store->newest.generation == UINT32_MAX) {
            return FEDTINY_STORE_ERR_GENERATION;
        }
        r.generation = store->newest.generation + 1u;
        r.bank = (store->newest.bank + 1u) % f->bank_count;
    } else {
        r.generation = 1u;
        r.bank = 0u;
    }
    base = r.bank * f->bank_size;
    for (i = 0; i < count; i++) {
        r.segment_offset[i] = base + offset;
        offset += r.segment_len[i];
    }

    /* 1. Erase the target bank: the newest record lives in another one. */
    if (f->erase(f->context, r.bank) != 0) {
        return FEDTINY_STORE_ERR_FLASH;
    }
    /* 2. The payload. */
    status = program_payload(store, base + area, segments, count, &crc);
    if (status != FEDTINY_STORE_OK) {
        return status;
    }
    /* 3. The header area last: until it is whole, the bank holds no valid record. */
    r.crc = crc_tail(crc, &r);
    header_fields(store->buffer, count, r.generation, r.payload_len);
    put_u32(store->buffer + 16, r.crc);
    for (i = 0; i < count; i++) {
        put_u32(store->buffer + FEDTINY_STORE_HEADER_BYTES + 4u * i, r.segment_len[i]);
    }
    memset(store->buffer + FEDTINY_STORE_HEADER_BYTES + 4u * count, 0xFF,
           area - FEDTINY_STORE_HEADER_BYTES - 4u * count);
    if (f->program(f->context, base, store->buffer, area) != 0) {
        return FEDTINY_STORE_ERR_FLASH;
    }
    /* 4. Read it back: a record is the newest only once the flash holds it. */
    status = check_bank(f, r.bank, &back);
    if (status < 0) {
        return status;
    }
    if (status == 0 || back.generation != r.generation || back.crc != r.crc) {
        return FEDTINY_STORE_ERR_VERIFY;
    }
    store->newest = r;
    store->status = FEDTINY_STORE_OK;
    return FEDTINY_STORE_OK;
}
