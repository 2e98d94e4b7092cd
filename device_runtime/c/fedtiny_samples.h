/* The samples a firmware image carries in flash. samples.c, written by codegen (render_samples for inference,
 * render_train_samples for training), defines them and includes this header, so the compiler checks that the
 * definitions match what the firmware reads. An inference image defines only the count and the samples. */
#ifndef FEDTINY_SAMPLES_H
#define FEDTINY_SAMPLES_H

#include <stdint.h>

extern const uint32_t fedtiny_n_samples;
extern const int8_t fedtiny_samples[];  /* (N, H, W, C) int8 */

/* Training images */
extern const uint32_t fedtiny_train_steps, fedtiny_train_seed;
extern const int8_t fedtiny_targets[];  /* MSE plans: (N, classes) int8 */
extern const int32_t fedtiny_labels[];  /* classification plans: (N,) class indexes */
/* The device's evaluation part (agent.evaluation_part): samples of every class it will meet, never trained on;
 * fedtiny_n_eval_samples = 0 without one (the arrays then hold one unused entry: C has no empty arrays). */
extern const uint32_t fedtiny_n_eval_samples;
extern const int8_t fedtiny_eval_samples[];
extern const int32_t fedtiny_eval_labels[];

#endif
