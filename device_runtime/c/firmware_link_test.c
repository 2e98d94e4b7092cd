/* Test firmware of the modem link (QEMU mps2-an386; tests/test_modem_link.py): UART1 to the bridge
 * (fedtiny_device.bridge) through fedtiny_modem_link, as firmware_node.c uses it, with no protocol above.
 *
 * Semihosting command line: PROGRAM FLEET DEVICE. The link says HELLO until the modem answers, CONNECTs as
 * DEVICE with a retained last will "offline DEVICE" on fedtiny/FLEET/status/DEVICE, subscribes to
 * fedtiny/FLEET/down/DEVICE and reconnects after every DISCONNECTED. Each time the link is up the firmware
 * PUBLISHes one chunk of CHUNK bytes on fedtiny/FLEET/up/DEVICE ("hello DEVICE " and then byte i =
 * (i * 31 + 7) mod 256), written straight into the command buffer. It PUBLISHes every message it receives back
 * on the up topic unchanged, except "exit", which ends it (exit code 0), and "dropped LENGTH" for a message the
 * modem dropped. Every step prints one "link: ..." line on the semihosting console. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fedtiny_boot.h"
#include "fedtiny_modem.h"
#include "fedtiny_uart_cmsdk.h"

#define CHUNK 1024u    /* the node's chunk size: one MQTT payload */
#define TOPIC_MAX 160u /* "fedtiny/" fleet "/status/" device: 64-byte names fit */
#define BAUD 115200u

static uint8_t rx_buf[FEDTINY_MODEM_FRAME_BYTES(FEDTINY_MODEM_RECEIVE_BODY(TOPIC_MAX, CHUNK))];
static uint8_t tx_buf[FEDTINY_MODEM_FRAME_BYTES(FEDTINY_MODEM_PUBLISH_BODY(TOPIC_MAX, CHUNK))];
static fedtiny_modem_link link;
static fedtiny_uart uart;

static char cmdline[200];
static const char *fleet = "", *device = "";
static char up_topic[TOPIC_MAX + 1], down_topic[TOPIC_MAX + 1], status_topic[TOPIC_MAX + 1];
static uint32_t echoes;
static int stopped;

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

static void uart_write(void *context, const uint8_t *data, size_t n)
{
    fedtiny_uart_write((fedtiny_uart *)context, data, n);
}

static int will(void *context, uint32_t now_ms, uint8_t *out, size_t cap, size_t *len)
{
    int n = snprintf((char *)out, cap, "offline %s", device);
    (void)context;
    (void)now_ms;
    *len = (size_t)n;
    return n < 0 || (size_t)n >= cap;
}

static void publish(const uint8_t *payload, size_t n)
{
    int status = fedtiny_modem_link_publish(&link, up_topic, 0u, payload, n);
    if (status != 0) {
        printf("link: publish failed %d\n", status);
    }
}

static void up(void *context, uint32_t now_ms)
{
    uint8_t *payload = fedtiny_modem_publish_payload(tx_buf, strlen(up_topic)); /* nothing copied */
    int head = snprintf((char *)payload, CHUNK, "hello %s ", device);
    uint32_t i;
    (void)context;
    printf("link: up after %lu connects at %lu ms\n", (unsigned long)link.connects, (unsigned long)now_ms);
    for (i = (uint32_t)head; i < CHUNK; i++) {
        payload[i] = (uint8_t)(i * 31u + 7u);
    }
    publish(payload, CHUNK);
    printf("link: published hello %u bytes\n", (unsigned)CHUNK);
}

static void message(void *context, const uint8_t *topic, uint32_t topic_len, uint8_t *payload, uint32_t len,
                    uint32_t now_ms)
{
    (void)context;
    (void)topic;
    (void)topic_len;
    (void)now_ms;
    if (len == 4u && memcmp(payload, "exit", 4u) == 0) {
        printf("link: exit after %lu echoes\n", (unsigned long)echoes);
        stopped = 1;
        return;
    }
    publish(payload, len);
    echoes++;
    printf("link: echo %lu bytes\n", (unsigned long)len);
}

