/* Bare-metal firmware for Cortex-M (QEMU mps2-an386) that replays the conformance transcripts against the C node
 * (fedtiny_node.c): the device session's executable specification, checked on the target itself.
 *
 * node_replay.c (written by fedtiny_device.cnode.render_replay) holds the node's identity and names and, per
 * transcript, every call with its expected result: how many frames it publishes and their FNV-1a 32 (over each
 * frame's topic, retain byte and bytes, in order), the refusal reason or the job it returns. A refused frame
 * must leave the persisted bytes (state struct, global state, carry, upload) as they were. Each call runs between
 * the instruction-count markers (tools/insn_count.c counts each) with the stack painted first.
 *
 * It prints "op TRANSCRIPT INDEX KIND ok|FAIL stack BYTES" per call and "replay PASS|FAIL", and exits 0 if every
 * call matched. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fedtiny_boot.h"
#include "firmware_node_replay.h"

extern const fedtiny_node_plan fedtiny_node_plan_data;
/* The buffers, large enough for the conformance plan (node_replay.c states its sizes, checked first). */
#define REPLAY_STATE_MAX 4096u
#define REPLAY_CARRY_MAX 8192u
#define REPLAY_UPLOAD_MAX 12288u
#define REPLAY_REASSEMBLY_MAX 24576u
#define REPLAY_BITMAP_MAX 3076u
#define REPLAY_FRAME_MAX 4096u
#define REPLAY_JOBS 2u

static uint8_t global_state[REPLAY_STATE_MAX], carry[REPLAY_CARRY_MAX], upload[REPLAY_UPLOAD_MAX];
static uint8_t reassembly[REPLAY_REASSEMBLY_MAX], bitmap[REPLAY_BITMAP_MAX], frame[REPLAY_FRAME_MAX];
static uint8_t incoming[REPLAY_FRAME_MAX + 256u];
static uint8_t bases[REPLAY_JOBS][REPLAY_STATE_MAX]; /* the global state each job was issued from */
static fedtiny_node_job jobs[REPLAY_JOBS];          /* the last job returned for each of two rounds */
static fedtiny_node node;

static uint32_t fnv1a(uint32_t h, const uint8_t *bytes, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        h = (h ^ bytes[i]) * 16777619u;
    }
    return h;
}

static uint32_t out_count, out_fnv, persist_count;

static int on_publish(void *context, fedtiny_node_topic kind, const char *topic, const uint8_t *data, size_t length,
                      int retain)
{
    uint8_t r = (uint8_t)(retain != 0);
    (void)context;
    (void)kind;
    out_fnv = fnv1a(out_fnv, (const uint8_t *)topic, strlen(topic));
    out_fnv = fnv1a(out_fnv, &r, 1u);
    out_fnv = fnv1a(out_fnv, data, length);
    out_count++;
    return 0;
}

/* FNV-1a 32 of everything persist hands over. */
static uint32_t persisted_digest(const fedtiny_node_persisted *p)
{
    uint32_t h = fnv1a(2166136261u, (const uint8_t *)p->state, sizeof *p->state);
    h = fnv1a(h, p->global_state, p->global_state_bytes);
    h = fnv1a(h, p->carry, p->carry_bytes);
    return fnv1a(h, p->upload, p->state->upload_len);
}

static int on_persist(void *context, const fedtiny_node_persisted *persisted)
{
    (void)context;
    (void)persisted;
    persist_count++;
    return 0;
}

static uint32_t current_digest(void)
{
    fedtiny_node_persisted p;
    p.state = &node.state;
    p.global_state = global_state;
    p.global_state_bytes = replay_state_bytes;
    p.carry = carry;
    p.carry_bytes = replay_carry_bytes;
    p.upload = upload;
    return persisted_digest(&p);
}

static int start_node(void)
{
    fedtiny_node_config c;
    fedtiny_node_state state;
    memset(&c, 0, sizeof c);
    c.plan = &fedtiny_node_plan_data;
    c.fleet = replay_fleet;
    c.device = replay_device;
    c.fleet_id = replay_fleet_id;
    c.device_id = replay_device_id;
    c.identity = replay_identity;
    c.coordinator_public = replay_coordinator;
    c.chunk_size = replay_chunk_size;
    c.ack_timeout_ms = replay_ack_timeout_ms;
    c.started_ms = 0;
    c.global_state = global_state;
    c.carry = carry;
    c.upload = upload;
    c.reassembly = reassembly;
    c.bitmap = bitmap;
    c.frame = frame;
    c.capacity.global_state = sizeof global_state;
    c.capacity.carry = sizeof carry;
    c.capacity.upload = sizeof upload;
    c.capacity.reassembly = sizeof reassembly;
    c.capacity.bitmap = sizeof bitmap;
    c.capacity.frame = sizeof frame;
    c.publish = on_publish;
    c.persist = on_persist;
    memset(carry, 0, sizeof carry);
    memcpy(global_state, replay_initial_state, replay_state_bytes);
    memset(jobs, 0, sizeof jobs);
    fedtiny_node_state_fresh(&state);
    return fedtiny_node_init(&node, &c, &state);
}

