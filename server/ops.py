"""Operations: JSON-lines logs and a Prometheus text-format metrics endpoint (stdlib only).

Every coordinator event is one JSON object per line: {"ts": ..., "level": ..., "event": ..., fields...}.
The endpoint serves `GET /metrics` (text format 0.0.4) on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = logging.getLogger("fedtiny.coordinator")


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "event": getattr(record, "event", None) or record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=_plain, separators=(",", ":"))


def _plain(value):
    try:
        return value.item()  # numpy scalars
    except AttributeError:
        return str(value)


def event(name: str, level: int = logging.INFO, **fields) -> None:
    """Log one structured event."""
    LOG.log(level, name, extra={"event": name, "fields": fields})


def setup_json_logging(stream=None, level: int = logging.INFO) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLinesFormatter())
    LOG.addHandler(handler)
    LOG.setLevel(level)
    LOG.propagate = False
    return handler


@contextmanager
def json_logging(stream=None, level: int = logging.INFO):
    """setup_json_logging for a `with` block: the handler comes off and the logger's level and propagation are put
    back after it (tests and benchmarks that read one run's events)."""
    propagate, old_level = LOG.propagate, LOG.level
    handler = setup_json_logging(stream, level)
    try:
        yield handler
    finally:
        LOG.removeHandler(handler)
        LOG.propagate, LOG.level = propagate, old_level


@contextmanager
def log_to(path, *loggers: str):
    """Send these loggers (and their children) to a file, and only there, until the block ends: a run's folder
    keeps its components' logs while the terminal keeps the live table."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = [(logging.getLogger(name), logging.getLogger(name).propagate) for name in loggers]
    for logger, _ in saved:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, propagate in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate
        handler.close()


# --- metrics -------------------------------------------------------------------------------------------------

_HELP = {
    "fedtiny_rounds_total": ("counter", "Federated rounds completed."),
    "fedtiny_round": ("gauge", "Current (last completed) round."),
    "fedtiny_model_version": ("gauge", "Global model version."),
    "fedtiny_replies_accepted_total": ("counter", "Device replies accepted into a round."),
    "fedtiny_replies_rejected_total": ("counter", "Device replies discarded, by reason."),
    "fedtiny_messages_rejected_total": ("counter", "Messages the fleet link refused (forged, replayed, oversized, "
                                                   "flooding, revoked, ...), by reason."),
    "fedtiny_devices_online": ("gauge", "Devices seen recently and online."),
    "fedtiny_devices_registered": ("gauge", "Devices ever seen."),
    "fedtiny_uplink_bytes_total": ("counter", "MQTT payload bytes of accepted and rejected DELTA transfers."),
    "fedtiny_downlink_bytes_total": ("counter", "MQTT payload bytes of TASK and GLOBAL_UPDATE transfers."),
    "fedtiny_aggregation_seconds": ("summary", "Seconds spent in strategy aggregation per round."),
    "fedtiny_round_seconds": ("summary", "Wall seconds per round."),
    "fedtiny_eval_accuracy": ("gauge", "Server-side held-out accuracy of the global model."),
    "fedtiny_eval_loss": ("gauge", "Server-side held-out loss of the global model."),
}


class Metrics:
    """Thread-safe counters, gauges and summaries keyed by (name, labels)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float] = {}

    @staticmethod
    def _key(name: str, labels: dict | None) -> tuple[str, tuple]:
        return name, tuple(sorted((labels or {}).items()))

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        with self._lock:
            key = self._key(name, labels)
            self._values[key] = self._values.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values[self._key(name, labels)] = float(value)

    def observe(self, name: str, value: float) -> None:
        self.inc(name + "_sum", value)
        self.inc(name + "_count", 1)

    def get(self, name: str, **labels) -> float:
        with self._lock:
            return self._values.get(self._key(name, labels), 0.0)

    def render(self) -> str:
        with self._lock:
            items = sorted(self._values.items())
        lines, described = [], set()
        for (name, labels), value in items:
            family = name.removesuffix("_sum").removesuffix("_count") if name not in _HELP else name
            if family not in described and family in _HELP:
                kind, text = _HELP[family]
                lines += [f"# HELP {family} {text}", f"# TYPE {family} {kind}"]
                described.add(family)
            label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {_number(value)}" if label_text else f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


class MetricsServer:
    """`GET /metrics` on host:port in a daemon thread; port 0 picks a free one (see .port)."""

    def __init__(self, metrics: Metrics, port: int, host: str = "127.0.0.1") -> None:
        registry = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = registry.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep stderr quiet; requests are not events
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
