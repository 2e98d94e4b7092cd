/* The node's UART link to its modem (docs/node.md), firmware side: commands encoded into the caller's buffer,
 * frames found in the bytes the UART delivers and read as events. Sans-IO: no UART access, no clock of its own
 * (the caller passes milliseconds). Portable C99, no malloc, no stdio. fedtiny_device/modem.py is the same link
 * in Python (the bridge's side); the decoder here follows its FrameDecoder rule for rule.
 *
 *     frame = SYNC 0xA5 | LEN u16 | NLEN u16 (LEN ^ 0xFFFF) | body (LEN bytes) | CRC-32 u32 of LEN, NLEN, body
 *     body  = type u8 | ref u8 | fields        (little-endian; str8 = u8 length + bytes; "rest" = to the end)
 *
 * The firmware sends commands (HELLO, CONNECT, SUBSCRIBE, PUBLISH, DISCONNECT, TAKEN), each but TAKEN answered by
 * one result carrying its ref (INFO, OK, PUBACK, ERROR); the modem also sends events (CONNECTED, DISCONNECTED,
 * RECEIVE, DROPPED). The modem hands over one RECEIVE at a time and the next only after the firmware's TAKEN
 * with its ref, so one receive buffer is enough however long the firmware is away from its UART.
 */
#ifndef FEDTINY_MODEM_H
#define FEDTINY_MODEM_H

#include <stddef.h>
#include <stdint.h>

#include "fedtiny_crc32.h"

#define FEDTINY_MODEM_VERSION 1u
#define FEDTINY_MODEM_SYNC 0xA5u
#define FEDTINY_MODEM_HEADER_BYTES 5u /* SYNC, LEN, NLEN */
#define FEDTINY_MODEM_CRC_BYTES 4u
#define FEDTINY_MODEM_MIN_BODY 2u /* type, ref */
#define FEDTINY_MODEM_MAX_BODY 0xFFFFu
#define FEDTINY_MODEM_MAX_TOPIC 255u
/* Bytes of a whole frame around a body of n bytes. */
#define FEDTINY_MODEM_FRAME_BYTES(n) (FEDTINY_MODEM_HEADER_BYTES + (n) + FEDTINY_MODEM_CRC_BYTES)
/* Body bytes of a PUBLISH command and of a RECEIVE event with a topic of t bytes and a payload of p bytes: a
 * receive buffer of FEDTINY_MODEM_FRAME_BYTES(FEDTINY_MODEM_RECEIVE_BODY(t, p)) takes every downlink chunk of
 * p bytes on topics of up to t bytes. */
#define FEDTINY_MODEM_PUBLISH_BODY(t, p) (FEDTINY_MODEM_MIN_BODY + 2u + (t) + (p))
#define FEDTINY_MODEM_RECEIVE_BODY(t, p) (FEDTINY_MODEM_MIN_BODY + 1u + (t) + (p))

/* Frame types. */
enum {
    /* commands: firmware -> modem */
    FEDTINY_MODEM_HELLO = 0x01,      /* version u8 | max_body u16                          -> INFO */
    FEDTINY_MODEM_CONNECT = 0x02,    /* flags u8 | keepalive u16 | client_id str8 [| will_topic str8 | will rest]
                                        -> OK, then CONNECTED or DISCONNECTED */
    FEDTINY_MODEM_SUBSCRIBE = 0x03,  /* topic_filter rest (QoS 1)                          -> OK (granted) */
    FEDTINY_MODEM_PUBLISH = 0x04,    /* flags u8 | topic str8 | payload rest (QoS 1)       -> PUBACK */
    FEDTINY_MODEM_DISCONNECT = 0x05, /*                                                    -> OK */
    FEDTINY_MODEM_TAKEN = 0x06,      /* ref = a RECEIVE's ref; no result */
    /* results: modem -> firmware, ref = the command's */
    FEDTINY_MODEM_INFO = 0x81,  /* version u8 | max_payload u16 */
    FEDTINY_MODEM_OK = 0x82,
    FEDTINY_MODEM_PUBACK = 0x83,
    FEDTINY_MODEM_ERROR = 0x84, /* code u8 */
    /* events: modem -> firmware */
    FEDTINY_MODEM_CONNECTED = 0xC0,    /* session_present u8 */
    FEDTINY_MODEM_DISCONNECTED = 0xC1, /* reason u8 */
    FEDTINY_MODEM_RECEIVE = 0xC2,      /* topic str8 | payload rest; ref = delivery number, answered by TAKEN */
    FEDTINY_MODEM_DROPPED = 0xC3       /* length u32 | topic rest: too large for this firmware, dropped */
};

/* ERROR codes and DISCONNECTED reasons. */
enum {
    FEDTINY_MODEM_ERROR_MALFORMED = 1,
    FEDTINY_MODEM_ERROR_UNKNOWN = 2,
    FEDTINY_MODEM_ERROR_NOT_CONNECTED = 3,
    FEDTINY_MODEM_ERROR_TOO_LARGE = 4,
    FEDTINY_MODEM_ERROR_REFUSED = 5,
    FEDTINY_MODEM_ERROR_LOST = 6,
    FEDTINY_MODEM_ERROR_VERSION = 7
};
enum { FEDTINY_MODEM_LOST = 1, FEDTINY_MODEM_REFUSED = 2 };

