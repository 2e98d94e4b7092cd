"""Personalisation in a simulation: each device's personalised model against the global one and against what the
device reaches training alone.

A device's personalised model is the global model after its own local steps of the round (FedAvg + local
fine-tuning); the device measures it on the fifth of its samples it holds out (fedtiny_device.agent.heldout_split)
and reports it in its DELTA's metrics (`personal_accuracy`), so no sample leaves it. Here, on the host, which holds
every node's data file:

    fleet_summary   the round's or run's mean and worst tenth over the devices that report one
    round_personal  a round's personalised accuracies, from the coordinator's stored replies
    train_alone     each device trained alone from the pretrained model, with the nodes' own trainer and split, for
                    as many local steps as the whole run gave it, scored on its held-out part
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

# The worst tenth: the mean over the tenth of devices that score lowest (at least one device), the devices a
# fleet's operator hears about first.
WORST_SHARE = 0.1


def fleet_summary(values: list[float]) -> dict:
    """{mean, worst_tenth, devices} of per-device accuracies (None entries are devices without a held-out part,
    left out); mean and worst_tenth are None when no device has one."""
    v = sorted(float(x) for x in values if x is not None)
    if not v:
        return dict(mean=None, worst_tenth=None, devices=0)
    worst = v[:max(1, math.ceil(WORST_SHARE * len(v)))]
    return dict(mean=float(np.mean(v)), worst_tenth=float(np.mean(worst)), devices=len(v))


def round_personal(store, round_: int) -> dict[str, float]:
    """{device: personalised accuracy} its accepted DELTA of `round_` reported (devices with a held-out part)."""
    return {device: float(m["personal_accuracy"]) for (r, device), m in store.reply_metrics().items()
            if r == round_ and m.get("personal_accuracy") is not None}


def local_steps(config: dict, n: int) -> int:
    """The steps a device of n samples trains in one round: --local-steps, else --epochs passes over its train part."""
    from fedtiny_device.agent import heldout_count

    return int(config["local_steps"] or config["epochs"] * (n - heldout_count(n)))


def train_alone(run_dir: str | Path, config: dict) -> dict[str, float | None]:
    """{device: accuracy on its held-out part (None: it has none)} of each node's model trained alone: from the
    pretrained model (the plan's initial state), with the run's trainer, the node's samples, seed and split, for
    config["rounds"] rounds' worth of local steps in one job. Nodes are shared among config["workers"] processes,
    as the node agents are."""
    run = Path(run_dir)
    devices = sorted(f.stem for f in (run / "nodes").glob("*.npz"))
    workers = max(1, min(int(config.get("workers", 1)), len(devices)))
    shares = [devices[i::workers] for i in range(workers)]
    args = [(str(run), share, config) for share in shares if share]
    if workers == 1:
        results = [_alone(*a) for a in args]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_alone, *zip(*args)))
    return {device: acc for part in results for device, acc in part.items()}


def _alone(run_dir: str, devices: list[str], config: dict) -> dict[str, float | None]:
    from fedtiny.planfile import load_plan
    from fedtiny.protocol.device import TrainJob
    from fedtiny_device.agent import LocalTraining

    run = Path(run_dir)
    plan = load_plan(run / "plan.ftp")
    factory = None
    if config["trainer"] == "c":
        from fedtiny_device.cruntime import CTrainer as factory
    out = {}
    for device in devices:
        samples = np.load(run / "nodes" / f"{device}.npz")
        training = LocalTraining(plan, samples["x"], samples["y"], int(samples["seed"]), factory)
        steps = config["rounds"] * local_steps(config, len(samples["y"]))
        result = training.run(TrainJob(1, 0, 0, steps, plan.initial_state())) if steps else None
        out[device] = result.personal_accuracy if result is not None else None
    return out