static int same_job(const fedtiny_node_job *a, const fedtiny_node_job *b)
{
    return a->round == b->round && a->model_version == b->model_version && a->epochs == b->epochs &&
           a->steps == b->steps && a->uplink_keep_pct == b->uplink_keep_pct && a->clip_norm == b->clip_norm &&
           a->noise_sigma == b->noise_sigma && a->masked == b->masked;
}

/* The job slot of a round: its own, else the older one (rounds start at 1; a free slot holds round 0). */
static uint32_t slot_of(uint32_t round)
{
    if (jobs[0].round == round || jobs[1].round == round) {
        return jobs[0].round == round ? 0u : 1u;
    }
    return jobs[0].round <= jobs[1].round ? 0u : 1u;
}

/* One call; 1 if it did what the transcript says. */
static int run_op(const replay_op *op, uint32_t *stack)
{
    uint8_t base; /* calls are measured below this frame */
    fedtiny_node_job job = {0};
    uint32_t before = 0, slot = slot_of(op->job_round);
    int status, ok;
    out_count = persist_count = 0u;
    out_fnv = 2166136261u;
    *stack = 0u;
    if (op->op == REPLAY_RECEIVE) {
        if (op->frame_len > sizeof incoming) {
            return 0;
        }
        memcpy(incoming, op->frame, op->frame_len);
        before = current_digest();
    } else if (op->op == REPLAY_COMPLETE && jobs[slot].round != op->job_round) {
        return 0; /* no job of that round was returned */
    }
    fedtiny_stack_paint();
    fedtiny_mark_begin();
    switch (op->op) {
    case REPLAY_CONNECT: status = fedtiny_node_on_connect(&node, op->now_ms); break;
    case REPLAY_TICK: status = fedtiny_node_tick(&node, op->now_ms); break;
    case REPLAY_RECEIVE:
        status = fedtiny_node_receive(&node, op->topic, incoming, op->frame_len, op->now_ms, &job);
        break;
    default:
        status = fedtiny_node_complete(&node, &jobs[slot], bases[slot], op->trained, &op->result, op->now_ms);
        break;
    }
    fedtiny_mark_end();
    *stack = fedtiny_stack_peak(&base);
    if (op->op != REPLAY_RECEIVE) {
        ok = status == FEDTINY_NODE_OK;
    } else if (op->reason != NULL) {
        ok = status < 0 && strcmp(fedtiny_node_reason(status), op->reason) == 0 && current_digest() == before;
    } else {
        ok = status >= 0 && (status == FEDTINY_NODE_JOB) == op->has_job && (!op->has_job || same_job(&job, &op->job));
        if (ok && status == FEDTINY_NODE_JOB) { /* keep the job and its base, as device.TrainJob does */
            slot = slot_of(job.round);
            jobs[slot] = job;
            memcpy(bases[slot], global_state, replay_state_bytes);
        }
    }
    return ok && out_count == op->n_out && out_fnv == op->out_fnv && persist_count == op->n_persist;
}

static const char *const KINDS[] = {"connect", "receive", "complete", "tick"};

int main(void)
{
    uint32_t t, i, stack, failed = 0;
    if (replay_state_bytes > REPLAY_STATE_MAX || replay_carry_bytes > REPLAY_CARRY_MAX ||
        replay_upload_bytes > REPLAY_UPLOAD_MAX || replay_reassembly_bytes > REPLAY_REASSEMBLY_MAX ||
        replay_bitmap_bytes > REPLAY_BITMAP_MAX || replay_chunk_size > REPLAY_FRAME_MAX) {
        printf("replay FAIL: the plan needs larger buffers\n");
        return 1;
    }
    for (t = 0; t < replay_n_transcripts; t++) {
        const replay_transcript *tr = &replay_transcripts[t];
        if (start_node() != FEDTINY_NODE_OK) {
            printf("replay FAIL: init\n");
            return 1;
        }
        for (i = 0; i < tr->n_ops; i++) {
            int ok = run_op(&tr->ops[i], &stack);
            printf("op %s %lu %s %s stack %lu\n", tr->name, (unsigned long)i, KINDS[tr->ops[i].op],
                   ok ? "ok" : "FAIL", (unsigned long)stack);
            failed += !ok;
        }
    }
    printf("replay %s\n", failed ? "FAIL" : "PASS");
    return failed != 0;
}
