/* Test firmware of the modem link (QEMU mps2-an386; tests/test_modem_link.py): the node's UART1 talks to the
 * bridge (fedtiny_device.bridge) in fedtiny_modem frames, the way firmware_node.c does, with no protocol above.
 *
 * Semihosting command line: PROGRAM FLEET DEVICE. The firmware
 *   - sends HELLO every second until the modem answers INFO (max_payload must take a chunk of CHUNK bytes),
 *   - CONNECTs as DEVICE with a retained last will "offline DEVICE" on fedtiny/FLEET/status/DEVICE,
 *   - once CONNECTED: SUBSCRIBEs to fedtiny/FLEET/down/DEVICE, then PUBLISHes one chunk of CHUNK bytes on
 *     fedtiny/FLEET/up/DEVICE: "hello DEVICE " and then byte i = (i * 31 + 7) mod 256 (hello_payload),
 *   - PUBLISHes every RECEIVE back on the up topic unchanged (then TAKEN), except "exit", which ends it (code 0),
 *   - on DROPPED publishes "dropped LENGTH",
 *   - after DISCONNECTED waits RETRY_MS and CONNECTs again; an ERROR NOT_CONNECTED while it believed itself
 *     connected means the modem restarted: it starts again from HELLO.
 * Each step prints one "link: ..." line on the semihosting console. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fedtiny_boot.h"
#include "fedtiny_modem.h"
#include "fedtiny_uart_cmsdk.h"

#define CHUNK 1024u     /* the node's chunk size: one MQTT payload */
#define TOPIC_MAX 160u  /* "fedtiny/" fleet "/status/" device: 64-byte names fit */
#define BAUD 115200u
#define HELLO_MS 1000u
#define RETRY_MS 500u
#define IDLE_MS 200u

static uint8_t rx_buf[FEDTINY_MODEM_FRAME_BYTES(FEDTINY_MODEM_RECEIVE_BODY(TOPIC_MAX, CHUNK))];
static uint8_t tx_buf[FEDTINY_MODEM_FRAME_BYTES(FEDTINY_MODEM_PUBLISH_BODY(TOPIC_MAX, CHUNK))];
static fedtiny_modem_rx rx;
static fedtiny_uart uart;

static char cmdline[200];
static const char *fleet = "", *device = "";
static char up_topic[TOPIC_MAX + 1], down_topic[TOPIC_MAX + 1], status_topic[TOPIC_MAX + 1];
static char will[80];

enum { WANT_HELLO, WANT_CONNECT, CONNECTING, CONNECTED, STOPPED };
static int state = WANT_HELLO;
static uint32_t wait_until;  /* when the next HELLO or CONNECT is due */
static uint8_t next_ref = 1;
static uint8_t hello_ref, subscribe_ref;
static uint32_t pubacks, echoes;
static int exit_code;

/* ARM semihosting SYS_GET_CMDLINE: the arguments QEMU's -semihosting-config arg=... gave, space-separated. */
static int semihost_cmdline(char *buf, uint32_t cap)
{
    struct {
        char *buf;
        uint32_t len;
    } block = {buf, cap};
    register uint32_t op __asm__("r0") = 0x15u;
    register void *arg __asm__("r1") = &block;
    __asm__ volatile("bkpt 0xAB" : "+r"(op) : "r"(arg) : "memory");
    return (int)op;
}

static void send(int status, size_t len)
{
    if (status != FEDTINY_MODEM_SUCCESS) {
        printf("link: encode error %d\n", status);
        return;
    }
    fedtiny_uart_write(&uart, tx_buf, len);
}

static uint8_t ref(void)
{
    uint8_t r = next_ref;
    next_ref = (uint8_t)(next_ref == 255u ? 1u : next_ref + 1u);
    return r;
}

static void publish(const uint8_t *payload, size_t n)
{
    size_t len = 0;
    send(fedtiny_modem_publish(tx_buf, sizeof tx_buf, ref(), up_topic, 0u, payload, n, &len), len);
}

/* The hello chunk, written straight into the PUBLISH frame's payload (nothing copied). */
static void publish_hello(void)
{
    uint8_t *payload = fedtiny_modem_publish_payload(tx_buf, strlen(up_topic));
    int head = snprintf((char *)payload, CHUNK, "hello %s ", device);
    uint32_t i;
    for (i = (uint32_t)head; i < CHUNK; i++) {
        payload[i] = (uint8_t)(i * 31u + 7u);
    }
    publish(payload, CHUNK);
    printf("link: published hello %u bytes\n", (unsigned)CHUNK);
}

static void modem_connect(void)
{
    size_t len = 0;
    fedtiny_modem_connect_params params;
    memset(&params, 0, sizeof params);
    params.client_id = device;
    params.keepalive_s = 30u;
    params.will_topic = status_topic;
    params.will_payload = (const uint8_t *)will;
    params.will_len = strlen(will);
    params.will_retain = 1u;
    send(fedtiny_modem_connect(tx_buf, sizeof tx_buf, ref(), &params, &len), len);
    state = CONNECTING;
    printf("link: connect\n");
}

