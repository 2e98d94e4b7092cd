/* libFuzzer harness: the node's chunk reassembler (fedtiny_chunk.c) on a sequence of frames (fuzz_records.h:
 * tag = source in bit 0, seconds to wait before the frame in bits 1-7, so transfers also expire), each also
 * parsed alone. The reassembler is the node's shape (two transfers, ttl 600 s) with a small budget so that
 * budget refusals happen; its data and bitmap buffers are separate allocations of exactly the documented sizes.
 * Aborts on a broken promise of fedtiny_chunk.h: a status without a reason, more than two open transfers or
 * more reserved bytes than the budget, a refusal that changes a transfer (beyond expiry, done first), a payload
 * outside the data buffer and the frame, a completed payload of another length than its chunks declared. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fedtiny_chunk.h"
#include "fuzz_records.h"

#define BUDGET 4096u
#define TTL_MS 600000

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_records in = {data, size};
    fedtiny_reassembler r;
    uint8_t *buffer = (uint8_t *)malloc(BUDGET);
    uint8_t *bitmap = (uint8_t *)malloc(FEDTINY_CHUNK_BITMAP_BYTES(BUDGET));
    uint8_t *frame = NULL, tag;
    const uint8_t *bytes;
    size_t length;
    int64_t now = 0;

    fedtiny_reassembler_init(&r, buffer, BUDGET, bitmap, TTL_MS);
    while (fuzz_record(&in, &tag, &bytes, &length)) {
        fedtiny_chunk chunk;
        fedtiny_chunk_result result;
        fedtiny_reassembler expired;
        int parsed, status;

        free(frame); /* the previous frame: a one-chunk payload lives in it only until the next accept */
        frame = (uint8_t *)malloc(length ? length : 1u);
        memcpy(frame, bytes, length);
        now += (int64_t)(tag >> 1) * 10000;
        parsed = fedtiny_chunk_parse(frame, length, &chunk);
        if (strcmp(fedtiny_chunk_reason(parsed), "unknown") == 0 || memcmp(frame, bytes, length) != 0) {
            abort();
        }
        if (parsed == FEDTINY_CHUNK_OK && (chunk.data < frame || chunk.data + chunk.data_len > frame + length ||
                                           chunk.index >= chunk.count)) {
            abort();
        }
        fedtiny_reassembler_expire(&r, now);
        expired = r;
        status = fedtiny_reassembler_accept(&r, frame, length, now, tag & 1u, &result);
        if (strcmp(fedtiny_chunk_reason(status), "unknown") == 0 || (parsed != FEDTINY_CHUNK_OK && status == 0)) {
            abort();
        }
        if (status != FEDTINY_CHUNK_OK && memcmp(&expired, &r, sizeof r) != 0) {
            abort();
        }
        if (fedtiny_reassembler_open(&r) > FEDTINY_CHUNK_MAX_TRANSFERS || fedtiny_reassembler_reserved(&r) > BUDGET) {
            abort();
        }
        if (status == FEDTINY_CHUNK_OK && result.payload != NULL) {
            int in_buffer = result.payload >= buffer && result.payload + result.payload_len <= buffer + BUDGET;
            int in_frame = result.payload >= frame && result.payload + result.payload_len <= frame + length;
            if ((!in_buffer && !in_frame) || result.payload_len != chunk.total_len) {
                abort();
            }
            if (result.payload_len > 0u) {
                volatile uint8_t sink = result.payload[0] ^ result.payload[result.payload_len - 1u];
                (void)sink;
            }
        }
    }
    free(frame);
    free(buffer);
    free(bitmap);
    return 0;
}
