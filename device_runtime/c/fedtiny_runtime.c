/* The executor (see fedtiny_runtime.h): one row per op kind, each an invoke glue plus its scratch size. */
#include "fedtiny_runtime.h"

#include <string.h>

typedef fedtiny_status (*invoke_fn)(const fedtiny_op *op, const fedtiny_graph *g);
typedef size_t (*scratch_fn)(const void *params);

typedef struct {
    invoke_fn invoke;
    scratch_fn scratch_bytes;
    uint8_t training; /* needs the exponent table and the train state */
} op_kind_row;

#define IN(i) ((const int8_t *)(g->arena + op->offset[(i)]))
#define OUT(i) ((int8_t *)(g->arena + op->offset[op->n_inputs + (i)]))
#define GIN(i) ((const int16_t *)(const void *)(g->arena + op->offset[(i)]))
#define GOUT(i) ((int16_t *)(void *)(g->arena + op->offset[op->n_inputs + (i)]))
#define TP ((const fedtiny_train_step_params *)op->params)
#define E_IN(i) (g->exponents[TP->grad_in[(i)]])
#define E_OUT (&g->exponents[TP->grad_out])

static fedtiny_status invoke_conv2d(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_conv2d((const fedtiny_conv2d_params *)op->params, IN(0), OUT(0), g->scratch);
}

#ifndef FEDTINY_REFERENCE_KERNELS
static fedtiny_status invoke_conv2d_fast(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_conv2d_fast((const fedtiny_conv2d_params *)op->params, IN(0), OUT(0), g->scratch);
}

static fedtiny_status invoke_conv2d_depthwise(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_conv2d_depthwise((const fedtiny_conv2d_params *)op->params, IN(0), OUT(0), g->scratch);
}
#endif

static fedtiny_status invoke_add(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_add((const fedtiny_add_params *)op->params, IN(0), IN(1), OUT(0));
}

#ifndef FEDTINY_REFERENCE_KERNELS
static fedtiny_status invoke_add_fast(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_add_fast((const fedtiny_add_params *)op->params, IN(0), IN(1), OUT(0));
}
#endif

static fedtiny_status invoke_avgpool2d(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_avgpool2d((const fedtiny_pool2d_params *)op->params, IN(0), OUT(0));
}

static fedtiny_status invoke_maxpool2d(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_maxpool2d((const fedtiny_pool2d_params *)op->params, IN(0), OUT(0));
}

static fedtiny_status invoke_clamp(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_clamp((const fedtiny_clamp_params *)op->params, IN(0), OUT(0));
}

static fedtiny_status invoke_lut(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_lut((const fedtiny_lut_params *)op->params, IN(0), OUT(0));
}

static fedtiny_status invoke_cat(const fedtiny_op *op, const fedtiny_graph *g)
{
    const int8_t *x[FEDTINY_CAT_MAX_INPUTS];
    uint32_t i;
    if (op->n_inputs > FEDTINY_CAT_MAX_INPUTS) {
        return FEDTINY_ERR_PARAMS;
    }
    for (i = 0; i < op->n_inputs; i++) {
        x[i] = IN(i);
    }
    return fedtiny_cat((const fedtiny_cat_params *)op->params, x, OUT(0));
}

static fedtiny_status invoke_mul(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_mul((const fedtiny_mul_params *)op->params, IN(0), IN(1), OUT(0));
}

/* ---- training steps ---------------------------------------------------------------------------------------- */

static fedtiny_status invoke_mask_bits(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_activation_mask((const fedtiny_grad_mask_params *)TP->kernel, IN(0), (uint8_t *)OUT(0));
}

static fedtiny_status invoke_loss_grad(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_softmax_cross_entropy_grad((const fedtiny_loss_params *)TP->kernel, IN(0), g->state->label, GOUT(0),
                                              E_OUT, &g->state->label_q15);
}

static fedtiny_status invoke_mse_grad(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_mse_grad((const fedtiny_mse_params *)TP->kernel, IN(0), g->state->target, GOUT(0), E_OUT,
                            &g->state->squared_error);
}

static fedtiny_status invoke_grad_add(const fedtiny_op *op, const fedtiny_graph *g)
{
    const int16_t *parts[FEDTINY_MAX_OPERANDS - 1];
    int32_t exps[FEDTINY_MAX_OPERANDS - 1];
    uint32_t i;
    if (op->n_inputs > FEDTINY_MAX_OPERANDS - 1) {
        return FEDTINY_ERR_PARAMS;
    }
    for (i = 0; i < op->n_inputs; i++) {
        parts[i] = GIN(i);
        exps[i] = E_IN(i);
    }
    return fedtiny_grad_add(TP->size, (int32_t)op->n_inputs, parts, exps, GOUT(0), E_OUT);
}

