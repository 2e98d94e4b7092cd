"""Between the devices' integers and the strategies' floats.

A training plan's trainable buffers are int8 weight rows (symmetric, per output channel) and int32 biases, each
with a fixed per-channel scale from quantization. Strategies see float tensors; devices hold integers:

    float  = int * scale[c]                       (dequantize, channel c along axis 0)
    int    = clamp(round(float / scale[c]))       (requantize: weights to [-127, 127], biases to int32)

The coordinator keeps a float master copy of the global state, so sub-LSB averages are not lost between rounds;
devices get its requantization. A device's reply is rebuilt as master + dequantized delta, which is its full
trainable state in float, and what the built-in strategies expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtiny.compiler import Plan
from fedtiny.protocol.update import row_scales

INT_LIMITS = {"int8": (-127, 127), "int32": (-(2**31), 2**31 - 1)}  # int8 weights are symmetric: never -128


@dataclass(frozen=True)
class TensorSpec:
    name: str  # trainable buffer name, e.g. "train:classifier.weight"
    shape: tuple[int, ...]
    dtype: str  # "int8" (weight rows) or "int32" (biases)
    scale: np.ndarray  # float64, shape (channels,) broadcast along axis 0

    def _scale(self) -> np.ndarray:
        return self.scale.reshape((-1,) + (1,) * (len(self.shape) - 1))

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return np.asarray(q, np.float64).reshape(self.shape) * self._scale()

    def requantize(self, x: np.ndarray) -> np.ndarray:
        lo, hi = INT_LIMITS[self.dtype]
        q = np.round(np.asarray(x, np.float64).reshape(self.shape) / self._scale())
        return np.clip(q, lo, hi).astype(self.dtype)

    def clamp(self, x: np.ndarray) -> np.ndarray:
        """A float tensor limited to what the integers can represent (so the master never drifts off-grid)."""
        lo, hi = INT_LIMITS[self.dtype]
        s = self._scale()
        return np.clip(np.asarray(x, np.float64).reshape(self.shape), lo * s, hi * s)


def tensor_specs(plan: Plan) -> dict[str, TensorSpec]:
    """Buffer name -> spec, in the plan's trainable order (a buffer's wire tensor id is its index here)."""
    return {name: TensorSpec(name, tuple(plan.buffers[name].shape), plan.buffers[name].dtype, scale)
            for name, scale in row_scales(plan).items()}


def dequantize_state(specs: dict[str, TensorSpec], state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: specs[n].dequantize(state[n]) for n in specs}


def requantize_state(specs: dict[str, TensorSpec], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: specs[n].requantize(arrays[n]) for n in specs}


def changed(old: dict[str, np.ndarray] | None, new: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The buffers of `new` whose integers differ from `old` (all of them when old is unknown)."""
    if old is None:
        return dict(new)
    return {n: v for n, v in new.items() if n not in old or not np.array_equal(old[n], v)}


class DeltaError(ValueError):
    """A device delta that does not fit the plan (unknown buffer, wrong size, out of range)."""


def rebuild(specs: dict[str, TensorSpec], base: dict[str, np.ndarray], delta: dict[str, np.ndarray]
            ) -> dict[str, np.ndarray]:
    """Full float tensors of a device: base (the float master it started from) + dequantized integer delta.

    Buffers absent from the delta did not change. Raises DeltaError for anything that does not fit.
    """
    unknown = set(delta) - set(specs)
    if unknown:
        raise DeltaError(f"unknown buffers {sorted(unknown)}")
    full = {}
    for name, spec in specs.items():
        if name not in delta:
            full[name] = np.asarray(base[name], np.float64)
            continue
        d = np.asarray(delta[name])
        if d.dtype.kind not in "iu" or d.size != int(np.prod(spec.shape)):
            raise DeltaError(f"{name}: {d.dtype} x {d.size} values, expected integers x {int(np.prod(spec.shape))}")
        if spec.dtype == "int8" and np.abs(d.astype(np.int64)).max(initial=0) > 255:
            raise DeltaError(f"{name}: weight delta outside [-255, 255]")
        full[name] = np.asarray(base[name], np.float64) + spec.dequantize(d)
    return full