static void observe(void *context, const fedtiny_modem_event *ev)
{
    (void)context;
    if (ev->malformed) {
        printf("link: malformed frame type 0x%02x\n", ev->type);
    } else if (ev->type == FEDTINY_MODEM_INFO) {
        printf("link: modem version %u max_payload %u\n", ev->code, ev->max_payload);
    } else if (ev->type == FEDTINY_MODEM_CONNECTED) {
        printf("link: connected session_present %u\n", ev->code);
    } else if (ev->type == FEDTINY_MODEM_DISCONNECTED) {
        printf("link: disconnected reason %u\n", ev->code);
    } else if (ev->type == FEDTINY_MODEM_ERROR) {
        printf("link: error %u for ref %u\n", ev->code, ev->ref);
    } else if (ev->type == FEDTINY_MODEM_DROPPED) {
        char note[32];
        int n = snprintf(note, sizeof note, "dropped %lu", (unsigned long)ev->length);
        publish((const uint8_t *)note, (size_t)n);
        printf("link: %s\n", note);
    }
}

static int parse_cmdline(void)
{
    char *words[3] = {0, 0, 0}, *p = cmdline;
    int n = 0;
    if (semihost_cmdline(cmdline, sizeof cmdline) != 0) {
        return -1;
    }
    while (*p != '\0') {
        if (*p == ' ') {
            *p++ = '\0';
            continue;
        }
        if (n == 3) {
            return -1;
        }
        words[n++] = p;
        while (*p != '\0' && *p != ' ') {
            p++;
        }
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
    fedtiny_modem_link_config config;
    fedtiny_modem_link_callbacks callbacks = {&uart, uart_write, will, up, message, observe};
    uint32_t overruns = 0;
    if (parse_cmdline() != 0) {
        printf("link: usage: firmware FLEET DEVICE (semihosting arguments)\n");
        return 2;
    }
    snprintf(up_topic, sizeof up_topic, "fedtiny/%s/up/%s", fleet, device);
    snprintf(down_topic, sizeof down_topic, "fedtiny/%s/down/%s", fleet, device);
    snprintf(status_topic, sizeof status_topic, "fedtiny/%s/status/%s", fleet, device);
    memset(&config, 0, sizeof config);
    config.client_id = device;
    config.will_topic = status_topic;
    config.will_retain = 1u;
    config.keepalive_s = 30u;
    config.subscriptions[0] = down_topic;
    config.n_subscriptions = 1u;
    config.min_payload = CHUNK;
    config.hello_ms = 1000u;
    config.retry_ms = 500u;
    config.connect_timeout_ms = 0u; /* the bridge tries until the broker answers */
    config.idle_ms = 1000u;
    config.rx = rx_buf;
    config.rx_cap = sizeof rx_buf;
    config.tx = tx_buf;
    config.tx_cap = sizeof tx_buf;
    fedtiny_uart_init(&uart, FEDTINY_MPS2_UART1, FEDTINY_MPS2_SYSCLK_HZ, BAUD);
    if (fedtiny_modem_link_init(&link, &config, &callbacks, fedtiny_clock_ms()) != 0) {
        printf("link: bad link configuration\n");
        return 2;
    }
    printf("link: boot %s %s rx %u tx %u bytes\n", fleet, device, (unsigned)sizeof rx_buf, (unsigned)sizeof tx_buf);
    while (!stopped && link.state != FEDTINY_MODEM_LINK_FAILED) {
        uint8_t in[64];
        size_t n = fedtiny_uart_read(&uart, in, sizeof in, &overruns);
        fedtiny_modem_link_poll(&link, in, n, fedtiny_clock_ms());
    }
    if (link.state == FEDTINY_MODEM_LINK_FAILED) {
        printf("link: the modem cannot carry this node (max_payload %u, chunk %u)\n", link.max_payload,
               (unsigned)CHUNK);
        return 1;
    }
    printf("link: stopped; frames abandoned %lu, bytes discarded %lu, overruns %lu\n",
           (unsigned long)link.rx.abandoned, (unsigned long)link.rx.discarded, (unsigned long)overruns);
    return 0;
}
