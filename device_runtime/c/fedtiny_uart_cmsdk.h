/* A polled driver for the ARM CMSDK APB UART (the five UARTs of the MPS2 boards; QEMU's mps2-an386 maps its
 * n-th `-serial` to UART n). The node talks to its modem on UART1: UART0 is the board's console, which QEMU's
 * -nographic puts on stdio beside the semihosting output.
 *
 * The UART holds one received byte. Reading is non-blocking: poll it often enough, or, on a real board, take
 * bytes in the RX interrupt into a ring buffer of at least one frame (docs/node.md, flow control). Under QEMU
 * nothing is lost either way: QEMU reads the next byte from its chardev only once the guest took the last one.
 * Writing blocks until every byte is in the transmitter. */
#ifndef FEDTINY_UART_CMSDK_H
#define FEDTINY_UART_CMSDK_H

#include <stddef.h>
#include <stdint.h>

#define FEDTINY_MPS2_UART0 0x40004000u
#define FEDTINY_MPS2_UART1 0x40005000u
#define FEDTINY_MPS2_SYSCLK_HZ 25000000u

typedef struct {
    uintptr_t base;
} fedtiny_uart;

/* Enable transmitter and receiver at `baud` from a peripheral clock of clock_hz, interrupts off. */
void fedtiny_uart_init(fedtiny_uart *uart, uintptr_t base, uint32_t clock_hz, uint32_t baud);

/* Up to `cap` bytes already received (without waiting); how many. Clears a receive overrun (a byte lost because
 * the last was not read in time) and counts it in *overruns when that is not NULL. */
size_t fedtiny_uart_read(fedtiny_uart *uart, uint8_t *out, size_t cap, uint32_t *overruns);

/* Every byte, waiting while the transmit buffer is full. */
void fedtiny_uart_write(fedtiny_uart *uart, const uint8_t *data, size_t n);

#endif
