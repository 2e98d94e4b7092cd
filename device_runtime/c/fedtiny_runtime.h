/* A tiny executor: walks a const table of ops over one static arena.
 *
 * Each op is a kind, a pointer to its kind's const params struct, and the arena offsets of its operands
 * (inputs first, then outputs). The code generator (fedtiny/codegen.py) emits the table, the params and the
 * arena; it picks the concrete kernel per op (reference conv, fast 1x1, fast depthwise), so nothing is decided
 * at run time but which function to call. New op kinds (training) slot in as a new enum value plus a row in
 * the kind table in fedtiny_runtime.c.
 */
#ifndef FEDTINY_RUNTIME_H
#define FEDTINY_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#include "fedtiny_kernels.h"

typedef enum {
    FEDTINY_OP_CONV2D = 0,           /* fedtiny_conv2d_params, reference kernel */
    FEDTINY_OP_CONV2D_1X1 = 1,       /* fedtiny_conv2d_params, fast pointwise kernel */
    FEDTINY_OP_CONV2D_DEPTHWISE = 2, /* fedtiny_conv2d_params, fast depthwise kernel */
    FEDTINY_OP_ADD = 3,              /* fedtiny_add_params */
    FEDTINY_OP_AVGPOOL2D = 4,        /* fedtiny_pool2d_params */
    FEDTINY_OP_MAXPOOL2D = 5,        /* fedtiny_pool2d_params */
    FEDTINY_OP_CLAMP = 6,            /* fedtiny_clamp_params */
    FEDTINY_OP_KIND_COUNT
} fedtiny_op_kind;                   /* reshape has no kind: its output aliases its input's bytes */

#define FEDTINY_MAX_OPERANDS 6

typedef struct {
    uint16_t kind;                           /* fedtiny_op_kind */
    uint8_t n_inputs, n_outputs;
    uint32_t offset[FEDTINY_MAX_OPERANDS];   /* arena byte offsets: inputs, then outputs */
    const void *params;                      /* the kind's params struct */
} fedtiny_op;

typedef struct {
    const fedtiny_op *ops;
    uint32_t n_ops;
    uint8_t *arena;
    uint32_t arena_bytes;
    void *scratch;
    uint32_t scratch_bytes;
    uint32_t input_offset, input_bytes;
    uint32_t output_offset, output_bytes;
} fedtiny_graph;

/* Scratch bytes op needs (0 if none), from its kernel's _scratch_bytes() companion. */
size_t fedtiny_op_scratch_bytes(const fedtiny_op *op);

/* Check every op kind is known and the scratch buffer is large enough. */
fedtiny_status fedtiny_graph_check(const fedtiny_graph *g);

/* Run every op in order over the arena; the input must already be at input_offset. */
fedtiny_status fedtiny_invoke(const fedtiny_graph *g);

/* Copy one sample in, invoke, copy the output out. */
fedtiny_status fedtiny_run(const fedtiny_graph *g, const int8_t *input, int8_t *output);

#endif /* FEDTINY_RUNTIME_H */
