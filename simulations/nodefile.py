"""A simulated device's data file, nodes/<device>.npz in the run folder: what a device holds in its flash. Every part
of a run that plays or scores a device (node agents, Flower ClientApps, firmware images, the host's personalisation
lines and report) reads it through `load`, so all of them see the same samples.

    x, y            its samples (int8, in the model's input quantization) and labels; it trains on the train part of
                    agent.heldout_split
    seed            its seed: training order and split
    x_eval, y_eval  only where the scenario has per-machine tests (scenarios.Task.machine_tests): its machine's
                    held-out windows of every class, what it will meet, never trained on. The device scores its
                    personalised model on them (agent.evaluation_part); without them, on the part it holds out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# What each device's personalised, global and alone accuracies are scored on (the run summary's `evaluation`, the
# report's sentence): the machine's tests where the data files carry them, else the held-out fifth of its samples.
MACHINE_TESTS = "machine_tests"
HELDOUT_FIFTH = "heldout_fifth"


@dataclass(frozen=True)
class NodeFile:
    x: np.ndarray
    y: np.ndarray
    seed: int
    evaluation: tuple[np.ndarray, np.ndarray] | None  # (x_eval, y_eval), or None

    def scored_on(self) -> tuple[np.ndarray, np.ndarray]:
        """(samples, labels) the device scores its personalised model on (agent.evaluation_part)."""
        from fedtiny_device.agent import evaluation_part

        return evaluation_part(self.seed, self.x, self.y, self.evaluation)


def save(path: str | Path, x: np.ndarray, y: np.ndarray, seed: int,
         evaluation: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    parts = dict(x=x, y=y, seed=seed)
    if evaluation is not None:
        parts.update(x_eval=evaluation[0], y_eval=evaluation[1])
    np.savez(path, **parts)


def load(path: str | Path) -> NodeFile:
    with np.load(path) as f:
        evaluation = (f["x_eval"], f["y_eval"]) if "y_eval" in f.files else None
        return NodeFile(f["x"], f["y"], int(f["seed"]), evaluation)

