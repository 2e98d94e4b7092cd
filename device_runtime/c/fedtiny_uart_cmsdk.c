/* Polled CMSDK APB UART driver: see fedtiny_uart_cmsdk.h. Registers (ARM DDI 0479, CMSDK APB UART): */
#include "fedtiny_uart_cmsdk.h"

#define UART_DATA 0x00u
#define UART_STATE 0x04u /* bit 0 TX buffer full, bit 1 RX buffer full, bit 2 TX overrun, bit 3 RX overrun */
#define UART_CTRL 0x08u  /* bit 0 TX enable, bit 1 RX enable, bits 2-5 interrupt enables */
#define UART_BAUDDIV 0x10u

#define STATE_TX_FULL 0x1u
#define STATE_RX_FULL 0x2u
#define STATE_RX_OVERRUN 0x8u
#define CTRL_TX_ENABLE 0x1u
#define CTRL_RX_ENABLE 0x2u
#define BAUDDIV_MIN 16u

static volatile uint32_t *reg(const fedtiny_uart *uart, uint32_t offset)
{
    return (volatile uint32_t *)(uart->base + offset);
}

void fedtiny_uart_init(fedtiny_uart *uart, uintptr_t base, uint32_t clock_hz, uint32_t baud)
{
    uint32_t div = baud ? clock_hz / baud : 0u;
    uart->base = base;
    *reg(uart, UART_CTRL) = 0u;
    *reg(uart, UART_BAUDDIV) = div < BAUDDIV_MIN ? BAUDDIV_MIN : div;
    *reg(uart, UART_STATE) = STATE_RX_OVERRUN | 0x4u; /* write 1 to clear both overrun flags */
    *reg(uart, UART_CTRL) = CTRL_TX_ENABLE | CTRL_RX_ENABLE;
}

size_t fedtiny_uart_read(fedtiny_uart *uart, uint8_t *out, size_t cap, uint32_t *overruns)
{
    size_t n = 0;
    uint32_t state = *reg(uart, UART_STATE);
    if (state & STATE_RX_OVERRUN) {
        *reg(uart, UART_STATE) = STATE_RX_OVERRUN;
        if (overruns != NULL) {
            (*overruns)++;
        }
    }
    while (n < cap && (*reg(uart, UART_STATE) & STATE_RX_FULL)) {
        out[n++] = (uint8_t)*reg(uart, UART_DATA);
    }
    return n;
}

void fedtiny_uart_write(fedtiny_uart *uart, const uint8_t *data, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        while (*reg(uart, UART_STATE) & STATE_TX_FULL) {
        }
        *reg(uart, UART_DATA) = data[i];
    }
}
