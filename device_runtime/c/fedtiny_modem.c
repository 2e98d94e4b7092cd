/* The node's UART link to its modem, firmware side: see fedtiny_modem.h and docs/node.md. */
#include "fedtiny_modem.h"

#include <string.h>

/* CRC-32 (zlib's) four bits at a time: a 64-byte table instead of 1 KB. */
static const uint32_t crc_nibble[16] = {
    0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u, 0x4DB26158u, 0x5005713Cu,
    0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu, 0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu,
};

uint32_t fedtiny_modem_crc32(const uint8_t *data, size_t n)
{
    uint32_t crc = 0xFFFFFFFFu;
    size_t i;
    for (i = 0; i < n; i++) {
        crc ^= data[i];
        crc = (crc >> 4) ^ crc_nibble[crc & 0xFu];
        crc = (crc >> 4) ^ crc_nibble[crc & 0xFu];
    }
    return crc ^ 0xFFFFFFFFu;
}

static void put_u16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put_u32(uint8_t *p, uint32_t v)
{
    put_u16(p, v);
    put_u16(p + 2, v >> 16);
}

static uint32_t get_u16(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }

static uint32_t get_u32(const uint8_t *p) { return get_u16(p) | (get_u16(p + 2) << 16); }

/* ---- commands -------------------------------------------------------------------------------------------- */

/* The header, type and ref of a frame with a body of body_len bytes; the fields go at out + 7. */
static int frame_begin(uint8_t *out, size_t cap, size_t body_len, uint8_t type, uint8_t ref)
{
    if (body_len > FEDTINY_MODEM_MAX_BODY) {
        return FEDTINY_MODEM_ERR_ARGUMENT;
    }
    if (out == NULL || cap < FEDTINY_MODEM_FRAME_BYTES(body_len)) {
        return FEDTINY_MODEM_ERR_BUFFER;
    }
    out[0] = FEDTINY_MODEM_SYNC;
    put_u16(out + 1, (uint32_t)body_len);
    put_u16(out + 3, (uint32_t)body_len ^ 0xFFFFu);
    out[5] = type;
    out[6] = ref;
    return FEDTINY_MODEM_SUCCESS;
}

static int frame_end(uint8_t *out, size_t body_len, size_t *out_len)
{
    put_u32(out + FEDTINY_MODEM_HEADER_BYTES + body_len,
            fedtiny_modem_crc32(out + 1, FEDTINY_MODEM_HEADER_BYTES - 1u + body_len));
    *out_len = FEDTINY_MODEM_FRAME_BYTES(body_len);
    return FEDTINY_MODEM_SUCCESS;
}

/* A str8 at p: its length byte and bytes; returns the byte after it. */
static uint8_t *put_str8(uint8_t *p, const char *text, size_t len)
{
    *p++ = (uint8_t)len;
    memcpy(p, text, len);
    return p + len;
}

static int text_len(const char *text, size_t *len)
{
    size_t n = 0;
    if (text == NULL) {
        return FEDTINY_MODEM_ERR_ARGUMENT;
    }
    while (text[n] != '\0') {
        if (++n > FEDTINY_MODEM_MAX_TOPIC) {
            return FEDTINY_MODEM_ERR_ARGUMENT;
        }
    }
    *len = n;
    return FEDTINY_MODEM_SUCCESS;
}

static int empty_command(uint8_t *out, size_t cap, uint8_t type, uint8_t ref, size_t *out_len)
{
    int status = frame_begin(out, cap, FEDTINY_MODEM_MIN_BODY, type, ref);
    return status ? status : frame_end(out, FEDTINY_MODEM_MIN_BODY, out_len);
}

int fedtiny_modem_hello(uint8_t *out, size_t cap, uint8_t ref, uint16_t max_body, size_t *out_len)
{
    size_t body = FEDTINY_MODEM_MIN_BODY + 3u;
    int status = frame_begin(out, cap, body, FEDTINY_MODEM_HELLO, ref);
    if (status) {
        return status;
    }
    out[7] = FEDTINY_MODEM_VERSION;
    put_u16(out + 8, max_body);
    return frame_end(out, body, out_len);
}

