"""FedBuff (Nguyen et al., 2022): buffered semi-asynchronous aggregation with staleness weighting.

Devices train whenever they are free; replies arrive against whatever global version they started from. Each
reply's ArrayRecord is the device's update rebuilt on the *current* global (the grid does this when
`max_staleness > 0`), so delta_i = arrays_i - current. A reply is weighted by

    w_i = num_examples_i / sqrt(1 + staleness_i)

and kept in a buffer; once the buffer holds K replies the global moves by

    x <- x + server_lr * sum(w_i * delta_i) / sum(w_i)

and the buffer empties. Fewer than K replies leave the global as it is (aggregate_train returns None arrays).
The buffer is part of the strategy's state, which the coordinator checkpoints with each round.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log


def staleness_weight(staleness: int) -> float:
    return 1.0 / float(np.sqrt(1.0 + staleness))


class FedBuff(FedAvg):
    def __init__(self, buffer_size: int = 4, server_lr: float = 1.0, **kwargs) -> None:
        kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(**kwargs)
        self.buffer_size = buffer_size
        self.server_lr = server_lr
        self.current: dict[str, np.ndarray] | None = None
        self.buffer: list[tuple[float, dict[str, np.ndarray], dict[str, float]]] = []

    def summary(self) -> None:
        log(INFO, "\t├──> FedBuff: buffer size K=%d, server lr %.3g, weight n/sqrt(1+staleness)",
            self.buffer_size, self.server_lr)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        self.current = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if self.current is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        for msg in valid:
            metrics = next(iter(msg.content.metric_records.values()))
            arrays = next(iter(msg.content.array_records.values()))
            weight = float(metrics[self.weighted_by_key]) * staleness_weight(int(metrics.get("staleness", 0)))
            delta = {k: v.numpy().astype(np.float64) - self.current[k] for k, v in arrays.items()}
            self.buffer.append((weight, delta, {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}))
        if len(self.buffer) < self.buffer_size:
            return None, None
        total = sum(w for w, _, _ in self.buffer)
        new = {}
        for key, value in self.current.items():
            step = sum(w * d[key] for w, d, _ in self.buffer) / total
            new[key] = value + self.server_lr * step
        keys = [k for k in self.buffer[0][2] if k not in (self.weighted_by_key,)]
        agg = MetricRecord({k: float(sum(w * m.get(k, 0.0) for w, _, m in self.buffer) / total) for k in keys})
        agg["buffered-replies"] = len(self.buffer)
        self.buffer = []
        self.current = new
        return ArrayRecord({k: Array(v) for k, v in new.items()}), agg

    # --- checkpointing ------------------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for i, (w, delta, metrics) in enumerate(self.buffer):
            out[f"buffer/{i}/weight"] = np.array(w)
            out.update({f"buffer/{i}/delta/{k}": v for k, v in delta.items()})
            out.update({f"buffer/{i}/metric/{k}": np.array(v) for k, v in metrics.items()})
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        entries: dict[int, list] = {}
        for key, value in arrays.items():
            parts = key.split("/", 3)
            if parts[0] != "buffer":
                continue
            entry = entries.setdefault(int(parts[1]), [0.0, {}, {}])
            if parts[2] == "weight":
                entry[0] = float(value)
            elif parts[2] == "delta":
                entry[1][parts[3]] = value
            else:
                entry[2][parts[3]] = float(value)
        self.buffer = [tuple(entries[i]) for i in sorted(entries)]
