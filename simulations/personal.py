"""Personalisation in a simulation: each device's personalised model against the global one and against what the
device reaches training alone.

A device's personalised model is the global model after its own local steps of the round (FedAvg + local
fine-tuning); the device measures it on its evaluation part (fedtiny_device.agent.evaluation_part: its machine's
held-out windows of every class where the scenario has them, else the fifth of its samples it holds out) and reports
it in its DELTA's metrics (`personal_accuracy`), so no sample leaves it. Here, on the host, which holds every node's
data file (nodefile):

    fleet_summary   the round's or run's mean and worst tenth over the devices that report one
    round_personal  a round's personalised accuracies, from the coordinator's stored replies
    HeldOutParts    the global model of a round on the same evaluation parts (the host runs it: a measurement)
    train_alone     each device trained alone from the pretrained model, with the nodes' own trainer and split, round
                    after round as the run's rounds train it (the same local steps and sample order, never averaged
                    with anyone), scored on its evaluation part after every round: what the device reaches without
                    federation, beside the personalised model of the same round
"""

from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from . import nodefile

# What starting one worker process costs (a fresh interpreter importing numpy, the plan and the C runtime): two of
# them took 5.7 s on the 2-core test machine at load 11, where a 6-node, 2-round run's nodes trained alone in 0.2 s.
PROCESS_START_SECONDS = 3.0

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


class HeldOutParts:
    """Every node's evaluation part (NodeFile.scored_on of its data file in the run folder), on which the global
    model of each round is scored beside the personalised and alone models: the same samples for all three lines.
    `labels(state, x_int8)` -> the classes the plan's model with that state predicts (the run's C forward pass)."""

    def __init__(self, run_dir: str | Path, labels):
        self.labels = labels
        self.parts = {}
        for f in sorted((Path(run_dir) / "nodes").glob("*.npz")):
            x, y = nodefile.load(f).scored_on()
            if len(y):
                self.parts[f.stem] = (x, y)

    def accuracy(self, state: dict[str, np.ndarray]) -> dict[str, float]:
        """{device: the model with `state` on its evaluation part}, one forward pass over all parts."""
        if not self.parts:
            return {}
        x = np.concatenate([x for x, _ in self.parts.values()])
        hits = self.labels(state, x) == np.concatenate([y for _, y in self.parts.values()])
        ends = np.cumsum([len(y) for _, y in self.parts.values()])[:-1]
        return {device: float(h.mean()) for device, h in zip(self.parts, np.split(hits, ends))}


def local_steps(config: dict, n: int) -> int:
    """The steps a device of n samples trains in one round: --local-steps, else --epochs passes over its train part."""
    from fedtiny_device.agent import heldout_count

    return int(config["local_steps"] or config["epochs"] * (n - heldout_count(n)))


def train_alone(run_dir: str | Path, config: dict) -> dict[str, list[float | None]]:
    """{device: [accuracy on its evaluation part after round 1, 2, ..., config["rounds"]] (None: it has none)} of
    each node's model trained alone: from the pretrained model (the plan's initial state), with the run's trainer,
    the node's samples, seed and split, each round a TrainJob like the run's (config["epochs"] or
    config["local_steps"]) from where its previous round ended. With the C trainer a round is one C call, the
    device's own round code. The first node trains in this process and is timed; the others are shared among
    config["workers"] processes, as the node agents are, only where training them here would take longer than
    starting those processes (a small run's nodes train here: a test's run would otherwise wait seconds for them)."""
    run = Path(run_dir)
    devices = sorted(f.stem for f in (run / "nodes").glob("*.npz"))
    if not devices:
        return {}
    started = time.perf_counter()
    out = _alone(str(run), devices[:1], config)
    rest, per_device = devices[1:], time.perf_counter() - started
    workers = max(1, min(int(config.get("workers", 1)), len(rest)))
    if workers == 1 or per_device * len(rest) < workers * PROCESS_START_SECONDS:
        return out | _alone(str(run), rest, config)
    args = [(str(run), rest[i::workers], config) for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for part in pool.map(_alone, *zip(*args)):
            out.update(part)
    return out


def round_summaries(alone: dict[str, list[float | None]]) -> list[dict]:
    """fleet_summary of the devices trained alone after each round (train_alone's curves)."""
    rounds = max((len(curve) for curve in alone.values()), default=0)
    return [fleet_summary([curve[r] for curve in alone.values() if len(curve) > r]) for r in range(rounds)]


def _alone(run_dir: str, devices: list[str], config: dict) -> dict[str, list[float | None]]:
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
        samples = nodefile.load(run / "nodes" / f"{device}.npz")
        training = LocalTraining(plan, samples.x, samples.y, samples.seed, factory, evaluation=samples.evaluation)
        state, curve = plan.initial_state(), []
        if local_steps(config, len(samples.y)):
            for r in range(1, int(config["rounds"]) + 1):
                result = training.run(TrainJob(r, 0, int(config["epochs"]), int(config["local_steps"]), state))
                state = result.state
                curve.append(result.personal_accuracy)
        out[device] = curve
    return out