int fedtiny_modem_connect(uint8_t *out, size_t cap, uint8_t ref, const fedtiny_modem_connect_params *params,
                          size_t *out_len)
{
    size_t id_len, topic_len = 0, body;
    uint8_t flags, *p;
    int status = text_len(params->client_id, &id_len);
    if (status) {
        return status;
    }
    flags = params->clean_session ? FEDTINY_MODEM_CLEAN_SESSION : 0u;
    body = FEDTINY_MODEM_MIN_BODY + 3u + 1u + id_len;
    if (params->will_topic != NULL) {
        status = text_len(params->will_topic, &topic_len);
        if (status || (params->will_payload == NULL && params->will_len)) {
            return FEDTINY_MODEM_ERR_ARGUMENT;
        }
        flags |= FEDTINY_MODEM_WILL | (params->will_retain ? FEDTINY_MODEM_WILL_RETAIN : 0u);
        if (params->will_len > FEDTINY_MODEM_MAX_BODY) {
            return FEDTINY_MODEM_ERR_ARGUMENT;
        }
        body += 1u + topic_len + params->will_len;
    }
    status = frame_begin(out, cap, body, FEDTINY_MODEM_CONNECT, ref);
    if (status) {
        return status;
    }
    out[7] = flags;
    put_u16(out + 8, params->keepalive_s);
    p = put_str8(out + 10, params->client_id, id_len);
    if (params->will_topic != NULL) {
        p = put_str8(p, params->will_topic, topic_len);
        if (params->will_len) {
            memcpy(p, params->will_payload, params->will_len);
        }
    }
    return frame_end(out, body, out_len);
}

int fedtiny_modem_subscribe(uint8_t *out, size_t cap, uint8_t ref, const char *topic_filter, size_t *out_len)
{
    size_t len, body;
    int status = text_len(topic_filter, &len);
    if (status) {
        return status;
    }
    body = FEDTINY_MODEM_MIN_BODY + len;
    status = frame_begin(out, cap, body, FEDTINY_MODEM_SUBSCRIBE, ref);
    if (status) {
        return status;
    }
    memcpy(out + 7, topic_filter, len);
    return frame_end(out, body, out_len);
}

uint8_t *fedtiny_modem_publish_payload(uint8_t *out, size_t topic_len)
{
    return out + FEDTINY_MODEM_HEADER_BYTES + FEDTINY_MODEM_PUBLISH_BODY(topic_len, 0u);
}

int fedtiny_modem_publish(uint8_t *out, size_t cap, uint8_t ref, const char *topic, uint8_t retain,
                          const uint8_t *payload, size_t payload_len, size_t *out_len)
{
    size_t topic_len, body;
    uint8_t *p;
    int status = text_len(topic, &topic_len);
    if (status || (payload == NULL && payload_len)) {
        return FEDTINY_MODEM_ERR_ARGUMENT;
    }
    if (payload_len > FEDTINY_MODEM_MAX_BODY) {
        return FEDTINY_MODEM_ERR_ARGUMENT;
    }
    body = FEDTINY_MODEM_PUBLISH_BODY(topic_len, payload_len);
    status = frame_begin(out, cap, body, FEDTINY_MODEM_PUBLISH, ref);
    if (status) {
        return status;
    }
    out[7] = retain ? FEDTINY_MODEM_RETAIN : 0u;
    p = put_str8(out + 8, topic, topic_len);
    if (payload_len) {
        memmove(p, payload, payload_len); /* nothing moves when the payload was written in place */
    }
    return frame_end(out, body, out_len);
}

int fedtiny_modem_disconnect(uint8_t *out, size_t cap, uint8_t ref, size_t *out_len)
{
    return empty_command(out, cap, FEDTINY_MODEM_DISCONNECT, ref, out_len);
}

int fedtiny_modem_taken(uint8_t *out, size_t cap, uint8_t ref, size_t *out_len)
{
    return empty_command(out, cap, FEDTINY_MODEM_TAKEN, ref, out_len);
}

/* ---- frames out of a byte stream ------------------------------------------------------------------------- */

void fedtiny_modem_rx_init(fedtiny_modem_rx *rx, uint8_t *buf, size_t cap, uint32_t idle_ms)
{
    memset(rx, 0, sizeof *rx);
    rx->buf = buf;
    rx->cap = cap;
    rx->idle_ms = idle_ms;
}

static size_t max_body(const fedtiny_modem_rx *rx)
{
    size_t body = rx->cap - FEDTINY_MODEM_FRAME_BYTES(0u);
    return body > FEDTINY_MODEM_MAX_BODY ? FEDTINY_MODEM_MAX_BODY : body;
}

/* Drop the candidate's SYNC and everything up to the next SYNC held. */
static void abandon(fedtiny_modem_rx *rx)
{
    const uint8_t *next = rx->len > 1u ? memchr(rx->buf + 1, FEDTINY_MODEM_SYNC, rx->len - 1u) : NULL;
    size_t cut = next != NULL ? (size_t)(next - rx->buf) : rx->len;
    rx->abandoned++;
    rx->discarded += (uint32_t)cut;
    memmove(rx->buf, rx->buf + cut, rx->len - cut);
    rx->len -= cut;
}

/* 0 if the buffer starts with a whole good frame (its length in rx->ready), else how many more bytes the
 * candidate needs (1 while hunting for a SYNC). */
