"""The node agents' worker processes of `fedtiny simulate`, started before the run's preparation.

A worker process spends its first seconds importing (numpy, the protocol and its crypto, paho, the agent, the C
binding): about as long as the broker and the rounds' first TASKs take, and on a busy 2-core machine 20 s of wall
time in the default run (BENCHMARKS.md, "fedtiny simulate"). Pretraining runs on one core, so the workers start
when the run does and import on the other core while it pretrains; each then waits for its share of the devices
(simulate._worker's arguments), sent when the plan and the broker exist. What the workers do is unchanged.
"""

import multiprocessing


def _waiting_worker(queue, stop) -> None:
    """A worker process: import what the node agents need, then run simulate._worker on the devices it is given."""
    import numpy  # noqa: F401
    from fedtiny.planfile import load_plan  # noqa: F401
    from fedtiny_device import cruntime  # noqa: F401
    from fedtiny_device.agent import NodeAgent  # noqa: F401

    from .simulate import _worker

    _worker(*queue.get(), stop)


class NodeWorkers:
    """`count` worker processes (spawned, daemonic), importing from the start; `give` each its devices once; `stop`
    (a multiprocessing Event) tells the agents to leave; `close` ends them all."""

    def __init__(self, count: int):
        ctx = multiprocessing.get_context("spawn")
        self.stop = ctx.Event()
        self._queues = [ctx.Queue() for _ in range(count)]
        self._processes = [ctx.Process(target=_waiting_worker, args=(queue, self.stop), daemon=True)
                           for queue in self._queues]
        self._given = 0
        for process in self._processes:
            process.start()

    def give(self, run_dir: str, devices: list[str], broker: str, config: dict) -> None:
        """The next worker hosts the node agents of `devices` (simulate._worker)."""
        self._queues[self._given].put((run_dir, devices, broker, config))
        self._given += 1

    def close(self, timeout: float = 30.0) -> None:
        self.stop.set()
        for process in self._processes[self._given:]:
            process.terminate()  # never given devices: it holds nothing
        for process in self._processes:
            process.join(timeout)
            if process.is_alive():
                process.terminate()
        for queue in self._queues:
            queue.close()
