/* CRC-32 as zlib.crc32 (ISO-HDLC: reflected 0x04C11DB7, initial and final 0xFFFFFFFF), four bits at a time from a
 * 64-byte table: the integrity check of the modem's UART frames (fedtiny_modem.c) and of the persisted state's
 * records (fedtiny_store.c). Integrity against noise and torn writes, not security: the envelope signs. */
#ifndef FEDTINY_CRC32_H
#define FEDTINY_CRC32_H

#include <stddef.h>
#include <stdint.h>

/* crc = fedtiny_crc32(0, data, n), or continued over more bytes with an earlier result. */
uint32_t fedtiny_crc32(uint32_t crc, const uint8_t *data, size_t length);

#endif