static size_t scan(fedtiny_modem_rx *rx)
{
    for (;;) {
        size_t body, total;
        if (rx->len < FEDTINY_MODEM_HEADER_BYTES) {
            return rx->len ? FEDTINY_MODEM_HEADER_BYTES - rx->len : 1u;
        }
        body = get_u16(rx->buf + 1);
        if (get_u16(rx->buf + 3) != (body ^ 0xFFFFu) || body < FEDTINY_MODEM_MIN_BODY || body > max_body(rx)) {
            abandon(rx);
            continue;
        }
        total = FEDTINY_MODEM_FRAME_BYTES(body);
        if (rx->len < total) {
            return total - rx->len;
        }
        if (fedtiny_modem_crc32(rx->buf + 1, FEDTINY_MODEM_HEADER_BYTES - 1u + body) !=
            get_u32(rx->buf + FEDTINY_MODEM_HEADER_BYTES + body)) {
            abandon(rx);
            continue;
        }
        rx->ready = total;
        return 0;
    }
}

/* Read the event in the frame at the start of the buffer. */
static void read_event(fedtiny_modem_rx *rx, fedtiny_modem_event *ev)
{
    const uint8_t *f = rx->buf + FEDTINY_MODEM_HEADER_BYTES + FEDTINY_MODEM_MIN_BODY;
    uint32_t n = (uint32_t)(rx->ready - FEDTINY_MODEM_FRAME_BYTES(FEDTINY_MODEM_MIN_BODY)); /* field bytes */
    uint8_t ok = 0;
    rx->idle_counting = 0;
    ev->type = rx->buf[FEDTINY_MODEM_HEADER_BYTES];
    ev->ref = rx->buf[FEDTINY_MODEM_HEADER_BYTES + 1u];
    switch (ev->type) {
    case FEDTINY_MODEM_INFO:
        ok = n == 3u;
        if (ok) {
            ev->code = f[0];
            ev->max_payload = (uint16_t)get_u16(f + 1);
        }
        break;
    case FEDTINY_MODEM_OK:
    case FEDTINY_MODEM_PUBACK:
        ok = n == 0u;
        break;
    case FEDTINY_MODEM_ERROR:
    case FEDTINY_MODEM_DISCONNECTED:
        ok = n == 1u;
        if (ok) {
            ev->code = f[0];
        }
        break;
    case FEDTINY_MODEM_CONNECTED:
        ok = n == 1u && f[0] <= 1u;
        if (ok) {
            ev->code = f[0];
        }
        break;
    case FEDTINY_MODEM_RECEIVE:
        ok = n >= 1u && f[0] <= n - 1u;
        if (ok) {
            ev->topic = f + 1;
            ev->topic_len = f[0];
            ev->payload = f + 1 + f[0];
            ev->payload_len = n - 1u - f[0];
        }
        break;
    case FEDTINY_MODEM_DROPPED:
        ok = n >= 4u;
        if (ok) {
            ev->length = get_u32(f);
            ev->topic = f + 4;
            ev->topic_len = n - 4u;
        }
        break;
    default:
        break;
    }
    ev->malformed = (uint8_t)!ok;
}

int fedtiny_modem_receive(fedtiny_modem_rx *rx, const uint8_t *in, size_t n, uint32_t now_ms, size_t *taken,
                          fedtiny_modem_event *ev)
{
    size_t at = 0;
    memset(ev, 0, sizeof *ev);
    *taken = 0;
    if (rx->ready) { /* the frame returned last */
        memmove(rx->buf, rx->buf + rx->ready, rx->len - rx->ready);
        rx->len -= rx->ready;
        rx->ready = 0;
    }
    if (scan(rx) == 0) {
        read_event(rx, ev);
        return 1;
    }
    if (n) {
        rx->idle_counting = 0;
    }
    while (at < n) {
        size_t need, step;
        if (rx->len == 0) { /* hunting: skip to the next SYNC */
            const uint8_t *sync = memchr(in + at, FEDTINY_MODEM_SYNC, n - at);
            size_t next = sync != NULL ? (size_t)(sync - in) : n;
            rx->discarded += (uint32_t)(next - at);
            at = next;
            if (at == n) {
                break;
            }
        }
        need = scan(rx);
        step = need < n - at ? need : n - at;
        memcpy(rx->buf + rx->len, in + at, step);
        rx->len += step;
        at += step;
        if (scan(rx) == 0) {
            *taken = at;
            read_event(rx, ev);
            return 1;
        }
    }
    *taken = at;
    if (n == 0 && rx->len) {
        if (!rx->idle_counting) {
            rx->idle_counting = 1;
            rx->idle_since = now_ms;
        } else if (rx->idle_ms && (uint32_t)(now_ms - rx->idle_since) >= rx->idle_ms) {
            rx->idle_counting = 0;
            abandon(rx);
            if (scan(rx) == 0) {
                read_event(rx, ev);
                return 1;
            }
        }
    }
    return 0;
}
