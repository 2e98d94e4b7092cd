/* libFuzzer harness: ACK body decoding (fedtiny_wire_decode_ack) on one body. Aborts on a status without a
 * reason token, more missing chunks than the limit, or a decoded ACK that does not encode back to the body. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fedtiny_wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *body = (uint8_t *)malloc(size ? size : 1u);
    uint8_t again[FEDTINY_WIRE_ACK_MAX_BYTES];
    size_t again_len = 0;
    fedtiny_wire_ack ack;
    int status;

    memcpy(body, data, size);
    status = fedtiny_wire_decode_ack(body, (uint32_t)size, &ack);
    if (strcmp(fedtiny_wire_reason(status), "unknown") == 0) {
        abort();
    }
    if (status == FEDTINY_WIRE_OK) {
        if (ack.n_missing > FEDTINY_WIRE_ACK_MAX_MISSING ||
            fedtiny_wire_encode_ack(&ack, again, sizeof again, &again_len) != FEDTINY_WIRE_OK ||
            again_len != size || memcmp(again, body, size) != 0) {
            abort();
        }
    }
    free(body);
    return 0;
}
