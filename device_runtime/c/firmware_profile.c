/* Bare-metal profiling firmware for Cortex-M (QEMU mps2-an386): runs fedtiny_train_steps training steps of the
 * generated plan on the samples and labels (targets for an MSE plan) in flash, first each step whole, then each
 * step again op by op (one op of the table per fedtiny_invoke call), every one between fedtiny_mark_begin and
 * fedtiny_mark_end. Under the instruction-count plugin (tools/insn_count.c) the regions are, in order: the
 * whole steps, then steps x ops single ops; fedtiny_device.profile turns them into instructions per step kind
 * and per layer (`fedtiny profile`). A single op's count includes its fedtiny_invoke call (the graph check of
 * one op and the dispatch: a few dozen instructions). Built by the Makefile's `m4-profile` target. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fedtiny_boot.h"
#include "model.h"

#include "fedtiny_samples.h"

static fedtiny_status whole_step(uint32_t k)
{
#if FEDTINY_MODEL_LOSS_MSE
    return fedtiny_model_train_step(fedtiny_samples + k * FEDTINY_MODEL_INPUT_BYTES,
                                    fedtiny_targets + k * FEDTINY_MODEL_OUTPUT_BYTES);
#else
    return fedtiny_model_train_step(fedtiny_samples + k * FEDTINY_MODEL_INPUT_BYTES, fedtiny_labels[k]);
#endif
}

/* What fedtiny_train_step does before it invokes the table: the sample into the arena, its label or target
 * into the train state. */
static void load_sample(const fedtiny_graph *g, uint32_t k)
{
    memcpy(g->arena + g->input_offset, fedtiny_samples + k * FEDTINY_MODEL_INPUT_BYTES, g->input_bytes);
#if FEDTINY_MODEL_LOSS_MSE
    g->state->target = fedtiny_targets + k * FEDTINY_MODEL_OUTPUT_BYTES;
#else
    g->state->label = fedtiny_labels[k];
#endif
}

int main(void)
{
    const fedtiny_graph *g = &fedtiny_model_graph;
    fedtiny_graph one = fedtiny_model_graph;
    fedtiny_status status = FEDTINY_OK;
    uint32_t i, j;
    fedtiny_model_train_init(fedtiny_train_seed);
    for (i = 0; i < fedtiny_train_steps && status == FEDTINY_OK; i++) {
        fedtiny_mark_begin();
        status = whole_step(i % fedtiny_n_samples);
        fedtiny_mark_end();
    }
    fedtiny_model_train_init(fedtiny_train_seed); /* the same steps again, from the same state */
    one.n_ops = 1;
    for (i = 0; i < fedtiny_train_steps && status == FEDTINY_OK; i++) {
        load_sample(g, i % fedtiny_n_samples);
        for (j = 0; j < g->n_ops && status == FEDTINY_OK; j++) {
            one.ops = &g->ops[j];
            fedtiny_mark_begin();
            status = fedtiny_invoke(&one);
            fedtiny_mark_end();
        }
    }
    if (status != FEDTINY_OK) {
        printf("profile failed: status %d\n", (int)status);
        return 1;
    }
    printf("profiled %lu steps of %lu ops\n", (unsigned long)fedtiny_train_steps, (unsigned long)g->n_ops);
    return 0;
}