static void handle(const fedtiny_modem_event *ev, uint32_t now)
{
    size_t len = 0;
    if (ev->malformed) {
        printf("link: malformed frame type 0x%02x\n", ev->type);
        return;
    }
    switch (ev->type) {
    case FEDTINY_MODEM_INFO:
        if (state != WANT_HELLO || ev->ref != hello_ref) {
            break;
        }
        printf("link: modem version %u max_payload %u\n", ev->code, ev->max_payload);
        if (ev->max_payload < CHUNK) {
            printf("link: the modem's MTU is below the chunk size %u\n", (unsigned)CHUNK);
            exit_code = 1;
            state = STOPPED;
            break;
        }
        modem_connect();
        break;
    case FEDTINY_MODEM_CONNECTED:
        state = CONNECTED;
        printf("link: connected session_present %u\n", ev->code);
        subscribe_ref = ref();
        send(fedtiny_modem_subscribe(tx_buf, sizeof tx_buf, subscribe_ref, down_topic, &len), len);
        break;
    case FEDTINY_MODEM_OK:
        if (ev->ref == subscribe_ref && state == CONNECTED) {
            printf("link: subscribed\n");
            publish_hello();
        }
        break;
    case FEDTINY_MODEM_PUBACK:
        pubacks++;
        printf("link: puback %u\n", (unsigned)pubacks);
        break;
    case FEDTINY_MODEM_ERROR:
        printf("link: error %u for ref %u\n", ev->code, ev->ref);
        if (ev->code == FEDTINY_MODEM_ERROR_NOT_CONNECTED && state == CONNECTED) {
            state = WANT_HELLO; /* the modem restarted under us */
            wait_until = now;
        }
        break;
    case FEDTINY_MODEM_DISCONNECTED:
        printf("link: disconnected reason %u\n", ev->code);
        state = WANT_CONNECT;
        wait_until = now + RETRY_MS;
        break;
    case FEDTINY_MODEM_RECEIVE:
        if (ev->payload_len == 4u && memcmp(ev->payload, "exit", 4u) == 0) {
            send(fedtiny_modem_taken(tx_buf, sizeof tx_buf, ev->ref, &len), len);
            printf("link: exit after %u echoes\n", (unsigned)echoes);
            state = STOPPED;
            break;
        }
        publish(ev->payload, ev->payload_len);
        send(fedtiny_modem_taken(tx_buf, sizeof tx_buf, ev->ref, &len), len);
        echoes++;
        printf("link: echo %u bytes\n", (unsigned)ev->payload_len);
        break;
    case FEDTINY_MODEM_DROPPED: {
        char note[32];
        int n = snprintf(note, sizeof note, "dropped %lu", (unsigned long)ev->length);
        publish((const uint8_t *)note, (size_t)n);
        printf("link: %s\n", note);
        break;
    }
    default:
        break;
    }
}

static void tick(uint32_t now)
{
    size_t len = 0;
    if ((int32_t)(now - wait_until) < 0) {
        return;
    }
    if (state == WANT_HELLO) {
        hello_ref = ref();
        uint16_t max_body = (uint16_t)(sizeof rx_buf - FEDTINY_MODEM_FRAME_BYTES(0u));
        send(fedtiny_modem_hello(tx_buf, sizeof tx_buf, hello_ref, max_body, &len), len);
        wait_until = now + HELLO_MS;
    } else if (state == WANT_CONNECT) {
        modem_connect();
    }
}

static int parse_cmdline(void)
{
    char *p = cmdline;
    const char *words[3] = {0, 0, 0};
    int n = 0;
    if (semihost_cmdline(cmdline, sizeof cmdline) != 0) {
        return -1;
    }
    while (*p && n < 3) {
        while (*p == ' ') {
            *p++ = '\0';
        }
        if (*p) {
            words[n++] = p;
        }
        while (*p && *p != ' ') {
            p++;
        }
    }
    if (*p == ' ') {
        *p = '\0';
    }
    if (n != 3) {
        return -1;
    }
    fleet = words[1];
    device = words[2];
    return 0;
}

int main(void)
{
    uint32_t overruns = 0;
    if (parse_cmdline() != 0) {
        printf("link: usage: firmware FLEET DEVICE (semihosting arguments)\n");
        return 2;
    }
    snprintf(up_topic, sizeof up_topic, "fedtiny/%s/up/%s", fleet, device);
    snprintf(down_topic, sizeof down_topic, "fedtiny/%s/down/%s", fleet, device);
    snprintf(status_topic, sizeof status_topic, "fedtiny/%s/status/%s", fleet, device);
    snprintf(will, sizeof will, "offline %s", device);
    fedtiny_uart_init(&uart, FEDTINY_MPS2_UART1, FEDTINY_MPS2_SYSCLK_HZ, BAUD);
    fedtiny_modem_rx_init(&rx, rx_buf, sizeof rx_buf, IDLE_MS);
    printf("link: boot %s %s rx %u tx %u bytes\n", fleet, device, (unsigned)sizeof rx_buf, (unsigned)sizeof tx_buf);
    wait_until = fedtiny_clock_ms();
    while (state != STOPPED) {
        uint8_t in[64];
        size_t n = fedtiny_uart_read(&uart, in, sizeof in, &overruns), off = 0;
        uint32_t now = fedtiny_clock_ms();
        fedtiny_modem_event ev;
        int got;
        do {
            size_t took = 0;
            got = fedtiny_modem_receive(&rx, in + off, n - off, now, &took, &ev);
            off += took;
            if (got) {
                handle(&ev, now);
            }
        } while (got || off < n);
        tick(now);
    }
    printf("link: stopped; frames abandoned %lu, bytes discarded %lu, overruns %lu\n", (unsigned long)rx.abandoned,
           (unsigned long)rx.discarded, (unsigned long)overruns);
    return exit_code;
}