static fedtiny_status invoke_grad_mask(const fedtiny_op *op, const fedtiny_graph *g)
{
    const int32_t e = E_IN(0);
    *E_OUT = e;
    return fedtiny_grad_mask((const fedtiny_grad_mask_params *)TP->kernel, GIN(0), IN(1), GOUT(0));
}

static fedtiny_status invoke_grad_mask_bits(const fedtiny_op *op, const fedtiny_graph *g)
{
    const int32_t e = E_IN(0);
    *E_OUT = e;
    return fedtiny_grad_mask_bits((const fedtiny_grad_mask_params *)TP->kernel, GIN(0), (const uint8_t *)IN(1),
                                  GOUT(0));
}

static fedtiny_status invoke_conv2d_input_grad(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_conv2d_input_grad((const fedtiny_conv2d_input_grad_params *)TP->kernel, GIN(0), E_IN(0), GOUT(0),
                                     E_OUT, g->scratch);
}

static fedtiny_status invoke_conv2d_weight_update(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_conv2d_weight_update((const fedtiny_conv2d_update_params *)TP->kernel, GIN(0), E_IN(0), IN(1),
                                        OUT(0), &g->state->rng_counter);
}

#ifndef FEDTINY_REFERENCE_KERNELS
static fedtiny_status invoke_conv2d_weight_update_fast(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_conv2d_weight_update_fast((const fedtiny_conv2d_update_params *)TP->kernel, GIN(0), E_IN(0), IN(1),
                                             OUT(0), &g->state->rng_counter, g->scratch);
}

static fedtiny_status invoke_conv2d_input_grad_depthwise(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_conv2d_input_grad_depthwise((const fedtiny_conv2d_input_grad_params *)TP->kernel, GIN(0), E_IN(0),
                                               GOUT(0), E_OUT, g->scratch);
}

static fedtiny_status invoke_conv2d_input_grad_pointwise(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_conv2d_input_grad_pointwise((const fedtiny_conv2d_input_grad_params *)TP->kernel, GIN(0), E_IN(0),
                                               GOUT(0), E_OUT, g->scratch);
}

static fedtiny_status invoke_conv2d_bias_update_fast(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_conv2d_bias_update_fast((const fedtiny_conv2d_update_params *)TP->kernel, GIN(0), E_IN(0),
                                           (int32_t *)(void *)OUT(0), &g->state->rng_counter, g->scratch);
}
#endif

static fedtiny_status invoke_conv2d_bias_update(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_conv2d_bias_update((const fedtiny_conv2d_update_params *)TP->kernel, GIN(0), E_IN(0),
                                      (int32_t *)(void *)OUT(0), &g->state->rng_counter);
}

static fedtiny_status invoke_avgpool2d_input_grad(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_avgpool2d_input_grad((const fedtiny_pool2d_params *)TP->kernel, GIN(0), E_IN(0), GOUT(0), E_OUT,
                                        g->scratch);
}

static fedtiny_status invoke_maxpool2d_input_grad(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_maxpool2d_input_grad((const fedtiny_pool2d_params *)TP->kernel, GIN(0), E_IN(0), IN(1), GOUT(0),
                                        E_OUT, g->scratch);
}

static fedtiny_status invoke_lut_input_grad(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_lut_input_grad((const fedtiny_lut_params *)TP->kernel, GIN(0), E_IN(0), IN(1), GOUT(0), E_OUT);
}

static fedtiny_status invoke_cat_input_grad(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_cat_input_grad((const fedtiny_cat_input_grad_params *)TP->kernel, GIN(0), E_IN(0), GOUT(0), E_OUT);
}

static fedtiny_status invoke_mul_input_grad(const fedtiny_op *op, const fedtiny_graph *g)
{
    return fedtiny_mul_input_grad((const fedtiny_mul_input_grad_params *)TP->kernel, GIN(0), E_IN(0), IN(1), GOUT(0),
                                  E_OUT);
}

static size_t scratch_conv2d(const void *p) { return fedtiny_conv2d_scratch_bytes(p); }
#ifndef FEDTINY_REFERENCE_KERNELS
static size_t scratch_conv2d_fast(const void *p) { return fedtiny_conv2d_fast_scratch_bytes(p); }
static size_t scratch_conv2d_depthwise(const void *p) { return fedtiny_conv2d_depthwise_scratch_bytes(p); }
#endif
static size_t scratch_add(const void *p) { return fedtiny_add_scratch_bytes(p); }
#ifndef FEDTINY_REFERENCE_KERNELS
static size_t scratch_add_fast(const void *p) { return fedtiny_add_fast_scratch_bytes(p); }
#endif
static size_t scratch_avgpool2d(const void *p) { return fedtiny_avgpool2d_scratch_bytes(p); }
static size_t scratch_maxpool2d(const void *p) { return fedtiny_maxpool2d_scratch_bytes(p); }
static size_t scratch_clamp(const void *p) { return fedtiny_clamp_scratch_bytes(p); }
static size_t scratch_lut(const void *p) { return fedtiny_lut_scratch_bytes(p); }
static size_t scratch_cat(const void *p) { return fedtiny_cat_scratch_bytes(p); }
static size_t scratch_mul(const void *p) { return fedtiny_mul_scratch_bytes(p); }

