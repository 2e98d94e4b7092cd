/* What firmware_node_replay.c replays: node_replay.c (fedtiny_device.cnode.render_replay) defines these. */
#ifndef FIRMWARE_NODE_REPLAY_H
#define FIRMWARE_NODE_REPLAY_H

#include <stdint.h>

#include "fedtiny_node.h"

enum { REPLAY_CONNECT = 0, REPLAY_RECEIVE = 1, REPLAY_COMPLETE = 2, REPLAY_TICK = 3 };

/* One call on the node, as a line of a conformance transcript, and what it must do. */
typedef struct {
    uint8_t op;
    int64_t now_ms;
    const char *topic;        /* receive */
    const uint8_t *frame;     /* receive */
    uint32_t frame_len;
    const char *reason;       /* receive: the refusal reason, NULL if accepted */
    uint8_t has_job;          /* receive: a job is returned ... */
    fedtiny_node_job job;     /* ... this one */
    uint32_t job_round;       /* complete: the round of the job to complete (one receive returned) */
    const uint8_t *trained;   /* complete: the trained state, in the state layout */
    fedtiny_node_result result;
    uint32_t n_out;           /* the publishes: how many, and their FNV-1a 32 over topic | retain | frame */
    uint32_t out_fnv;
    uint32_t n_persist;       /* how often the Python session persisted in this call */
} replay_op;

typedef struct {
    const char *name;
    const replay_op *ops;
    uint32_t n_ops;
} replay_transcript;

extern const char replay_fleet[], replay_device[];
extern const uint32_t replay_fleet_id, replay_device_id, replay_chunk_size;
extern const int64_t replay_ack_timeout_ms;
extern const uint8_t replay_identity[FEDTINY_ENV_IDENTITY_BYTES], replay_coordinator[FEDTINY_ENV_PUBLIC_BYTES];
extern const uint8_t replay_initial_state[]; /* the plan's initial state, in the state layout */
extern const uint32_t replay_state_bytes, replay_carry_bytes, replay_upload_bytes, replay_reassembly_bytes,
    replay_bitmap_bytes;
extern const replay_transcript replay_transcripts[];
extern const uint32_t replay_n_transcripts;

#endif
