/* The executor (see fedtiny_runtime.h): one row per op kind, each an invoke glue plus its scratch size. */
#include "fedtiny_runtime.h"

#include <string.h>

typedef fedtiny_status (*invoke_fn)(const fedtiny_op *op, uint8_t *arena, void *scratch);
typedef size_t (*scratch_fn)(const void *params);

typedef struct {
    invoke_fn invoke;
    scratch_fn scratch_bytes;
} op_kind_row;

#define IN(i) ((const int8_t *)(arena + op->offset[(i)]))
#define OUT(i) ((int8_t *)(arena + op->offset[op->n_inputs + (i)]))

static fedtiny_status invoke_conv2d(const fedtiny_op *op, uint8_t *arena, void *scratch)
{
    return fedtiny_conv2d((const fedtiny_conv2d_params *)op->params, IN(0), OUT(0), scratch);
}

static fedtiny_status invoke_conv2d_1x1(const fedtiny_op *op, uint8_t *arena, void *scratch)
{
    return fedtiny_conv2d_1x1((const fedtiny_conv2d_params *)op->params, IN(0), OUT(0), scratch);
}

static fedtiny_status invoke_conv2d_depthwise(const fedtiny_op *op, uint8_t *arena, void *scratch)
{
    return fedtiny_conv2d_depthwise((const fedtiny_conv2d_params *)op->params, IN(0), OUT(0), scratch);
}

static fedtiny_status invoke_add(const fedtiny_op *op, uint8_t *arena, void *scratch)
{
    (void)scratch;
    return fedtiny_add((const fedtiny_add_params *)op->params, IN(0), IN(1), OUT(0));
}

static fedtiny_status invoke_avgpool2d(const fedtiny_op *op, uint8_t *arena, void *scratch)
{
    (void)scratch;
    return fedtiny_avgpool2d((const fedtiny_pool2d_params *)op->params, IN(0), OUT(0));
}

static fedtiny_status invoke_maxpool2d(const fedtiny_op *op, uint8_t *arena, void *scratch)
{
    (void)scratch;
    return fedtiny_maxpool2d((const fedtiny_pool2d_params *)op->params, IN(0), OUT(0));
}

static fedtiny_status invoke_clamp(const fedtiny_op *op, uint8_t *arena, void *scratch)
{
    (void)scratch;
    return fedtiny_clamp((const fedtiny_clamp_params *)op->params, IN(0), OUT(0));
}

static size_t scratch_conv2d(const void *p) { return fedtiny_conv2d_scratch_bytes(p); }
static size_t scratch_conv2d_1x1(const void *p) { return fedtiny_conv2d_1x1_scratch_bytes(p); }
static size_t scratch_conv2d_depthwise(const void *p) { return fedtiny_conv2d_depthwise_scratch_bytes(p); }
static size_t scratch_add(const void *p) { return fedtiny_add_scratch_bytes(p); }
static size_t scratch_avgpool2d(const void *p) { return fedtiny_avgpool2d_scratch_bytes(p); }
static size_t scratch_maxpool2d(const void *p) { return fedtiny_maxpool2d_scratch_bytes(p); }
static size_t scratch_clamp(const void *p) { return fedtiny_clamp_scratch_bytes(p); }

static const op_kind_row kinds[FEDTINY_OP_KIND_COUNT] = {
    {invoke_conv2d, scratch_conv2d},                     /* FEDTINY_OP_CONV2D */
    {invoke_conv2d_1x1, scratch_conv2d_1x1},             /* FEDTINY_OP_CONV2D_1X1 */
    {invoke_conv2d_depthwise, scratch_conv2d_depthwise}, /* FEDTINY_OP_CONV2D_DEPTHWISE */
    {invoke_add, scratch_add},                           /* FEDTINY_OP_ADD */
    {invoke_avgpool2d, scratch_avgpool2d},               /* FEDTINY_OP_AVGPOOL2D */
    {invoke_maxpool2d, scratch_maxpool2d},               /* FEDTINY_OP_MAXPOOL2D */
    {invoke_clamp, scratch_clamp},                       /* FEDTINY_OP_CLAMP */
};

size_t fedtiny_op_scratch_bytes(const fedtiny_op *op)
{
    return op->kind < FEDTINY_OP_KIND_COUNT ? kinds[op->kind].scratch_bytes(op->params) : 0;
}

fedtiny_status fedtiny_graph_check(const fedtiny_graph *g)
{
    uint32_t i;
    for (i = 0; i < g->n_ops; i++) {
        if (g->ops[i].kind >= FEDTINY_OP_KIND_COUNT) {
            return FEDTINY_ERR_KIND;
        }
        if (fedtiny_op_scratch_bytes(&g->ops[i]) > g->scratch_bytes) {
            return FEDTINY_ERR_SCRATCH;
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
        status = kinds[op->kind].invoke(op, g->arena, g->scratch);
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
