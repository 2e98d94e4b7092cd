"""Between the devices' integers and the strategies' floats.

A training plan's trainable buffers are int8 weight rows (symmetric, per output channel) and int32 biases, each
with a fixed per-channel scale from quantization. Strategies see float tensors; devices hold integers:

    float  = int * scale[c]                       (dequantize, channel c along axis 0)
    int    = clamp(round(float / scale[c]))       (requantize: weights to [-127, 127], biases to int32; the
                                                  value first put on the master's grid, below)

The coordinator keeps a float master copy of the global state, so sub-LSB averages are not lost between rounds;
devices get its requantization. The master is kept on a grid of 2^-MASTER_FRACTION_BITS LSB (TensorSpec.snap), so
that the same mean reached by two float computations is the same master: the secure-aggregation path
(base + dequantized integer sum / m, server/secagg.py) and Flower's FedAvg over the m plain replies of the same
clipped deltas with equal weights (sum of reply * (1/m), in another order) differ by a few ulps, and snapping
makes their masters, hence the integers the devices receive, bit-identical (TensorSpec.snap says when).

A device's reply is rebuilt as master + dequantized delta, which is its full trainable state in float, and what
the built-in strategies expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtiny.compiler import Plan
from fedtiny.protocol.update import row_scales

MASTER_FRACTION_BITS = 10  # the float master's grid: 2^-10 LSB (TensorSpec.snap)
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
        """The nearest integers (ties to even) to x's point on the master's grid (snap), clamped: computed from
        the grid's integer, so an exact half LSB of a master rounds to even whatever its float's last bit says."""
        lo, hi = INT_LIMITS[self.dtype]
        grid = 2.0 ** MASTER_FRACTION_BITS
        q = np.round(np.round(np.asarray(x, np.float64).reshape(self.shape) / self._scale() * grid) / grid)
        return np.clip(q, lo, hi).astype(self.dtype)

    def snap(self, x: np.ndarray) -> np.ndarray:
        """x on the master's grid: the nearest multiple of 2^-K LSB (K = MASTER_FRACTION_BITS), as float.

        Why: the exact mean of m equal-weight updates of integer deltas on a base already on the grid is, in
        units of 2^-K LSB, an integer plus r/m; for m <= 2^K it is never a half-integer (2^K D / m = n + 1/2 needs
        more factors of 2 in m than 2^K has), so it lies at least 1/(2m) grid units from a rounding boundary. Two
        float computations of that mean (Flower's FedAvg: (m + 4) roundings of values up to X LSB, the secure
        aggregation's: 3) plus this division stay within (m + 5) 2^-53 X LSB of it, which is less than that
        distance while X < 2^(52-K) / (m (m + 5)): every int8 weight (|X| <= 127 + 255) for cohorts up to 1,024,
        biases up to 4 million LSB at 1,024 devices, 1.6 billion at 50. Both then snap to the same grid point,
        bit for bit. Idempotent: a snapped value snaps to itself."""
        s = self._scale()
        grid = 2.0 ** MASTER_FRACTION_BITS
        return np.round(np.asarray(x, np.float64).reshape(self.shape) / s * grid) / grid * s

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
