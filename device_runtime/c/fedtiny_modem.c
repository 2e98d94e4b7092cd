/* The node's UART link to its modem, firmware side: see fedtiny_modem.h and docs/node.md. */
#include "fedtiny_modem.h"

#include <string.h>

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
            fedtiny_crc32(0u, out + 1, FEDTINY_MODEM_HEADER_BYTES - 1u + body_len));
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
            memmove(p, params->will_payload, params->will_len); /* it may have been written in place */
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
        if (fedtiny_crc32(0u, rx->buf + 1, FEDTINY_MODEM_HEADER_BYTES - 1u + body) !=
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
    uint8_t *f = rx->buf + FEDTINY_MODEM_HEADER_BYTES + FEDTINY_MODEM_MIN_BODY;
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

/* ---- the link -------------------------------------------------------------------------------------------- */

static uint8_t link_ref(fedtiny_modem_link *link)
{
    uint8_t ref = link->next_ref;
    link->next_ref = (uint8_t)(ref == 255u ? 1u : ref + 1u);
    return ref;
}

static int due(const fedtiny_modem_link *link, uint32_t now_ms)
{
    return (int32_t)(now_ms - link->due) >= 0;
}

int fedtiny_modem_link_init(fedtiny_modem_link *link, const fedtiny_modem_link_config *config,
                            const fedtiny_modem_link_callbacks *callbacks, uint32_t now_ms)
{
    if (config->client_id == NULL || config->rx == NULL || config->tx == NULL ||
        config->rx_cap < FEDTINY_MODEM_FRAME_BYTES(FEDTINY_MODEM_MIN_BODY) ||
        config->n_subscriptions > FEDTINY_MODEM_LINK_MAX_SUBSCRIPTIONS || callbacks->write == NULL ||
        callbacks->up == NULL || callbacks->message == NULL) {
        return FEDTINY_MODEM_ERR_ARGUMENT;
    }
    memset(link, 0, sizeof *link);
    link->config = *config;
    link->cb = *callbacks;
    fedtiny_modem_rx_init(&link->rx, config->rx, config->rx_cap, config->idle_ms);
    link->state = FEDTINY_MODEM_LINK_HELLO;
    link->next_ref = 1;
    link->due = now_ms;
    return FEDTINY_MODEM_SUCCESS;
}

/* Write the frame an encoder just made; len is read after the encoder ran (an argument `len` beside the
 * encoder's call could be read before it). */
static void link_send(fedtiny_modem_link *link, int status, const size_t *len)
{
    if (status == FEDTINY_MODEM_SUCCESS) {
        link->cb.write(link->cb.context, link->config.tx, *len);
    }
}

static void link_hello(fedtiny_modem_link *link, uint32_t now_ms)
{
    size_t len = 0, body = link->config.rx_cap - FEDTINY_MODEM_FRAME_BYTES(0u);
    link->state = FEDTINY_MODEM_LINK_HELLO;
    link->hello_ref = link_ref(link);
    link_send(link, fedtiny_modem_hello(link->config.tx, link->config.tx_cap, link->hello_ref,
                                        (uint16_t)(body > FEDTINY_MODEM_MAX_BODY ? FEDTINY_MODEM_MAX_BODY : body),
                                        &len), &len);
    link->due = now_ms + link->config.hello_ms;
}

static void link_connect(fedtiny_modem_link *link, uint32_t now_ms)
{
    fedtiny_modem_connect_params params;
    size_t len = 0, id_len = strlen(link->config.client_id);
    memset(&params, 0, sizeof params);
    params.client_id = link->config.client_id;
    params.keepalive_s = link->config.keepalive_s;
    params.clean_session = link->config.clean_session;
    if (link->config.will_topic != NULL && link->cb.will != NULL && id_len <= FEDTINY_MODEM_MAX_TOPIC) {
        /* the will is written where the CONNECT frame carries it: flags, keepalive, client id, will topic */
        size_t topic_len = strlen(link->config.will_topic);
        size_t at = FEDTINY_MODEM_HEADER_BYTES + FEDTINY_MODEM_MIN_BODY + 3u + 1u + id_len + 1u + topic_len;
        size_t will_len = 0;
        if (topic_len <= FEDTINY_MODEM_MAX_TOPIC && at + FEDTINY_MODEM_CRC_BYTES < link->config.tx_cap &&
            link->cb.will(link->cb.context, now_ms, link->config.tx + at,
                          link->config.tx_cap - at - FEDTINY_MODEM_CRC_BYTES, &will_len) == 0) {
            params.will_topic = link->config.will_topic;
            params.will_payload = link->config.tx + at;
            params.will_len = will_len;
            params.will_retain = link->config.will_retain;
        }
    }
    link->connect_ref = link_ref(link);
    link_send(link, fedtiny_modem_connect(link->config.tx, link->config.tx_cap, link->connect_ref, &params, &len),
              &len);
    link->state = FEDTINY_MODEM_LINK_CONNECTING;
    link->connects++;
    link->due = now_ms + link->config.connect_timeout_ms;
}

static void link_retry(fedtiny_modem_link *link, uint32_t now_ms)
{
    link->state = FEDTINY_MODEM_LINK_RETRY;
    link->due = now_ms + link->config.retry_ms;
}

static void link_event(fedtiny_modem_link *link, fedtiny_modem_event *ev, uint32_t now_ms)
{
    size_t len = 0;
    uint32_t i;
    if (link->cb.observe != NULL) {
        link->cb.observe(link->cb.context, ev);
    }
    if (ev->malformed) {
        link->malformed++;
        return;
    }
    switch (ev->type) {
    case FEDTINY_MODEM_INFO:
        if (link->state != FEDTINY_MODEM_LINK_HELLO || ev->ref != link->hello_ref) {
            break; /* the answer to an older HELLO */
        }
        link->max_payload = ev->max_payload;
        if (ev->code != FEDTINY_MODEM_VERSION || ev->max_payload < link->config.min_payload) {
            link->state = FEDTINY_MODEM_LINK_FAILED;
            break;
        }
        link_connect(link, now_ms);
        break;
    case FEDTINY_MODEM_CONNECTED:
        if (link->state != FEDTINY_MODEM_LINK_CONNECTING) {
            break;
        }
        for (i = 0; i < link->config.n_subscriptions; i++) {
            link_send(link, fedtiny_modem_subscribe(link->config.tx, link->config.tx_cap, link_ref(link),
                                                    link->config.subscriptions[i], &len), &len);
        }
        link->state = FEDTINY_MODEM_LINK_UP;
        link->cb.up(link->cb.context, now_ms);
        break;
    case FEDTINY_MODEM_DISCONNECTED:
        if (link->state == FEDTINY_MODEM_LINK_CONNECTING || link->state == FEDTINY_MODEM_LINK_UP) {
            link->disconnects++;
            link_retry(link, now_ms);
        }
        break;
    case FEDTINY_MODEM_ERROR:
        link->errors++;
        if (ev->code == FEDTINY_MODEM_ERROR_NOT_CONNECTED && link->state == FEDTINY_MODEM_LINK_UP) {
            link_hello(link, now_ms); /* the modem restarted under a link that was up */
        } else if (ev->code == FEDTINY_MODEM_ERROR_VERSION && link->state == FEDTINY_MODEM_LINK_HELLO) {
            link->state = FEDTINY_MODEM_LINK_FAILED;
        } else if (link->state == FEDTINY_MODEM_LINK_CONNECTING && ev->ref == link->connect_ref) {
            link_retry(link, now_ms);
        }
        break;
    case FEDTINY_MODEM_RECEIVE:
        link->cb.message(link->cb.context, ev->topic, ev->topic_len, ev->payload, ev->payload_len, now_ms);
        link_send(link, fedtiny_modem_taken(link->config.tx, link->config.tx_cap, ev->ref, &len), &len);
        break;
    case FEDTINY_MODEM_PUBACK:
        link->pubacks++;
        break;
    case FEDTINY_MODEM_DROPPED:
        link->dropped++;
        break;
    default: /* OK, or a command type the modem should not send */
        break;
    }
}

void fedtiny_modem_link_poll(fedtiny_modem_link *link, const uint8_t *in, size_t n, uint32_t now_ms)
{
    size_t at = 0;
    int got;
    do {
        fedtiny_modem_event ev;
        size_t took = 0;
        got = fedtiny_modem_receive(&link->rx, in + at, n - at, now_ms, &took, &ev);
        at += took;
        if (got) {
            link_event(link, &ev, now_ms);
        }
    } while (got || at < n);
    if (link->state == FEDTINY_MODEM_LINK_HELLO && due(link, now_ms)) {
        link_hello(link, now_ms);
    } else if (link->state == FEDTINY_MODEM_LINK_RETRY && due(link, now_ms)) {
        link_connect(link, now_ms);
    } else if (link->state == FEDTINY_MODEM_LINK_CONNECTING && link->config.connect_timeout_ms &&
               due(link, now_ms)) {
        link_hello(link, now_ms);
    }
}

int fedtiny_modem_link_publish(fedtiny_modem_link *link, const char *topic, uint8_t retain, const uint8_t *payload,
                               size_t len)
{
    size_t out = 0;
    int status;
    if (link->state != FEDTINY_MODEM_LINK_UP) {
        return -1;
    }
    status = fedtiny_modem_publish(link->config.tx, link->config.tx_cap, link_ref(link), topic, retain, payload,
                                   len, &out);
    link_send(link, status, &out);
    return status;
}
