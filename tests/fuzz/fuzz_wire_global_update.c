/* libFuzzer harness: GLOBAL_UPDATE checking and applying (fedtiny_wire_check_global_update,
 * fedtiny_wire_apply_global_update) on the conformance plan (fuzz_plan.c, from codegen.node_plan_source).
 * Input: one selector byte, then the body. Selector bit 0 set: the node holds the body's own base version (so
 * deltas get applied), else version 7. The state starts from a fixed pattern each time.
 * Aborts on a status without a reason token, on an apply that succeeds where the check refuses the body, and on
 * an apply that fails but changed the state (it promises to be atomic). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fedtiny_node.h"

extern const fedtiny_node_plan fuzz_plan;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const fedtiny_wire_plan *plan = fuzz_plan.wire;
    uint32_t state_bytes = fedtiny_wire_state_bytes(plan), held = 7u, i;
    uint8_t *state, *before, *body;
    size_t body_len;
    int checked, applied;

    if (size < 1u) {
        return 0;
    }
    body_len = size - 1u;
    body = (uint8_t *)malloc(body_len ? body_len : 1u);
    memcpy(body, data + 1, body_len);
    if ((data[0] & 1u) && body_len >= 4u) {
        held = (uint32_t)body[0] | ((uint32_t)body[1] << 8) | ((uint32_t)body[2] << 16) | ((uint32_t)body[3] << 24);
    }
    state = (uint8_t *)malloc(state_bytes);
    before = (uint8_t *)malloc(state_bytes);
    for (i = 0; i < state_bytes; i++) {
        state[i] = (uint8_t)(i * 37u + 11u);
    }
    memcpy(before, state, state_bytes);

    checked = fedtiny_wire_check_global_update(plan, body, (uint32_t)body_len);
    applied = fedtiny_wire_apply_global_update(plan, body, (uint32_t)body_len, held, state);
    if (strcmp(fedtiny_wire_reason(checked), "unknown") == 0 || strcmp(fedtiny_wire_reason(applied), "unknown") == 0) {
        abort();
    }
    if ((checked != FEDTINY_WIRE_OK && applied == FEDTINY_WIRE_OK) ||
        (applied != FEDTINY_WIRE_OK && memcmp(state, before, state_bytes) != 0) ||
        memcmp(body, data + 1, body_len) != 0) {
        abort();
    }
    free(body);
    free(state);
    free(before);
    return 0;
}
