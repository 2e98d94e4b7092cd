"""`fedtiny simulate --engine flower`: the same devices as ClientApps in Flower's simulation engine on Ray.

    ServerApp  the coordinator of `--engine mqtt`, unchanged (server/: Coordinator, FleetGrid, the strategy of
               make_strategy, held-out evaluation, SQLite checkpoints). Only its link differs: GridLink carries
               each TASK and GLOBAL_UPDATE body to a device through the Grid Flower hands the ServerApp, and
               brings back the device's DELTA body, which it decodes with fleet.decode_update.
    ClientApp  one simulated device per SuperNode, with the node agent's logic: it applies the GLOBAL_UPDATE as
               DeviceSession does, trains the TASK with LocalTraining (its own data and seed, training_order,
               the C trainer when built) and answers with the DELTA body fleet.encode_update builds. Between
               rounds its Context keeps what a device keeps in flash: model version, global state, rng counter.

The bodies are the plaintexts a device would seal. There is no MQTT link, so there is no envelope (header,
EdDSA signature, AEAD tag) and no chunk header: the report's bytes are the bodies alone. A JOIN query first
maps Flower's node ids to device names (Flower does not tell a ServerApp which partition a node holds).

Rounds run in the virtual time of the MQTT engine (simulate.virtual_arrivals, given to the coordinator's
FleetGrid): the coordinator waits for every reply that is due, however slow Ray is, and admits those that arrive
virtually by the round's close. A round never closes because Ray was slow, and the same seed gives the MQTT
engine's rounds, dropouts and stragglers included.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

import numpy as np

from fedtiny.compiler import Plan
from fedtiny.planfile import plan_hash
from fedtiny.protocol import topics
from fedtiny.protocol.coordinator import DeviceInfo, DeviceReply, Rejection
from fedtiny.protocol.update import SentStates, decode_update
from fedtiny.protocol.task import task_body
from fedtiny.protocol.messages import Delta, GlobalUpdate

from . import nodefile

log = logging.getLogger("fedtiny.flower_engine")

EXTRA = "simulation"
MISSING_RAY = (f"--engine flower needs Ray: install fedtiny's `{EXTRA}` extra (pip install 'fedtiny[{EXTRA}]', "
               f"or pip install -e '.[{EXTRA}]' in a checkout; it adds flwr[simulation]==1.42.*)")


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def check_config(config) -> None:
    """Refuse, before any work, what this engine cannot do (simulate.ConfigError)."""
    from .simulate import ConfigError, semi_asynchronous

    if not ray_available():
        raise ConfigError(MISSING_RAY)
    if config.broker or config.fleet_dir:
        raise ConfigError("--broker and --fleet-dir are for --engine mqtt: the flower engine has no MQTT link")
    if config.realtime:
        raise ConfigError("--realtime is for --engine mqtt: the flower engine runs rounds in virtual time")
    if config.stragglers and semi_asynchronous(config):
        raise ConfigError("--stragglers with semi-asynchronous rounds (--strategy fedbuff, --max-staleness) needs "
                          "--engine mqtt: they run on the wall clock, where the flower engine's devices never lag")


# --- the coordinator's side: a link over Flower's Grid ------------------------------------------------------

class GridLink:
    """A FleetLink (fedtiny.protocol.coordinator) over the Grid of a Flower run.

    `strict`: a ClientApp that fails (Flower's error reply) ends the simulation with its reason; otherwise
    (fault injection) it counts as a device that dropped out.
    """

    def __init__(self, grid, plan: Plan, *, chunk_size: int, strict: bool = True, poll: float = 0.02) -> None:
        self.grid = grid
        self.plan = plan
        self.chunk_size = chunk_size
        self.strict = strict
        self.poll = poll
        self._plan_hash = plan_hash(plan)
        self._registry: dict[str, DeviceInfo] = {}
        self._nodes: dict[str, int] = {}  # device name -> Flower node id
        self._versions: dict[str, int] = {}  # the model version each device said it holds
        self._sent = SentStates(plan)
        self._outstanding: dict[str, str] = {}  # Flower message id -> device
        self._pulled: list[DeviceReply] = []  # replies pulled while settling a device, for the next replies()
        self.failures: list[tuple[str, str]] = []  # (device, reason) of ClientApps that failed

    def start(self) -> GridLink:
        return self

    def close(self) -> None:
        pass

    def join(self, expected: int, timeout: float = 600.0) -> None:
        """Ask every SuperNode which device it is (the JOIN of the MQTT link: name, plan hash, model version)."""
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        end = time.monotonic() + timeout
        while len(nodes := list(self.grid.get_node_ids())) < expected:  # the engine registers them meanwhile
            if time.monotonic() > end:
                raise RuntimeError(f"Flower registered {len(nodes)} of {expected} SuperNodes in {timeout:.0f} s")
            time.sleep(0.05)
        asks = [Message(RecordDict({"join": ConfigRecord({})}), node, MessageType.QUERY) for node in nodes]
        replies = list(self.grid.send_and_receive(asks, timeout=timeout))
        failed = [m.error.reason for m in replies if m.has_error()]
        if failed or len(replies) != expected:
            raise RuntimeError(f"{expected - len(replies) + len(failed)} of {expected} simulated devices did not "
                               f"join: {failed[:1] or 'no reply'}")
        for m in replies:
            c = m.content["join"]
            device = str(c["device"])
            info = DeviceInfo(device, topics.name_id(device), int(c["memory-budget"]), bytes(c["plan-hash"]),
                              time.monotonic(), True)
            if any(d.device_id == info.device_id for d in self._registry.values()):
                raise RuntimeError(f"device id of {device} collides with another device's: rename the devices")
            self._registry[device] = info
            self._nodes[device] = m.metadata.src_node_id
            self._versions[device] = int(c["model-version"])

    def devices(self, seen_within: float | None = None) -> list[DeviceInfo]:
        return sorted(self._registry.values(), key=lambda d: d.device)

    def rejections(self) -> list[Rejection]:
        return []  # Flower delivers bodies from its own nodes: nothing is forged, replayed or malformed

    def durable_state(self) -> dict | None:
        return None  # no envelopes, no seqs: nothing a restart must not forget

    def restore(self, state: dict, status_streams: bool = True) -> None:
        pass

    def send_task(self, device: str, round: int, model_version: int,
                  global_state: dict[str, np.ndarray] | None, config: dict[str, float]) -> int:
        """TASK (and, unless the device holds model_version, a GLOBAL_UPDATE of the channels changed since the
        version it holds, as CoordinatorLink sends) to one device; returns the bytes of the two bodies."""
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        if device not in self._nodes:
            raise ValueError(f"{device} did not join")
        self._settle(device)
        update = b""
        if global_state is not None:
            body = self._sent.update(self._versions.get(device), model_version, global_state)
            update = b"" if body is None else body.encode()
        task = task_body(self.plan, self._plan_hash, config, self.chunk_size).encode()
        content = ConfigRecord({"round": int(round), "model-version": int(model_version), "global-update": update,
                                "task": task})
        message = Message(RecordDict({"task": content}), self._nodes[device], MessageType.TRAIN)
        (message_id,) = self.grid.push_messages([message])
        self._outstanding[message_id] = device
        return len(update) + len(task)

    def replies(self, timeout: float) -> list[DeviceReply]:
        """Replies that arrived; waits up to `timeout` seconds for one."""
        end = time.monotonic() + timeout
        while True:
            self._pulled += self._pull()
            if self._pulled or time.monotonic() >= end:
                out, self._pulled = self._pulled, []
                return out
            time.sleep(min(self.poll, max(0.0, end - time.monotonic())))

    def _settle(self, device: str, timeout: float = 600.0) -> None:
        """Wait until the device's last message is answered: a device that dropped out answers with an empty body
        and the version it now holds, which the next GLOBAL_UPDATE must start from (the round did not wait for
        it: it was not due)."""
        end = time.monotonic() + timeout
        while device in self._outstanding.values():
            if time.monotonic() > end:
                raise RuntimeError(f"the ClientApp of {device} did not answer within {timeout:.0f} s")
            self._pulled += self._pull()
            time.sleep(self.poll)

    def _pull(self) -> list[DeviceReply]:
        if not self._outstanding:
            return []
        out = []
        for m in self.grid.pull_messages(list(self._outstanding)):
            device = self._outstanding.pop(m.metadata.reply_to_message_id)
            if m.has_error():
                self.failures.append((device, m.error.reason))
                if self.strict:
                    raise RuntimeError(f"the ClientApp of {device} failed: {m.error.reason}")
                log.warning("the ClientApp of %s failed: %s", device, m.error.reason)
                continue
            c = m.content["delta"]
            self._versions[device] = int(c["held-version"])
            body = bytes(c["delta"])
            if not body:  # it dropped out of the round (fault injection): a device that never answers
                continue
            delta = Delta.decode(body)
            values, metrics = decode_update(self.plan, delta)
            out.append(DeviceReply(device, int(c["round"]), int(c["model-version"]), values, delta.num_examples,
                                   metrics, len(body)))
        return out


# --- the device's side: a ClientApp per simulated device ----------------------------------------------------

def device_app(run_dir: str, trainer: str, seed: int, dropout: float):
    """The ClientApp of every simulated device: its plan and data are the files of `run_dir` (plan.ftp,
    nodes/<device>.npz), as a device has them in flash."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def join(msg: Message, context: Context) -> Message:
        device = _Device(Path(run_dir), context)
        reply = ConfigRecord({"device": device.name, "model-version": device.model_version,
                              "plan-hash": plan_hash(device.plan), "memory-budget": int(device.plan.arena_size)})
        return Message(RecordDict({"join": reply}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        device = _Device(Path(run_dir), context)
        reply = device.train(msg.content["task"], trainer, seed, dropout)
        device.save()
        return Message(RecordDict({"delta": ConfigRecord(reply)}), reply_to=msg)

    return app


class _Device:
    """One device's state between rounds (kept in its Flower Context) and its part of a round."""

    def __init__(self, run: Path, context) -> None:
        from fedtiny.planfile import load_plan

        from .simulate import device_name

        self.run = run
        self.context = context
        self.plan = load_plan(run / "plan.ftp")
        self.name = device_name(int(context.node_config["partition-id"]))
        saved = context.state.config_records.get("device")
        if saved is None:  # as flashed: version 0, the plan's initial state, a fresh random stream
            self.model_version, self.rng_counter = 0, None
            self.global_state = self.plan.initial_state()
        else:
            self.model_version = int(saved["model-version"])
            self.rng_counter = int(saved["rng-counter"]) if saved["rng-counter"] else None  # "": never trained
            self.global_state = {k: v.numpy() for k, v in context.state.array_records["global"].items()}
        kept = context.state.array_records.get("carry")  # the change kept back from the last DELTA
        self.carry = {k: v.numpy() for k, v in kept.items()} if kept is not None else None

    def save(self) -> None:
        from flwr.app import Array, ArrayRecord, ConfigRecord

        counter = "" if self.rng_counter is None else str(self.rng_counter)  # a u64: more than a ConfigRecord int
        self.context.state["device"] = ConfigRecord({"model-version": self.model_version, "rng-counter": counter})
        self.context.state["global"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in self.global_state.items()})
        if self.carry is not None:
            self.context.state["carry"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in self.carry.items()})

    def train(self, content, trainer: str, seed: int, dropout: float) -> dict:
        from fedtiny.protocol.device import TrainJob
        from fedtiny.protocol.messages import Task
        from fedtiny.protocol.noise import NoiseStream, noise_key
        from fedtiny.protocol.task import task_settings
        from fedtiny.protocol.update import apply_global_update, uplink
        from fedtiny_device.agent import LocalTraining

        round_, version = int(content["round"]), int(content["model-version"])
        update = bytes(content["global-update"])
        if update:  # as DeviceSession._updated_state
            self.global_state = apply_global_update(self.plan, self.global_state, self.model_version,
                                                    GlobalUpdate.decode(update))
            self.model_version = version
        task = Task.decode(bytes(content["task"]))
        if task.plan_hash != plan_hash(self.plan):
            raise RuntimeError(f"{self.name}: TASK for another training plan")
        if version != self.model_version:
            raise RuntimeError(f"{self.name}: TASK for version {version} without its GLOBAL_UPDATE")
        reply = {"round": round_, "model-version": version, "held-version": self.model_version, "delta": b""}
        if dropout > 0:
            from .simulate import _fails

            if _fails(seed, self.name, round_, dropout):
                return reply  # failed this round: no DELTA
        settings = task_settings(task)
        job = TrainJob(round_, version, int(settings["epochs"]), int(settings["steps"]),
                       {k: v.copy() for k, v in self.global_state.items()}, settings["uplink_keep"],
                       settings["clip_norm"], settings["noise_sigma"])
        samples = nodefile.load(self.run / "nodes" / f"{self.name}.npz")
        factory = None
        if trainer == "c":
            from fedtiny_device.cruntime import CTrainer as factory
        training = LocalTraining(self.plan, samples.x, samples.y, samples.seed, factory, self.rng_counter,
                                 samples.evaluation)
        result = training.run(job)
        self.rng_counter = result.rng_counter
        # DP noise (a TASK's noise_sigma): this ClientApp has no identity key, so its noise key comes from the
        # node's name and seed: reproducible, and secret only as far as a simulation's seeds are
        noise = NoiseStream(noise_key(f"{self.name}:{samples.seed}".encode()), 0, round_) \
            if job.noise_sigma > 0 else None
        body, self.carry = uplink(self.plan, job.base, result.state, self.carry, keep=job.uplink_keep,
                                  clip_norm=job.clip_norm, num_examples=result.num_examples, loss=result.loss,
                                  accuracy=result.accuracy, personal_accuracy=result.personal_accuracy,
                                  noise_sigma=job.noise_sigma, noise=noise)
        reply["delta"] = body.encode()
        return reply


# --- running it ---------------------------------------------------------------------------------------------

def backend_config(cpus: int, address: str | None = None) -> dict:
    """Ray kept light: `cpus` CPUs, one per ClientApp (so `cpus` devices train at once), a small object store,
    no dashboard, workers' output kept out of the terminal's live table. With `address` (RAY_ADDRESS), the
    ClientApps run on that cluster's CPUs instead: its nodes need fedtiny installed and the run folder at the
    same path (a shared filesystem), where each device finds its plan and data."""
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    local = {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False, "object_store_memory": 100 * 2**20}
    return {"init_args": dict(quiet, address=address) if address else dict(quiet, **local),
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}


def run_engine(config, run: Path, plan: Plan, devices: list[str], coordinate) -> list[dict]:
    """Start Flower's simulation engine with a SuperNode per device; its ServerApp joins the devices and calls
    `coordinate(link)` (the coordinator's rounds); returns what that returns."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a plant network has no internet
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs here: and no FutureWarning about it
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    server = ServerApp()
    result: dict = {}

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        link = GridLink(grid, plan, chunk_size=config.chunk_size, strict=config.dropout == 0)
        link.join(len(devices))
        result["rounds"] = coordinate(link)

    run_simulation(server, device_app(str(run.resolve()), config.trainer, config.seed, config.dropout),
                   num_supernodes=len(devices),
                   backend_config=backend_config(config.workers, os.environ.get("RAY_ADDRESS") or None))
    if "rounds" not in result:
        raise RuntimeError("Flower's simulation ended before its rounds did (see the log above)")
    return result["rounds"]
