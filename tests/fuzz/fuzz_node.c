/* libFuzzer harness: the node session's receive path (fedtiny_node_receive in fedtiny_node.c: topic check,
 * reassembly, envelope, replay, TASK / GLOBAL_UPDATE / ACK handling) on a sequence of MQTT messages
 * (fuzz_records.h: tag bits 0-1 pick the topic: this node's down, the fleet's bcast, its own up topic, another
 * node's down; bits 2-7 the seconds since the previous message). The node is the conformance fleet's node7
 * (fuzz_keys.h) on the conformance plan (fuzz_plan.c), fresh for every input: started and connected once (keys,
 * JOIN, heartbeat), then restored from that copy with zeroed buffers. A returned job is completed at once with
 * the state unchanged, so ACK and resend paths are reachable. Every buffer is its own allocation of exactly the
 * size fedtiny_node_sizes_of gives.
 * run_c_fuzz.py also builds it "unsigned" (fuzz_crypto_stub.c: every signature verifies, decryption copies), so
 * that mutations get past the coordinator's signature into the session's handling of each body.
 * Aborts on a status without a reason token, a published frame longer than the chunk size, and a refused
 * message that changed anything persisted (the state, the global state, the carry, the upload). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fedtiny_node.h"
#include "fuzz_keys.h"
#include "fuzz_records.h"

#define CHUNK_SIZE 256u

extern const fedtiny_node_plan fuzz_plan;

static fedtiny_node fresh, node;
static fedtiny_node_sizes sizes;
static uint8_t *saved_global, *saved_carry, *saved_upload;

static int publish(void *context, fedtiny_node_topic kind, const char *topic, const uint8_t *frame,
                   size_t length, int retain)
{
    (void)context;
    (void)kind;
    (void)retain;
    if (topic == NULL || length > CHUNK_SIZE || (length > 0u && frame == NULL)) {
        abort();
    }
    return 0;
}

static int persist(void *context, const fedtiny_node_persisted *persisted)
{
    (void)context;
    (void)persisted;
    return 0;
}

static uint8_t *exactly(uint32_t n) { return (uint8_t *)calloc(n ? n : 1u, 1u); }

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fedtiny_node_config config;
    fedtiny_node_state state;
    (void)argc;
    (void)argv;
    fedtiny_node_sizes_of(&fuzz_plan, CHUNK_SIZE, &sizes);
    memset(&config, 0, sizeof config);
    config.plan = &fuzz_plan;
    config.fleet = FUZZ_FLEET;
    config.device = FUZZ_DEVICE;
    config.fleet_id = FUZZ_FLEET_ID;
    config.device_id = FUZZ_DEVICE_ID;
    config.identity = fuzz_identity;
    config.coordinator_public = fuzz_coordinator_public;
    config.chunk_size = CHUNK_SIZE;
    config.ack_timeout_ms = 15000;
    config.started_ms = 0;
    config.global_state = exactly(sizes.global_state);
    config.carry = exactly(sizes.carry);
    config.upload = exactly(sizes.upload);
    config.reassembly = exactly(sizes.reassembly);
    config.bitmap = exactly(sizes.bitmap);
    config.frame = exactly(sizes.frame);
    config.capacity = sizes;
    config.publish = publish;
    config.persist = persist;
    fedtiny_node_state_fresh(&state);
    if (fedtiny_node_init(&fresh, &config, &state) != FEDTINY_NODE_OK ||
        fedtiny_node_on_connect(&fresh, 1000) != FEDTINY_NODE_OK) { /* JOIN and a heartbeat, as the transcripts */
        abort();
    }
    saved_global = exactly(sizes.global_state);
    saved_carry = exactly(sizes.carry);
    saved_upload = exactly(sizes.upload);
    return 0;
}

static void known(int status)
{
    if (strcmp(fedtiny_node_reason(status), "unknown") == 0) {
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_records in = {data, size};
    const uint8_t *bytes;
    size_t length;
    uint8_t tag, *frame = NULL;
    int64_t now = 1000;
    const char *topics[4];

    node = fresh;
    memset(node.config.global_state, 0, sizes.global_state);
    memset(node.config.carry, 0, sizes.carry);
    memset(node.config.upload, 0, sizes.upload);
    topics[0] = fedtiny_node_topic_name(&node, FEDTINY_NODE_TOPIC_DOWN);
    topics[1] = fedtiny_node_topic_name(&node, FEDTINY_NODE_TOPIC_BCAST);
    topics[2] = fedtiny_node_topic_name(&node, FEDTINY_NODE_TOPIC_UP);
    topics[3] = "fedtiny/" FUZZ_FLEET "/down/node8";

    while (fuzz_record(&in, &tag, &bytes, &length)) {
        fedtiny_node_state state_before = node.state;
        fedtiny_node_job job;
        int status;

        free(frame);
        frame = exactly((uint32_t)length);
        memcpy(frame, bytes, length);
        now += (int64_t)(tag >> 2) * 1000;
        memcpy(saved_global, node.config.global_state, sizes.global_state);
        memcpy(saved_carry, node.config.carry, sizes.carry);
        memcpy(saved_upload, node.config.upload, sizes.upload);
        status = fedtiny_node_receive(&node, topics[tag & 3u], frame, length, now, &job);
        known(status);
        if (status < 0 && (memcmp(&state_before, &node.state, sizeof state_before) != 0 ||
                           memcmp(saved_global, node.config.global_state, sizes.global_state) != 0 ||
                           memcmp(saved_carry, node.config.carry, sizes.carry) != 0 ||
                           memcmp(saved_upload, node.config.upload, sizes.upload) != 0)) {
            abort();
        }
        if (status == FEDTINY_NODE_JOB) {
            fedtiny_node_result result = {1u, 0.5f, 0.25f, 0.75f, 0u};
            memcpy(saved_global, node.config.global_state, sizes.global_state); /* the base it trains from */
            known(fedtiny_node_complete(&node, &job, saved_global, node.config.global_state, &result, now));
        }
        known(fedtiny_node_tick(&node, now));
    }
    free(frame);
    return 0;
}
