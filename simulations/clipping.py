"""The clip norm of a run under differential privacy, from the host's own data (fedtiny.privacy.clip_norm_rule).

The host plays the devices' first round on its own samples: shards of a device's size (the median node's
training samples), cut after sorting by label as tuning.py's trial cuts them, each trained from the pretrained
model by the run's plan (its scheme, lr and epochs, on the trainer the nodes run) in a device's training order;
of each shard's change the part a device would send (the uplink pipeline's steps 1-2: the state delta, the
largest --uplink-keep share of each buffer) is measured as the clipping step measures it, its L2 norm in real
units. The clip norm is fedtiny.privacy.CLIP_QUANTILE of those norms.

Both parts of the host's data are trained on (tuning.folds' shards): the training part, which pretraining fitted
(small updates, as on devices whose data is like the host's), and the validation part, which it never saw (updates
as large as a device's whose data differs). No device's data is used: the clip norm is a public parameter of the
mechanism as the model's architecture is, and choosing it spends none of the devices' budget (docs/privacy.md).
"""

import numpy as np


def settle_clip_norm(config, task, plan, graph, train, val, trainer_factory=None) -> str:
    """Fill config.clip_norm and config.clip_rule by the rule (config.lr and epochs settled, `plan` the run's);
    returns the line that says what was chosen and why. A ConfigError when the host's round moved no weight."""
    from fedtiny.privacy import clip_norm_rule

    from .simulate import ConfigError
    from .tuning import _shard_size

    norms = host_update_norms(config, plan, graph, train, val, _shard_size(task), trainer_factory)
    try:
        config.clip_norm, config.clip_rule = clip_norm_rule(norms)
    except ValueError as exc:
        raise ConfigError(f"--dp-epsilon without --clip-norm: {exc}; give --clip-norm") from None
    return f"devices: {config.clip_rule}"


def host_update_norms(config, plan, graph, train, val, shard_size: int, trainer_factory=None) -> list[float]:
    """The L2 norm (real units) of what each host shard's first round would send under `plan`, before clipping."""
    from fedtiny.interpreter import quantize_input
    from fedtiny.protocol.update import delta_norm, row_scales, split_uplink, state_delta
    from fedtiny_device.agent import training_order

    from .tuning import folds

    if trainer_factory is None:
        from fedtiny_device.trainer import Trainer as trainer_factory
    xq = quantize_input(graph, np.concatenate([train.X, val.X]))
    y = np.concatenate([train.y, val.y])
    shards = [shard for trial_shards, _ in folds(train.y, val.y, shard_size) for shard in trial_shards]
    trainer = trainer_factory(plan, config.seed)
    start = plan.initial_state()
    scales = row_scales(plan)
    norms = []
    for shard in shards:
        trainer.load_trainable_state(start)
        order = shard[training_order(config.seed, 1, len(shard), epochs=config.epochs or 1, steps=config.local_steps)]
        trainer.steps(xq[order], y[order])
        sent, _ = split_uplink(state_delta(trainer.trainable_state(), start), None, config.uplink_keep)
        norms.append(delta_norm(sent, scales))
    return norms
