"""The usual way, for comparison: plain Flower FedAvg with PyTorch fp32 clients updating the full model.

Same task, node data, rounds and local epochs as the fedtiny run. Flower's own FedAvg strategy drives it
through `strategy.start` on an in-process Grid whose nodes are PyTorch clients (a ClientApp's train function,
run in this process or in worker processes as fedtiny's node agents are: no MQTT, no quantization, no
sparsity). Each round a node receives and returns the whole
fp32 model, which is what it would send over the network.
"""

import copy
import multiprocessing
import os
import time
from collections import OrderedDict
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
    """Nodes 1..N, each a PyTorch fp32 client that trains the received model on its own data with SGD.

    `train(tasks)` trains a round's nodes: a list of (state, node index, round) -> a list of (state, examples),
    in order (in this process, or spread over worker processes: the same results either way)."""

    def __init__(self, nodes: list[Dataset], train):
        self._run = Run.create_empty(1)
        ensure_task_identity(1)
        self.nodes, self.train = nodes, train
        self._replies: list[Message] = []
        self.bytes_up = self.bytes_down = 0

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
        # Flower samples a round's nodes in random order, and FedAvg's float sum depends on the order of its
        # terms (last bits of the global model): train and reply in node order, so a seed gives one result.
        messages = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        tasks = []
        for msg in messages:
            arrays = msg.content["arrays"]
            self.bytes_down += sum(a.numpy().nbytes for a in arrays.values())
            round_ = int(msg.content["config"]["server-round"])
            tasks.append(({k: a.numpy() for k, a in arrays.items()}, msg.metadata.dst_node_id - 1, round_))
        ids = []
        for msg, (state, n) in zip(messages, self.train(tasks), strict=True):
            trained = ArrayRecord(OrderedDict((k, torch.from_numpy(v)) for k, v in state.items()))
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


def train_node(model: nn.Module, state: dict[str, np.ndarray], data: Dataset, round_: int, *, lr: float, epochs: int,
               seed: int) -> tuple[dict[str, np.ndarray], int]:
    """One node's round: `model` with `state`, SGD at batch 1 over its data, `epochs` seeded permutations."""
    model = copy.deepcopy(model)
    model.load_state_dict(OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state.items()))
    model.eval()  # batch norm statistics stay those of pretraining, as on the devices
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xt, yt = torch.as_tensor(data.X), torch.as_tensor(data.y)
    for epoch in range(epochs):
        for j in np.random.default_rng([seed, round_, epoch]).permutation(len(xt)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[j:j + 1]), yt[j:j + 1]).backward()
            opt.step()
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, len(xt)


_WORKER: dict = {}  # a baseline worker process's model, node data and settings (_start_worker)


def _start_worker(model: nn.Module, nodes: list[Dataset], settings: dict) -> None:
    torch.set_num_threads(1)
    _WORKER.update(model=model, nodes=nodes, settings=settings)


def _train_in_worker(task: tuple) -> tuple[dict[str, np.ndarray], int]:
    state, index, round_ = task
    return train_node(_WORKER["model"], state, _WORKER["nodes"][index], round_, **_WORKER["settings"])


def _worker_pid(_) -> int:
    time.sleep(0.05)  # long enough that every worker takes one of the first tasks
    return os.getpid()


def run_baseline(model: nn.Module, nodes: list[Dataset], test: Dataset, *, rounds: int, lr: float, epochs: int,
                 seed: int, workers: int = 1, note=None) -> dict:
    """Flower FedAvg over PyTorch fp32 clients; returns per-round held-out accuracy/loss and totals.

    Thread settings as fedtiny's: PyTorch runs on one thread per process, as each fedtiny worker process trains
    one node at a time on one core (at batch 1 more threads only contend: on a busy 2-core machine a step took
    124-756 ms with torch's default threads, 6-11 ms with one); `workers` > 1 trains a round's nodes in that
    many processes, as fedtiny's --workers node processes do. The results do not depend on `workers`.
    `note` hears a line per round. Times: wall_seconds (everything, the workers' start included) and
    rounds_seconds (from the first round's start, after the initial evaluation, to the last round's end: the
    scope of fedtiny's own rounds_seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = None
    try:
        started = time.perf_counter()
        settings = dict(lr=lr, epochs=epochs, seed=seed)
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers, _start_worker, (model, nodes, settings))
            for _ in range(10):  # wait until every worker has started (and imported torch)
                if len(set(pool.map(_worker_pid, range(2 * workers), chunksize=1))) == workers:
                    break

            def train(tasks):
                return pool.map(_train_in_worker, tasks, chunksize=1)
        else:
            def train(tasks):
                return [train_node(model, state, nodes[index], round_, **settings) for state, index, round_ in tasks]

        result = _run_baseline(model, TorchClientGrid(nodes, train), test, rounds=rounds, note=note)
        return dict(result, wall_seconds=time.perf_counter() - started)
    finally:
        if pool is not None:
            pool.terminate()
        torch.set_num_threads(threads)


def _run_baseline(model: nn.Module, grid: TorchClientGrid, test: Dataset, *, rounds: int, note) -> dict:
    from fedtiny.train import logits as float_logits

    history, start = [], {}
    clock = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        evaluated = copy.deepcopy(model)
        evaluated.load_state_dict(arrays.to_torch_state_dict())
        logits = float_logits(evaluated, test.X)  # one forward pass for the loss and the accuracy
        loss = float(nn.functional.cross_entropy(logits, torch.as_tensor(test.y)))
        acc = float((logits.argmax(1).numpy() == np.asarray(test.y)).mean())
        now = time.perf_counter()
        if server_round > 0:
            history.append(dict(round=server_round, accuracy=acc, loss=loss, seconds=now - clock["round"]))
            if note:
                note(f"baseline round {server_round}/{rounds}: accuracy {100 * acc:.1f} %, loss {loss:.3f}, "
                     f"{now - clock['round']:.1f} s")
        else:
            start.update(accuracy=acc, loss=loss)  # the pretrained float model: round 0 of the report's curve
            clock["start"] = now
        clock["round"] = now
        return MetricRecord({"accuracy": acc, "loss": loss})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=len(grid.nodes))
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                   train_config=ConfigRecord({}), evaluate_fn=evaluate)
    params = sum(p.numel() for p in model.parameters())
    return dict(rounds=history, initial_accuracy=start.get("accuracy"),
                bytes_per_node_per_round=grid.bytes_up / max(1, rounds * len(grid.nodes)),
                training_memory_bytes=4 * 2 * params, rounds_seconds=clock["round"] - clock["start"])
