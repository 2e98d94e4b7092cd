"""The embedded amqtt broker of `fedtiny simulate` in a process of its own.

In the coordinator's process the broker's event loop took about 40 % of that process's samples in a profile of
the default run (py-spy), all of it holding the GIL the coordinator needs to seal TASKs and open DELTAs; in its
own process the two run side by side. The broker is the same EmbeddedBroker (fedtiny.protocol.brokers: the
fleet's passwords and ACL, loopback only); its log and amqtt's go to the run's link.log, as before, and so does
everything else the process writes to stderr: asyncio's and Python's own reports (an exception no task handled,
"Exception ignored in ...", a thread's or the process's dying traceback) would otherwise reach the console of
`fedtiny simulate`, whose terminal keeps the live table and whose output may be a file or a pipe.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from pathlib import Path


def _serve(fleet_dir: str, port: int, log_path: str, ready, stop) -> None:
    _stderr_to(log_path)
    from fedtiny.protocol.brokers import EmbeddedBroker

    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("amqtt", "fedtiny.brokers", "transitions", "asyncio"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
    broker = EmbeddedBroker(fleet_dir, port=port).start()
    ready.set()
    try:
        stop.wait()
    finally:
        broker.stop()


def _stderr_to(log_path: str) -> None:
    """This process's file descriptor 2 and sys.stderr append to log_path (the parent's console keeps neither)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


class BrokerProcess:
    """EmbeddedBroker's start/stop/port, with the broker in a spawned process (ended with the run)."""

    def __init__(self, fleet_dir: str | Path, log_path: str | Path, host: str = "127.0.0.1") -> None:
        from fedtiny.protocol.brokers import free_port

        self.fleet_dir, self.log_path = Path(fleet_dir), Path(log_path)
        self.port = free_port(host)
        self._process = None
        self._stop = None

    def start(self, timeout: float = 60.0) -> BrokerProcess:
        ctx = multiprocessing.get_context("spawn")
        ready, self._stop = ctx.Event(), ctx.Event()
        self._process = ctx.Process(target=_serve, name="fedtiny-broker", daemon=True,
                                    args=(str(self.fleet_dir), self.port, str(self.log_path), ready, self._stop))
        self._process.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if not self._process.is_alive() or time.monotonic() > deadline:
                code = self._process.exitcode
                self.stop()
                raise RuntimeError("the embedded amqtt broker " + (f"exited ({code})" if code is not None else
                                   f"did not start within {timeout:.0f} s") + f"; see {self.log_path}")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self._process is None:
            return
        self._stop.set()
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._process = None
