/* A tiny executor: walks a const table of ops over one static arena.
 *
 * Each op is a kind, a pointer to its kind's const params struct, and the arena offsets of its operands
 * (inputs first, then outputs). The code generator (device_runtime/codegen.py) emits the table, the params
 * and the arena; it picks the concrete kernel per op (reference or fast conv, depthwise, add), so nothing is decided
 * at run time but which function to call. A training plan is the same kind of table: forward ops, then the
 * training steps (kinds 7..), whose params are fedtiny_train_step_params.
 */
#ifndef FEDTINY_RUNTIME_H
#define FEDTINY_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#include "fedtiny_kernels.h"

typedef enum {
    FEDTINY_OP_CONV2D = 0,           /* fedtiny_conv2d_params, reference kernel */
    FEDTINY_OP_CONV2D_FAST = 1,      /* fedtiny_conv2d_params, fast kernel (any conv but depthwise) */
    FEDTINY_OP_CONV2D_DEPTHWISE = 2, /* fedtiny_conv2d_params, fast depthwise kernel */
    FEDTINY_OP_ADD = 3,              /* fedtiny_add_params */
    FEDTINY_OP_AVGPOOL2D = 4,        /* fedtiny_pool2d_params */
    FEDTINY_OP_MAXPOOL2D = 5,        /* fedtiny_pool2d_params */
    FEDTINY_OP_CLAMP = 6,            /* fedtiny_clamp_params */
    /* training steps (a plan's step kinds); operands are arena offsets, gradient exponents live in the
     * graph's exponent table, indexed by the step's fedtiny_train_step_params */
    FEDTINY_OP_MASK_BITS = 7,              /* y -> mask */
    FEDTINY_OP_LOSS_GRAD = 8,              /* logits -> g */
    FEDTINY_OP_GRAD_ADD = 9,               /* parts... -> g */
    FEDTINY_OP_GRAD_MASK = 10,             /* g, y -> g' */
    FEDTINY_OP_GRAD_MASK_BITS = 11,        /* g, mask -> g' */
    FEDTINY_OP_CONV2D_INPUT_GRAD = 12,     /* g_y -> g_x */
    FEDTINY_OP_CONV2D_WEIGHT_UPDATE = 13,  /* g_y, x -> rows (in place) */
    FEDTINY_OP_CONV2D_BIAS_UPDATE = 14,    /* g_y -> bias (in place) */
    FEDTINY_OP_AVGPOOL2D_INPUT_GRAD = 15,  /* g_y -> g_x */
    FEDTINY_OP_MAXPOOL2D_INPUT_GRAD = 16,  /* g_y, x -> g_x */
    FEDTINY_OP_MSE_GRAD = 17,              /* y -> g (the target comes from the train state) */
    FEDTINY_OP_LUT = 18,                   /* fedtiny_lut_params: x -> y (a forward op) */
    FEDTINY_OP_LUT_INPUT_GRAD = 19,        /* g_y, x -> g_x */
    FEDTINY_OP_CAT = 20,                   /* fedtiny_cat_params: x1, ..., xn -> y (a forward op) */
    FEDTINY_OP_MUL = 21,                   /* fedtiny_mul_params: a, b -> y (a forward op) */
    FEDTINY_OP_CAT_INPUT_GRAD = 22,        /* g_y -> g_x (one input's part) */
    FEDTINY_OP_MUL_INPUT_GRAD = 23,        /* g_y, the other input -> g_x */
    FEDTINY_OP_CONV2D_WEIGHT_UPDATE_FAST = 24, /* as CONV2D_WEIGHT_UPDATE, fast kernel (fedtiny_kernels_bwd_fast.c) */
    FEDTINY_OP_ADD_FAST = 25,              /* fedtiny_add_params, fast kernel (fedtiny_kernels_fwd_fast.c) */
    FEDTINY_OP_CONV2D_INPUT_GRAD_DEPTHWISE = 26, /* as CONV2D_INPUT_GRAD for a depthwise conv (..._bwd_fast.c) */
    FEDTINY_OP_CONV2D_INPUT_GRAD_POINTWISE = 27, /* as CONV2D_INPUT_GRAD for a 1 x 1 conv (..._bwd_fast.c) */
    FEDTINY_OP_CONV2D_BIAS_UPDATE_FAST = 28, /* as CONV2D_BIAS_UPDATE, fast kernel (..._bwd_fast.c) */
    FEDTINY_OP_KIND_COUNT
} fedtiny_op_kind;                   /* reshape has no kind: its output aliases its input's bytes */

#define FEDTINY_MAX_OPERANDS 6

typedef struct {
    uint16_t kind;                           /* fedtiny_op_kind */
    uint8_t n_inputs, n_outputs;
    uint32_t offset[FEDTINY_MAX_OPERANDS];   /* arena byte offsets: inputs, then outputs */
    const void *params;                      /* the kind's params struct */
} fedtiny_op;

/* A training step: the kernel's params plus where its gradient exponents sit in the exponent table. */
typedef struct {
    const void *kernel;                          /* the kernel's params struct (NULL for grad_add) */
    int32_t size;                                /* elements (grad_add, grad masks) */
    uint8_t grad_in[FEDTINY_MAX_OPERANDS - 1];   /* exponent index of each input gradient */
    uint8_t grad_out;                            /* exponent index of the output gradient */
} fedtiny_train_step_params;

/* What a node keeps between steps besides the trainable rows (which live in the arena). */
typedef struct {
    uint64_t rng_counter; /* SplitMix64 counter: (seed mod 2^24) << 40 at start */
    int32_t label;        /* the current sample's class */
    int32_t label_q15;    /* the label's Q15 probability after the last step (for the loss) */
    const int8_t *target; /* MSE: the current sample's int8 target (K values in the output's quantization) */
    int64_t squared_error; /* MSE: sum of (y - t)^2 of the last step (for the loss) */
} fedtiny_train_state;

typedef struct {
    const fedtiny_op *ops;
    uint32_t n_ops;
    uint8_t *arena;
    uint32_t arena_bytes;
    void *scratch;
    uint32_t scratch_bytes;
    uint32_t input_offset, input_bytes;
    uint32_t output_offset, output_bytes;
    int32_t *exponents;          /* training: one exponent per gradient buffer (NULL for inference) */
    uint32_t n_exponents;
    fedtiny_train_state *state;  /* training: random counter and label (NULL for inference) */
} fedtiny_graph;

/* Scratch bytes op needs (0 if none), from its kernel's _scratch_bytes() companion. */
size_t fedtiny_op_scratch_bytes(const fedtiny_op *op);

/* Check every op kind is known and the scratch buffer is large enough. */
fedtiny_status fedtiny_graph_check(const fedtiny_graph *g);

/* Run every op in order over the arena; the input must already be at input_offset. */
fedtiny_status fedtiny_invoke(const fedtiny_graph *g);

/* Copy one sample in, invoke, copy the output out. */
fedtiny_status fedtiny_run(const fedtiny_graph *g, const int8_t *input, int8_t *output);

/* One training step of a plan: copy the sample in, set the label, run forward, loss, backward and updates. */
fedtiny_status fedtiny_train_step(const fedtiny_graph *g, const int8_t *input, int32_t label);

/* The same for an MSE plan: the target (output_bytes int8 values) must stay valid for the whole step. */
fedtiny_status fedtiny_train_step_target(const fedtiny_graph *g, const int8_t *input, const int8_t *target);

#endif /* FEDTINY_RUNTIME_H */
