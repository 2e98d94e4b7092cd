"""The embedded amqtt broker of `fedtiny simulate` in a process of its own.

In the coordinator's process the broker's event loop took about 40 % of that process's samples in a profile of
the default run (py-spy), all of it holding the GIL the coordinator needs to seal TASKs and open DELTAs; in its
own process the two run side by side. The broker is the same EmbeddedBroker (fedtiny.protocol.brokers: the
fleet's passwords and ACL, loopback only); its log and amqtt's go to the run's link.log, as before, and so does
everything else the process writes to stderr: asyncio's and Python's own reports (an exception no task handled,
"Exception ignored in ...", a thread's or the process's dying traceback) would otherwise reach the console of
`fedtiny simulate`, whose terminal keeps the live table and whose output may be a file or a pipe.

With a capture file (`fedtiny simulate --capture`), PayloadCapture records every PUBLISH the broker received, on the
broker's side: one JSON line per message (time, client id, topic, QoS, retain, the payload in base64), also those
the ACL then refused, and each client's last will as it connects (the broker publishes it on the client's behalf).
`fedtiny privacy-report` scans them for raw samples (simulations/privacy_report.py).
"""

from __future__ import annotations

import base64
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from amqtt.plugins.base import BasePlugin


class PayloadCapture(BasePlugin):
    """An amqtt plugin: each message a client publishes to the broker, as one line of `path` (flushed per line, so
    that a run cut short keeps what was carried until then)."""

    @dataclass
    class Config:
        path: str

    def __init__(self, context) -> None:
        super().__init__(context)
        self._file = open(self.config.path, "a", encoding="ascii")  # noqa: SIM115 (open for the broker's life)

    def _write(self, client_id, topic, payload, qos, retain, kind: str) -> None:
        if self._file.closed:
            return
        self._file.write(json.dumps({"t": round(time.time(), 6), "client": client_id, "topic": topic, "qos": qos,
                                     "retain": bool(retain), "kind": kind,
                                     "payload": base64.b64encode(bytes(payload or b"")).decode("ascii")}) + "\n")
        self._file.flush()

    async def on_broker_message_received(self, *, client_id, message) -> None:
        if message is not None:
            retain = message.publish_packet.retain_flag if message.publish_packet else False
            self._write(client_id, message.topic, message.data, message.qos, retain, "publish")

    async def on_broker_client_connected(self, *, client_id, client_session) -> None:
        if client_session.will_flag and client_session.will_message:
            self._write(client_id, client_session.will_topic, client_session.will_message, client_session.will_qos,
                        client_session.will_retain, "last will")

    async def on_broker_post_shutdown(self) -> None:
        self._file.close()


def _serve(fleet_dir: str, port: int, log_path: str, ready, stop, capture: str | None = None) -> None:
    _stderr_to(log_path)
    from fedtiny.protocol.brokers import EmbeddedBroker

    from .stop import wait_for_stop

    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("amqtt", "fedtiny.brokers", "transitions", "asyncio"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
    plugins = {f"{__name__}.PayloadCapture": {"path": capture}} if capture else None
    broker = EmbeddedBroker(fleet_dir, port=port, plugins=plugins).start()
    ready.set()
    try:
        wait_for_stop(stop)
    finally:
        broker.stop()


def _stderr_to(log_path: str) -> None:
    """This process's file descriptor 2 and sys.stderr append to log_path (the parent's console keeps neither)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


class BrokerProcess:
    """EmbeddedBroker's start/stop/port, with the broker in a spawned process (ended with the run); `capture`: a
    file for every payload it carries (PayloadCapture)."""

    def __init__(self, fleet_dir: str | Path, log_path: str | Path, host: str = "127.0.0.1",
                 capture: str | Path | None = None) -> None:
        from fedtiny.protocol.brokers import free_port

        self.fleet_dir, self.log_path = Path(fleet_dir), Path(log_path)
        self.capture = str(capture) if capture else None
        self.port = free_port(host)
        self._process = None
        self._stop = None

    def start(self, timeout: float = 60.0) -> BrokerProcess:
        ctx = multiprocessing.get_context("spawn")
        ready, self._stop = ctx.Event(), ctx.Event()
        self._process = ctx.Process(target=_serve, name="fedtiny-broker", daemon=True,
                                    args=(str(self.fleet_dir), self.port, str(self.log_path), ready, self._stop,
                                          self.capture))
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
