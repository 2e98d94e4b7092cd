/* libFuzzer harness: TASK body decoding and its settings (fedtiny_wire_decode_task, fedtiny_wire_task_settings)
 * on one body. Aborts on a status without a reason token or a config pointer outside the body. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fedtiny_wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *body = (uint8_t *)malloc(size ? size : 1u);
    fedtiny_wire_task task;
    fedtiny_wire_settings settings;
    int status;

    memcpy(body, data, size);
    status = fedtiny_wire_decode_task(body, (uint32_t)size, &task);
    if (strcmp(fedtiny_wire_reason(status), "unknown") == 0) {
        abort();
    }
    if (status == FEDTINY_WIRE_OK) {
        if (task.config_len > FEDTINY_WIRE_TASK_MAX_CONFIG ||
            (task.config_len > 0u && (task.config < body || task.config + task.config_len > body + size))) {
            abort();
        }
        status = fedtiny_wire_task_settings(&task, &settings);
        if (strcmp(fedtiny_wire_reason(status), "unknown") == 0 ||
            (status == FEDTINY_WIRE_OK && (settings.uplink_keep_pct < 1u || settings.uplink_keep_pct > 100u))) {
            abort();
        }
    }
    free(body);
    return 0;
}
