/* libFuzzer harness: fedtiny_env_open (device_runtime/c/fedtiny_envelope.c) on one downlink envelope, with the
 * conformance fleet's node keys (fuzz_keys.h, written by run_c_fuzz.py) and a fresh replay window per input.
 * Besides crashes and sanitizer reports it aborts on a broken promise of fedtiny_envelope.h:
 *   - a refusal changes neither the buffer nor the replay window, and its status has a reason token;
 *   - an accepted envelope's body lies inside it, and the same bytes once committed come back a duplicate. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fedtiny_envelope.h"
#include "fuzz_keys.h"

static fedtiny_env_node node;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    if (fedtiny_env_node_init(&node, FUZZ_FLEET_ID, FUZZ_DEVICE_ID, fuzz_identity, fuzz_coordinator_public) != 0) {
        abort();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fedtiny_env_replay replay, before;
    fedtiny_env_header header;
    uint32_t body_len = 0;
    uint8_t *buf = (uint8_t *)malloc(size ? size : 1u); /* exactly the input: ASan sees any byte past it */
    int status;

    memset(&replay, 0, sizeof replay);
    memcpy(buf, data, size);
    before = replay;
    status = fedtiny_env_open(&node, buf, size, fedtiny_env_replay_check, &replay, &header, &body_len);
    if (strcmp(fedtiny_env_reason(status), "unknown") == 0 || status == FEDTINY_ENV_DUPLICATE) {
        abort(); /* a status without a reason, or a duplicate in an empty window */
    }
    if (status != FEDTINY_ENV_OK) {
        if (memcmp(buf, data, size) != 0 || memcmp(&replay, &before, sizeof replay) != 0) {
            abort();
        }
    } else {
        if ((uint64_t)FEDTINY_ENV_HEADER_BYTES + header.payload_len + FEDTINY_ENV_SIGNATURE_BYTES != size ||
            body_len > header.payload_len) {
            abort();
        }
        fedtiny_env_replay_commit(&replay, &header, buf + FEDTINY_ENV_HEADER_BYTES + header.payload_len);
        memcpy(buf, data, size);
        if (fedtiny_env_open(&node, buf, size, fedtiny_env_replay_check, &replay, &header, &body_len) !=
            FEDTINY_ENV_DUPLICATE) {
            abort();
        }
    }
    free(buf);
    return 0;
}