/* Flags of CONNECT and PUBLISH. */
enum { FEDTINY_MODEM_CLEAN_SESSION = 0x01, FEDTINY_MODEM_WILL = 0x02, FEDTINY_MODEM_WILL_RETAIN = 0x04 };
enum { FEDTINY_MODEM_RETAIN = 0x01 };

/* Results of the encoders; the numbers do not overlap fedtiny_env_status or fedtiny_chunk_status. */
typedef enum {
    FEDTINY_MODEM_SUCCESS = 0,
    FEDTINY_MODEM_ERR_ARGUMENT = -200, /* a topic or client id over 255 bytes, a body over 65535 */
    FEDTINY_MODEM_ERR_BUFFER = -201    /* the output buffer is too small */
} fedtiny_modem_status;

/* ---- commands -------------------------------------------------------------------------------------------- */

typedef struct {
    const char *client_id;     /* NUL-terminated; the broker may replace it (mosquitto: the login name) */
    uint16_t keepalive_s;
    uint8_t clean_session;
    const char *will_topic;    /* NULL: no last will */
    const uint8_t *will_payload;
    size_t will_len;
    uint8_t will_retain;
} fedtiny_modem_connect_params;

/* Each writes one whole frame into out (capacity cap), its length into *out_len; 0 or a fedtiny_modem_status.
 * `max_body` in HELLO is the largest frame body the firmware's receive buffer takes (capacity - 9). */
int fedtiny_modem_hello(uint8_t *out, size_t cap, uint8_t ref, uint16_t max_body, size_t *out_len);
int fedtiny_modem_connect(uint8_t *out, size_t cap, uint8_t ref, const fedtiny_modem_connect_params *params,
                          size_t *out_len);
int fedtiny_modem_subscribe(uint8_t *out, size_t cap, uint8_t ref, const char *topic_filter, size_t *out_len);
int fedtiny_modem_publish(uint8_t *out, size_t cap, uint8_t ref, const char *topic, uint8_t retain,
                          const uint8_t *payload, size_t payload_len, size_t *out_len);
int fedtiny_modem_disconnect(uint8_t *out, size_t cap, uint8_t ref, size_t *out_len);
int fedtiny_modem_taken(uint8_t *out, size_t cap, uint8_t ref, size_t *out_len);

/* Where fedtiny_modem_publish puts the payload in `out` for a topic of topic_len bytes. A chunk frame written
 * there first is not copied: pass this pointer as the payload. */
uint8_t *fedtiny_modem_publish_payload(uint8_t *out, size_t topic_len);

/* ---- events ---------------------------------------------------------------------------------------------- */

typedef struct {
    uint8_t *buf;          /* the caller's receive buffer: one frame of at most cap - 9 body bytes */
    size_t cap;
    size_t len;            /* bytes held: empty, or a candidate frame from its SYNC */
    size_t ready;          /* length of the frame returned last, removed at the next call */
    uint32_t idle_ms;      /* 0: never abandon a partial frame for silence */
    uint32_t idle_since;
    uint8_t idle_counting;
    uint32_t discarded;    /* bytes that were not part of a good frame */
    uint32_t abandoned;    /* candidate frames dropped (bad NLEN or LEN, bad CRC, silence) */
} fedtiny_modem_rx;

typedef struct {
    uint8_t type;          /* the frame's type */
    uint8_t malformed;     /* 1: a good frame (CRC) that is no event, or whose fields do not parse */
    uint8_t ref;
    uint8_t code;          /* ERROR code, DISCONNECTED reason, CONNECTED session_present, INFO version */
    uint16_t max_payload;  /* INFO */
    uint32_t length;       /* DROPPED: the message's length */
    uint8_t *topic;        /* RECEIVE, DROPPED: in the receive buffer, not NUL-terminated */
    uint32_t topic_len;
    uint8_t *payload;      /* RECEIVE: in the receive buffer (the session may decrypt it in place) */
    uint32_t payload_len;
} fedtiny_modem_event;

/* cap: 11..65544 bytes (FEDTINY_MODEM_FRAME_BYTES of the largest body to take). */
void fedtiny_modem_rx_init(fedtiny_modem_rx *rx, uint8_t *buf, size_t cap, uint32_t idle_ms);

/* Takes bytes of in[0..n) until a frame is complete (*taken: how many); returns 1 and the frame in *ev, or 0.
 * Call again, also with n = 0, until it returns 0: a frame may follow from bytes already held. n = 0 means
 * "the UART had nothing": the first such call starts the silence clock, and with idle_ms > 0 a partial frame
 * is abandoned once it has run that long; bytes or a frame stop it. The event points into the receive buffer
 * and stays valid until the next call. */
int fedtiny_modem_receive(fedtiny_modem_rx *rx, const uint8_t *in, size_t n, uint32_t now_ms, size_t *taken,
                          fedtiny_modem_event *ev);

