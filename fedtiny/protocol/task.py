"""The TASK body: what the coordinator asks of a device in a round, and the settings a device reads back."""

from __future__ import annotations

import logging
import struct

from fedtiny.compiler import Plan
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import TASK_MASKED, Task

log = logging.getLogger("fedtiny.task")

PLAN_VERSION = 1
TASK_CONFIG = struct.Struct("<HH")  # TASK.config: epochs u16 | uplink_keep_pct u16 (0 = 100: send every change)
# ... and with device noise (differential privacy): | noise_sigma f32 (real units) | min_survivors u32 (the fewest
# survivors the noise is calibrated for: a masked round's device reveals no share for fewer; 0 = no such rule). A
# node that cannot add noise (a C node built without the buffer for it) refuses the 12-byte form as a bad TASK: it
# never answers a noised round without noise.
TASK_CONFIG_NOISE = struct.Struct("<HHfI")

TASK_KEYS = {"epochs", "steps", "local_steps", "batch_size", "lr", "learning_rate", "clip_norm", "deadline_s",
             "uplink_keep", "noise_sigma", "min_survivors", "secagg"}


def task_body(plan: Plan, phash: bytes, config: dict[str, float], max_mqtt_payload: int) -> Task:
    """TASK from the coordinator's config: epochs (default 1), steps (0 = epochs over the device's data),
    clip_norm, deadline_s, uplink_keep (the fraction of each buffer's changes a DELTA carries, see
    split_uplink; default 1), noise_sigma (the device's DP noise per element in real units, default 0: none;
    protocol/noise.py), min_survivors (with noise: the fewest survivors a masked round may be unmasked with,
    which the device checks before it reveals shares; default 0), secagg (nonzero: send the delta masked for
    secure aggregation, flag TASK_MASKED; protocol/secagg.py). Unknown keys are ignored with a warning.

    The learning rate and batch size are compiled into the plan (QAS update constants, batch-1 buffers), so a
    TASK states the plan's and a config asking for others (lr, learning_rate, batch_size) is refused: the
    devices could not honour it. Change them by compiling and flashing a new plan."""
    unknown = set(config) - TASK_KEYS - {"server-round"}  # Flower's own key: the round is in the header
    if unknown:
        log.warning("TASK config keys not carried on the wire: %s", sorted(unknown))
    steps = int(config.get("steps", config.get("local_steps", 0)))
    for key, compiled in (("lr", plan.lr), ("learning_rate", plan.lr), ("batch_size", 1)):
        if key in config and float(config[key]) != float(compiled):
            raise ValueError(f"TASK {key}={config[key]}: devices train with the plan's {key} ({compiled}); "
                             f"compile a plan with the one you want")
    epochs = int(config.get("epochs", 1))
    keep_pct = round(100 * float(config.get("uplink_keep", 1.0)))
    if not 0 <= steps <= 0xFFFF or not 0 <= epochs <= 0xFFFF:
        raise ValueError("steps and epochs must fit u16")
    if not 1 <= keep_pct <= 100:
        raise ValueError(f"uplink_keep {config['uplink_keep']} is not a fraction in [0.01, 1]")
    noise_sigma = float(config.get("noise_sigma", 0.0))
    if not noise_sigma >= 0:
        raise ValueError(f"noise_sigma {noise_sigma} is not 0 or positive")
    min_survivors = int(config.get("min_survivors", 0))
    if not 0 <= min_survivors <= 0xFFFFFFFF:
        raise ValueError(f"min_survivors {min_survivors} does not fit u32")
    packed = TASK_CONFIG_NOISE.pack(epochs, keep_pct % 100, noise_sigma, min_survivors) if noise_sigma else \
        TASK_CONFIG.pack(epochs, keep_pct % 100)
    flags = TASK_MASKED if config.get("secagg") else 0
    return Task(PLAN_VERSION, phash, steps, 1, plan.lr,
                float(config.get("clip_norm", 0.0)), int(config.get("deadline_s", 0)), max_mqtt_payload, flags, packed)


def task_settings(task: Task) -> dict[str, float]:
    """The config a device reads back from a TASK."""
    epochs, keep_pct, noise_sigma, min_survivors = 1, 0, 0.0, 0
    if len(task.config) == TASK_CONFIG.size:
        epochs, keep_pct = TASK_CONFIG.unpack(task.config)
    elif len(task.config) == TASK_CONFIG_NOISE.size:
        epochs, keep_pct, noise_sigma, min_survivors = TASK_CONFIG_NOISE.unpack(task.config)
        if not noise_sigma >= 0:  # NaN or negative
            raise ProtocolError("bad-task", f"TASK noise_sigma {noise_sigma} is not 0 or positive")
    elif task.config:
        raise ProtocolError("bad-task", f"TASK config is not {TASK_CONFIG.size} or {TASK_CONFIG_NOISE.size} bytes")
    if keep_pct >= 100:
        raise ProtocolError("bad-task", f"TASK uplink_keep_pct {keep_pct} is not below 100")
    return {"epochs": epochs, "steps": task.local_steps, "batch_size": task.batch_size, "lr": task.learning_rate,
            "clip_norm": task.clip_norm, "deadline_s": task.deadline_s, "uplink_keep": (keep_pct or 100) / 100,
            "noise_sigma": noise_sigma, "min_survivors": min_survivors, "masked": bool(task.task_flags & TASK_MASKED)}