#define TK(p) (((const fedtiny_train_step_params *)(p))->kernel)
static size_t scratch_none(const void *p) { (void)p; return 0; }
static size_t scratch_conv2d_input_grad(const void *p) { return fedtiny_conv2d_input_grad_scratch_bytes(TK(p)); }
static size_t scratch_avgpool2d_input_grad(const void *p) { return fedtiny_avgpool2d_input_grad_scratch_bytes(TK(p)); }
static size_t scratch_maxpool2d_input_grad(const void *p) { return fedtiny_maxpool2d_input_grad_scratch_bytes(TK(p)); }
static size_t scratch_mse_grad(const void *p) { return fedtiny_mse_grad_scratch_bytes(TK(p)); }
static size_t scratch_lut_input_grad(const void *p) { return fedtiny_lut_input_grad_scratch_bytes(TK(p)); }
static size_t scratch_cat_input_grad(const void *p) { return fedtiny_cat_input_grad_scratch_bytes(TK(p)); }
static size_t scratch_mul_input_grad(const void *p) { return fedtiny_mul_input_grad_scratch_bytes(TK(p)); }
#ifndef FEDTINY_REFERENCE_KERNELS
static size_t scratch_conv2d_weight_update_fast(const void *p)
{
    return fedtiny_conv2d_weight_update_fast_scratch_bytes(TK(p));
}

static size_t scratch_conv2d_input_grad_depthwise(const void *p)
{
    return fedtiny_conv2d_input_grad_depthwise_scratch_bytes(TK(p));
}

static size_t scratch_conv2d_input_grad_pointwise(const void *p)
{
    return fedtiny_conv2d_input_grad_pointwise_scratch_bytes(TK(p));
}

static size_t scratch_conv2d_bias_update_fast(const void *p)
{
    return fedtiny_conv2d_bias_update_fast_scratch_bytes(TK(p));
}
#endif

/* A fast kernel's row; a reference build (-DFEDTINY_REFERENCE_KERNELS, codegen --reference) leaves it empty, so
 * that nothing reaches the fast kernels and the firmware links none of them (fedtiny_graph_check refuses the
 * kind). */
#ifdef FEDTINY_REFERENCE_KERNELS
#define FAST_ROW(invoke, scratch, training) {NULL, scratch_none, training}
#else
#define FAST_ROW(invoke, scratch, training) {invoke, scratch, training}
#endif

static const op_kind_row kinds[FEDTINY_OP_KIND_COUNT] = {
    {invoke_conv2d, scratch_conv2d, 0},                     /* FEDTINY_OP_CONV2D */
    FAST_ROW(invoke_conv2d_fast, scratch_conv2d_fast, 0),   /* FEDTINY_OP_CONV2D_FAST */
    FAST_ROW(invoke_conv2d_depthwise, scratch_conv2d_depthwise, 0), /* FEDTINY_OP_CONV2D_DEPTHWISE */
    {invoke_add, scratch_add, 0},                           /* FEDTINY_OP_ADD */
    {invoke_avgpool2d, scratch_avgpool2d, 0},               /* FEDTINY_OP_AVGPOOL2D */
    {invoke_maxpool2d, scratch_maxpool2d, 0},               /* FEDTINY_OP_MAXPOOL2D */
    {invoke_clamp, scratch_clamp, 0},                       /* FEDTINY_OP_CLAMP */
    {invoke_mask_bits, scratch_none, 1},                    /* FEDTINY_OP_MASK_BITS */
    {invoke_loss_grad, scratch_none, 1},                    /* FEDTINY_OP_LOSS_GRAD */
    {invoke_grad_add, scratch_none, 1},                     /* FEDTINY_OP_GRAD_ADD */
    {invoke_grad_mask, scratch_none, 1},                    /* FEDTINY_OP_GRAD_MASK */
    {invoke_grad_mask_bits, scratch_none, 1},               /* FEDTINY_OP_GRAD_MASK_BITS */
    {invoke_conv2d_input_grad, scratch_conv2d_input_grad, 1},     /* FEDTINY_OP_CONV2D_INPUT_GRAD */
    {invoke_conv2d_weight_update, scratch_none, 1},               /* FEDTINY_OP_CONV2D_WEIGHT_UPDATE */
    {invoke_conv2d_bias_update, scratch_none, 1},                 /* FEDTINY_OP_CONV2D_BIAS_UPDATE */
    {invoke_avgpool2d_input_grad, scratch_avgpool2d_input_grad, 1}, /* FEDTINY_OP_AVGPOOL2D_INPUT_GRAD */
    {invoke_maxpool2d_input_grad, scratch_maxpool2d_input_grad, 1}, /* FEDTINY_OP_MAXPOOL2D_INPUT_GRAD */
    {invoke_mse_grad, scratch_mse_grad, 1},                         /* FEDTINY_OP_MSE_GRAD */
    {invoke_lut, scratch_lut, 0},                                   /* FEDTINY_OP_LUT */
    {invoke_lut_input_grad, scratch_lut_input_grad, 1},             /* FEDTINY_OP_LUT_INPUT_GRAD */
    {invoke_cat, scratch_cat, 0},                                   /* FEDTINY_OP_CAT */
    {invoke_mul, scratch_mul, 0},                                   /* FEDTINY_OP_MUL */
    {invoke_cat_input_grad, scratch_cat_input_grad, 1},             /* FEDTINY_OP_CAT_INPUT_GRAD */
    {invoke_mul_input_grad, scratch_mul_input_grad, 1},             /* FEDTINY_OP_MUL_INPUT_GRAD */
    FAST_ROW(invoke_conv2d_weight_update_fast, scratch_conv2d_weight_update_fast, 1), /* ..._UPDATE_FAST */
    FAST_ROW(invoke_add_fast, scratch_add_fast, 0),                           /* FEDTINY_OP_ADD_FAST */
    FAST_ROW(invoke_conv2d_input_grad_depthwise, scratch_conv2d_input_grad_depthwise, 1), /* ..._DEPTHWISE */
    FAST_ROW(invoke_conv2d_input_grad_pointwise, scratch_conv2d_input_grad_pointwise, 1), /* ..._POINTWISE */
    FAST_ROW(invoke_conv2d_bias_update_fast, scratch_conv2d_bias_update_fast, 1), /* ..._BIAS_UPDATE_FAST */
};

