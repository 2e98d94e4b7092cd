"""The usual way, for comparison: plain Flower FedAvg with PyTorch fp32 clients updating the full model.

Same task, node data, rounds and local epochs as the fedtiny run. Flower's own FedAvg strategy drives it
through `strategy.start` on an in-process Grid whose nodes are PyTorch clients (a ClientApp's train function
run in this process: no MQTT, no quantization, no sparsity). Each round a node receives and returns the whole
fp32 model, which is what it would send over the network.
"""

import copy
import time
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.run import Run
from torch import nn

from fedtiny.datafile import Dataset
from fedtiny_server.grid import ensure_task_identity


class TorchClientGrid(Grid):
    """Nodes 1..N, each a PyTorch fp32 client that trains the received model on its own data with SGD."""

    def __init__(self, model: nn.Module, nodes: list[Dataset], *, lr: float, epochs: int, seed: int):
        self._run = Run.create_empty(1)
        ensure_task_identity(1)
        self.model, self.nodes, self.lr, self.epochs, self.seed = model, nodes, lr, epochs, seed
        self._replies: list[Message] = []
        self.bytes_up = self.bytes_down = 0
        self.round = 0  # strategies push one batch of train messages per round

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(range(1, len(self.nodes) + 1))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        self.round += 1
        for msg in messages:
            arrays = msg.content["arrays"]
            self.bytes_down += sum(a.numpy().nbytes for a in arrays.values())
            trained, n = self._train(arrays, self.nodes[msg.metadata.dst_node_id - 1], self.round)
            self.bytes_up += sum(a.numpy().nbytes for a in trained.values())
            content = RecordDict({"arrays": trained, "metrics": MetricRecord({"num-examples": n})})
            self._replies.append(Message(content, reply_to=msg))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        out = [m for m in self._replies if m.metadata.reply_to_message_id in wanted]
        self._replies = [m for m in self._replies if m not in out]
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _train(self, arrays: ArrayRecord, data: Dataset, round_: int) -> tuple[ArrayRecord, int]:
        model = copy.deepcopy(self.model)
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()  # batch norm statistics stay those of pretraining, as on the devices
        opt = torch.optim.SGD(model.parameters(), lr=self.lr)
        xt, yt = torch.as_tensor(data.X), torch.as_tensor(data.y)
        for epoch in range(self.epochs):
            for j in np.random.default_rng([self.seed, round_, epoch]).permutation(len(xt)):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xt[j:j + 1]), yt[j:j + 1]).backward()
                opt.step()
        return ArrayRecord(model.state_dict()), len(xt)


def run_baseline(model: nn.Module, nodes: list[Dataset], test: Dataset, *, rounds: int, lr: float, epochs: int,
                 seed: int) -> dict:
    """Flower FedAvg over PyTorch fp32 clients; returns per-round held-out accuracy/loss and totals.

    PyTorch runs on one thread, as each fedtiny node trains on one core: at batch 1 more threads only contend
    (on a busy 2-core machine a step took 124-756 ms with torch's default threads, 6-11 ms with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_baseline(model, nodes, test, rounds=rounds, lr=lr, epochs=epochs, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _run_baseline(model: nn.Module, nodes: list[Dataset], test: Dataset, *, rounds: int, lr: float, epochs: int,
                  seed: int) -> dict:
    from fedtiny.train import accuracy

    started = time.perf_counter()
    grid = TorchClientGrid(model, nodes, lr=lr, epochs=epochs, seed=seed)
    history, start = [], {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        evaluated = copy.deepcopy(model)
        evaluated.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            logits = evaluated.eval()(torch.as_tensor(test.X))
            loss = float(nn.functional.cross_entropy(logits, torch.as_tensor(test.y)))
        acc = accuracy(evaluated, test.X, test.y)
        if server_round > 0:
            history.append(dict(round=server_round, accuracy=acc, loss=loss))
        else:
            start.update(accuracy=acc, loss=loss)  # the pretrained float model: round 0 of the report's curve
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=len(nodes))
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                   train_config=ConfigRecord({}), evaluate_fn=evaluate)
    params = sum(p.numel() for p in model.parameters())
    return dict(rounds=history, initial_accuracy=start.get("accuracy"),
                bytes_per_node_per_round=grid.bytes_up / max(1, rounds * len(nodes)),
                training_memory_bytes=4 * 2 * params, wall_seconds=time.perf_counter() - started)