/* ---- the link: the firmware's side of the sequences of docs/node.md ---------------------------------------
 *
 * HELLO every hello_ms until INFO (whose max_payload must take min_payload, the node's chunk size), CONNECT with
 * a last will the caller seals for each connection, SUBSCRIBE to each filter once CONNECTED and then `up` (the
 * session's on_connect, at once, as the Python agent does: a message the broker kept for the session may come
 * before the SUBACK), every RECEIVE to `message` and then TAKEN, CONNECT again retry_ms after DISCONNECTED, and
 * from HELLO again when the modem says NOT_CONNECTED to a link that is up (the modem restarted) or when a
 * CONNECT gets no answer within connect_timeout_ms. Sans-IO: bytes in through fedtiny_modem_link_poll, bytes
 * out through the `write` callback, time from the caller. */

#define FEDTINY_MODEM_LINK_MAX_SUBSCRIPTIONS 4u

typedef enum {
    FEDTINY_MODEM_LINK_HELLO = 0,   /* HELLO sent every hello_ms until INFO */
    FEDTINY_MODEM_LINK_CONNECTING = 1, /* CONNECT sent: waiting for CONNECTED or DISCONNECTED */
    FEDTINY_MODEM_LINK_UP = 2,      /* connected; subscriptions sent */
    FEDTINY_MODEM_LINK_RETRY = 3,   /* DISCONNECTED: CONNECT again when due */
    FEDTINY_MODEM_LINK_FAILED = 4   /* the modem cannot carry this node (MTU or link version): stays so */
} fedtiny_modem_link_state;

typedef struct {
    void *context;
    /* Write every byte to the modem's UART. */
    void (*write)(void *context, const uint8_t *data, size_t n);
    /* The last will's payload for the next CONNECT (the session seals a fresh OFFLINE status for each), written
     * to out (cap bytes), its length in *len; nonzero: connect without a will. May be NULL: no will. */
    int (*will)(void *context, uint32_t now_ms, uint8_t *out, size_t cap, size_t *len);
    /* Connected, subscriptions sent: the session's on_connect. */
    void (*up)(void *context, uint32_t now_ms);
    /* A message from the broker; the payload may be changed in place. TAKEN follows when this returns. */
    void (*message)(void *context, const uint8_t *topic, uint32_t topic_len, uint8_t *payload, uint32_t len,
                    uint32_t now_ms);
    /* Optional: every frame the link read, before it acts on it (for logs and counters). */
    void (*observe)(void *context, const fedtiny_modem_event *ev);
} fedtiny_modem_link_callbacks;

typedef struct {
    const char *client_id;
    const char *will_topic; /* NULL: no last will */
    uint8_t will_retain;
    uint8_t clean_session;
    uint16_t keepalive_s;
    const char *subscriptions[FEDTINY_MODEM_LINK_MAX_SUBSCRIPTIONS];
    uint32_t n_subscriptions;
    uint32_t min_payload;        /* the node's chunk size */
    uint32_t hello_ms;           /* HELLO again after this long without INFO */
    uint32_t retry_ms;           /* CONNECT again this long after DISCONNECTED */
    uint32_t connect_timeout_ms; /* 0: wait for CONNECTED or DISCONNECTED however long the modem tries */
    uint32_t idle_ms;            /* the receiver's silence timeout (fedtiny_modem_rx_init) */
    uint8_t *rx;                 /* receive buffer: one frame */
    size_t rx_cap;
    uint8_t *tx;                 /* command buffer: one frame */
    size_t tx_cap;
} fedtiny_modem_link_config;

typedef struct {
    fedtiny_modem_link_config config;
    fedtiny_modem_link_callbacks cb;
    fedtiny_modem_rx rx;
    uint8_t state;        /* fedtiny_modem_link_state */
    uint8_t next_ref;
    uint8_t hello_ref;
    uint8_t connect_ref;
    uint16_t max_payload; /* the modem's MTU, from INFO */
    uint32_t due;         /* when the next HELLO or CONNECT is due, or the CONNECT times out */
    uint32_t connects, disconnects, pubacks, errors, dropped, malformed;
} fedtiny_modem_link;

/* FEDTINY_MODEM_ERR_ARGUMENT for a missing callback, buffer or client id, or too many subscriptions. */
int fedtiny_modem_link_init(fedtiny_modem_link *link, const fedtiny_modem_link_config *config,
                            const fedtiny_modem_link_callbacks *callbacks, uint32_t now_ms);
/* Bytes from the UART (n = 0: it had none): handles every frame they complete, then the timers. */
void fedtiny_modem_link_poll(fedtiny_modem_link *link, const uint8_t *in, size_t n, uint32_t now_ms);
/* PUBLISH (QoS 1): 0 once written to the UART; -1 if the link is not up (the protocol sends it again later);
 * an encoder status if it does not fit. The payload may already sit in the command buffer, where
 * fedtiny_modem_publish_payload(config.tx, strlen(topic)) points. */
int fedtiny_modem_link_publish(fedtiny_modem_link *link, const char *topic, uint8_t retain, const uint8_t *payload,
                               size_t len);


#endif