size_t fedtiny_op_scratch_bytes(const fedtiny_op *op)
{
    return op->kind < FEDTINY_OP_KIND_COUNT ? kinds[op->kind].scratch_bytes(op->params) : 0;
}

fedtiny_status fedtiny_graph_check(const fedtiny_graph *g)
{
    uint32_t i;
    for (i = 0; i < g->n_ops; i++) {
        if (g->ops[i].kind >= FEDTINY_OP_KIND_COUNT || kinds[g->ops[i].kind].invoke == NULL) {
            return FEDTINY_ERR_KIND;
        }
        if (fedtiny_op_scratch_bytes(&g->ops[i]) > g->scratch_bytes) {
            return FEDTINY_ERR_SCRATCH;
        }
        if (kinds[g->ops[i].kind].training) {
            const fedtiny_train_step_params *tp = (const fedtiny_train_step_params *)g->ops[i].params;
            uint32_t j;
            if (g->exponents == NULL || g->state == NULL || tp->grad_out >= g->n_exponents ||
                g->ops[i].n_inputs > FEDTINY_MAX_OPERANDS - 1) {
                return FEDTINY_ERR_PARAMS;
            }
            for (j = 0; j < g->ops[i].n_inputs; j++) {
                if (tp->grad_in[j] >= g->n_exponents) {
                    return FEDTINY_ERR_PARAMS;
                }
            }
        }
    }
    return FEDTINY_OK;
}

fedtiny_status fedtiny_invoke(const fedtiny_graph *g)
{
    uint32_t i;
    fedtiny_status status = fedtiny_graph_check(g);
    for (i = 0; i < g->n_ops && status == FEDTINY_OK; i++) {
        const fedtiny_op *op = &g->ops[i];
        status = kinds[op->kind].invoke(op, g);
    }
    return status;
}

fedtiny_status fedtiny_run(const fedtiny_graph *g, const int8_t *input, int8_t *output)
{
    fedtiny_status status;
    memcpy(g->arena + g->input_offset, input, g->input_bytes);
    status = fedtiny_invoke(g);
    memcpy(output, g->arena + g->output_offset, g->output_bytes);
    return status;
}

fedtiny_status fedtiny_train_step(const fedtiny_graph *g, const int8_t *input, int32_t label)
{
    if (g->state == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    memcpy(g->arena + g->input_offset, input, g->input_bytes);
    g->state->label = label;
    return fedtiny_invoke(g);
}

fedtiny_status fedtiny_train_step_target(const fedtiny_graph *g, const int8_t *input, const int8_t *target)
{
    fedtiny_status status;
    if (g->state == NULL || target == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    memcpy(g->arena + g->input_offset, input, g->input_bytes);
    g->state->target = target;
    status = fedtiny_invoke(g);
    g->state->target = NULL; /* the caller's buffer is not ours to keep */
    return status;
}
