"""Start and stop MQTT brokers on loopback: the embedded amqtt broker (in-process, used by `fedtiny simulate`
and tests) and a mosquitto subprocess configured for a provisioned fleet (TLS, client certificates, ACL).

This is transport plumbing, kept out of the sans-IO protocol core.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

log = logging.getLogger("fedtiny.brokers")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


class EmbeddedBroker:
    """An amqtt broker (MQTT 3.1.1) for a provisioned fleet on its own event-loop thread, bound to loopback only.

    Like mosquitto with mosquitto_config: every client logs in with its name and the password from the fleet
    folder (broker/passwd, no anonymous access) and obeys the fleet's ACL on publish, subscribe, delivery and
    last will (see amqtt_fleet.FleetBroker). amqtt's default bind is 0.0.0.0:1883, so the address is always
    given explicitly here.
    """

    def __init__(self, fleet_dir: str | Path, host: str = "127.0.0.1", port: int | None = None,
                 plugins: dict | None = None) -> None:
        """`plugins`: more amqtt plugins, {"module.Class": its config} (a simulation's payload capture)."""
        self.fleet_dir = Path(fleet_dir)
        self.plugins = dict(plugins or {})
        self.fleet = json.loads((self.fleet_dir / "fleet.json").read_text())["fleet"]
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        from fedtiny.protocol.amqtt_fleet import FleetBroker

        logging.getLogger("amqtt").setLevel(logging.WARNING)
        config = {"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                  "plugins": self.plugins}
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.set_exception_handler(_log_loop_exception)

            async def boot() -> None:
                self._broker = FleetBroker(config, self.fleet, self.fleet_dir / "broker/passwd")
                await self._broker.start()  # returns once its listener is bound

            try:
                loop.run_until_complete(boot())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            # amqtt's shutdown leaves tasks behind (a broadcast waiting on its queue): end them before closing
            # the loop, or Python prints "Exception ignored in: <coroutine ...>" with a traceback when it
            # collects them later.
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError("amqtt broker did not start")
        if failure:
            raise RuntimeError("amqtt broker failed to start") from failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            future.result(timeout)
        except concurrent.futures.CancelledError:
            # amqtt 0.11 cancels its broker's tasks while shutting down, and at times the shutdown task with them
            # (seen once, tearing down a test fixture), maybe before it closed its listeners: close them here,
            # or the port stays bound after the loop stops.
            log.warning("amqtt cancelled its own shutdown; closing its listeners")
            closing = asyncio.run_coroutine_threadsafe(self._close_listeners(), self._loop)
            closing.result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._loop = self._broker = None

    async def _close_listeners(self) -> None:
        for server in getattr(self._broker, "_servers", {}).values():  # amqtt's listeners, by name
            await server.close_instance()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """An exception that no task of the broker handled (amqtt 0.11 has had such bugs, see amqtt_fleet): one
    line in our log, the traceback at debug level, rather than asyncio's traceback on the console of `fedtiny
    simulate` (whose logs go to files in the run folder)."""
    exc = context.get("exception")
    log.warning("amqtt: %s%s", context.get("message", "unhandled exception"), f": {exc!r}" if exc else "")
    log.debug("amqtt traceback", exc_info=exc)


def mosquitto_config(
    fleet_dir: str | Path,
    port: int,
    password_port: int | None = None,
    host: str = "127.0.0.1",
    run_as_root: bool = False,
    max_packet_size: int = 0,
    persistence_dir: str | Path | None = None,
    autosave_interval: int = 60,
) -> str:
    """A mosquitto 2.0 config for a fleet provisioned by keys.provision_fleet; it reads only fleet_dir/broker/.

    `port`: TLS with required client certificates, the certificate CN is the username (devices, coordinator).
    `password_port`: optional TLS listener that authenticates with the password file instead.
    On both listeners the client id is forced to the username, so no client can take over another's session by
    connecting with its client id (mosquitto disconnects the older connection of a client id, and a clean start
    would wipe the coordinator's queued uplinks). Both share the ACL and the CRL (broker/crl.pem: revoked client
    certificates; mosquitto 2.0.11 reads it at start and on SIGHUP, see MosquittoProcess.reload). Mosquitto started
    as root drops to user `mosquitto`, which cannot read the 0600 key files; run_as_root keeps it root (tests, and
    `fedtiny simulate` run as root: a broker on loopback for the run's own files).
    `persistence_dir`: keep sessions, subscriptions, queued QoS 1 messages (a sleeping device's downlinks) and
    retained STATUS messages across broker restarts, in DIR/mosquitto.db, saved every `autosave_interval`
    seconds and at a clean shutdown: a broker killed without warning loses what changed since the last save.
    """
    d = Path(fleet_dir).resolve() / "broker"
    tls = [
        f"cafile {d / 'ca.crt'}",
        f"crlfile {d / 'crl.pem'}",
        f"certfile {d / 'broker.crt'}",
        f"keyfile {d / 'broker.key'}",
        "tls_version tlsv1.2",
        "use_username_as_clientid true",
    ]
    lines = [
        "# written by fedtiny.protocol.brokers.mosquitto_config",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {d / 'passwd'}",
        f"acl_file {d / 'acl'}",
        "set_tcp_nodelay true",
        *(["persistence true", f"persistence_location {Path(persistence_dir).resolve()}/",
           f"autosave_interval {autosave_interval}"] if persistence_dir else ["persistence false"]),
        # A coordinator reading every uplink must not lose messages to the default queue limit of 1000.
        "max_queued_messages 100000",
        "max_inflight_messages 0",
        *(["user root"] if run_as_root else []),
        *([f"max_packet_size {max_packet_size}"] if max_packet_size else []),
        "",
        f"listener {port} {host}",
        *tls,
        "require_certificate true",
        "use_identity_as_username true",
    ]
    if password_port:
        lines += ["", f"listener {password_port} {host}", *tls]
    return "\n".join(lines) + "\n"


def mosquitto_binary() -> str | None:
    """The mosquitto executable: on PATH, or where Debian installs it (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return found if Path(found).is_file() else None


class MosquittoProcess:
    """mosquitto -c CONFIG as a child process; its log goes to log_path."""

    def __init__(self, config_path: str | Path, port: int, host: str = "127.0.0.1", log_path: str | Path | None = None):
        self.config_path = Path(config_path)
        self.host = host
        self.port = port
        self.log_path = Path(log_path) if log_path else self.config_path.with_suffix(".log")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        if self.process is not None and self.process.poll() is None:
            return self  # already running: `with MosquittoProcess(...).start():` must not start a second one
        binary = mosquitto_binary() or "mosquitto"
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen([binary, "-c", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            deadline = time.monotonic() + timeout
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.log_path.read_text(errors='replace')}")
                try:
                    wait_for_port(self.host, self.port, 0.1)
                    return self
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
        except BaseException:
            self.stop()
            raise

    def reload(self, timeout: float = 5.0) -> None:
        """SIGHUP, as after `fedtiny keys` changed the broker folder; returns once mosquitto has logged the reload.

        Mosquitto 2.0.11 then re-reads the password file, the ACL and the CRL: new TLS handshakes are checked
        against the new CRL, password logins whose line is gone are disconnected, and connections made before
        stay open but every later message is checked against the new ACL. Mosquitto reloads in its single
        event loop, so a connection made after this returns sees the new files."""
        marker = "Reloading config."
        before = self.log_path.read_text(errors="replace").count(marker)
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log_path.read_text(errors="replace").count(marker) <= before:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise TimeoutError("mosquitto did not log its reload")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
