"""`fedtiny simulate`: the whole system on one machine, with the parts a plant would run.

The host pretrains (or loads a cached) float model, quantizes and compiles it for the budget, and writes each
node's data. Then one of two engines runs the rounds; both drive the same coordinator (server/: Coordinator,
FleetGrid, the Flower strategy) and the same node logic (device_runtime/agent.py: LocalTraining with the C
trainer when a compiler is present, the DELTA from fleet.encode_update):

    mqtt    (default) the fleet's keys, a broker (mosquitto on loopback where installed, else the embedded
            amqtt in its own process, or --broker), the coordinator in this process and the node agents in worker processes: rounds over MQTT
            exactly as on devices.
    flower  the devices as ClientApps in Flower's simulation engine on Ray (flower_engine.py), for thousands
            of nodes or a Ray cluster; no MQTT link, so no envelopes.

Both run rounds in virtual time (virtual_arrivals: how long each node's round takes, by seeded rules; the
coordinator admits the replies that arrive virtually by the round's close), so a seed gives the same rounds on any
machine under any load; --realtime puts them on the wall clock. A round's progress, accuracy and bytes are printed
live (or as JSON lines, or not at all), and a report folder is written at the end.
"""

import json
import math
import multiprocessing
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import nodefile
from .scenarios import (Task, check_model, fed_as_model_file, host_split, is_model_file, load_task, pretrained,
                        unseen_halves)


@dataclass
class SimulationConfig:
    nodes: int = 50
    rounds: int = 10
    scenario: str = "industrial"
    data: str | None = None
    model: str | None = None  # zoo name; default: the scenario's
    strategy: str = "fedavg"
    # "auto": the scheme that learns most within the budget, measured on the host's held-out data (fedtiny.search,
    # cached by content; BENCHMARKS "Scheme search"), else a scheme's text (fedtiny.scheme)
    scheme: str = "auto"
    budget: int = 256 * 1024
    reserve: int | None = None  # default: fedtiny.compiler.reserve_for's rule (64 KB, at most a quarter of budget)
    lr: float | None = None  # default: chosen on the host's validation data (tuning.py)
    epochs: int | None = None  # default: chosen with lr
    uplink_keep: float = 0.5  # each DELTA carries the larger half of each tensor's changes; the rest waits a round
    chunk_size: int = 1024
    dropout: float = 0.0
    stragglers: float = 0.0
    deadline: float = 20.0
    seed: int = 0
    broker: str | None = None
    fleet_dir: str | None = None  # an existing `fedtiny keys` folder (needed with --broker)
    out: str = "runs/latest"
    engine: str = "mqtt"  # "mqtt" (broker and node agents) or "flower" (ClientApps in Flower's engine on Ray)
    trainer: str = "c"  # "c" when a compiler is present, else "python"
    baseline: bool = False  # also run plain Flower FedAvg with PyTorch fp32 clients on the same task
    baseline_lr: float | None = None  # default: chosen by tuning.py's rule for the fp32 update
    workers: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))  # processes, or Ray CPUs
    qemu_nodes: int = 0  # of the nodes, how many run the node firmware under QEMU (firmware_nodes.py)
    realtime: bool = False  # deadlines, dropout and stragglers on the wall clock instead of in virtual time
    reply_timeout: float = 600.0  # virtual time: wall seconds a round may go without a due reply before the run fails
    # what `fedtiny coordinator` takes, passed to the same RoundPolicy and make_strategy
    strategy_options: str = ""  # "beta=0.2,num_malicious_nodes=1" (fedtiny_server.app.parse_options)
    fraction: float = 1.0  # of the nodes, the share a round samples
    quorum: float | None = None  # default: 1, or with --dropout or --stragglers max(0.3, 1 - dropout - 0.1)
    local_steps: int = 0  # training steps per round; 0: --epochs passes over the node's samples
    max_examples: int = 10_000  # clamp of a node's num_examples (its aggregation weight)
    max_staleness: int = 0  # > 0: semi-asynchronous rounds accept replies up to this many versions old (fedbuff)
    clip_norm: float | None = None  # L2 norm (real units) every update is clipped to, on the node and at the
    # coordinator; None: 0 (off), with --dp-epsilon the rule on the host's data (clipping.py), with --secagg alone
    # SECAGG_CLIP_NORM
    clip_rule: str | None = None  # filled by the run with DP: how clip_norm was chosen (its settings, privacy report)
    dp_epsilon: float = 0.0  # central differential privacy's budget (0: off; fedtiny_server.privacy)
    dp_delta: float = 1e-5
    dp_noise_multiplier: float = 0.0  # 0: the smallest that keeps `rounds` within the budget
    secagg: bool = False  # secure aggregation: nodes send masked deltas, the coordinator sees only their sum
    capture: bool = False  # the embedded broker records every payload it carries (capture.jsonl; privacy_report)
    # also train each node alone, round by round as the run trains it: the report's "alone" line, beside the global
    # and personalised ones, says what federation gains. Off by default: it is as much C training again as the
    # rounds' own (about 32 s of CPU in the default run), and the default run's time is what a new user meets first
    alone: bool = False


# The default clip norm under --secagg without DP, where clipping bounds what one device adds to the masked sum and
# sets the moduli (no noise is calibrated to it): about the median L2 norm (real units) of a device's update in the
# default bearing task's first rounds (0.3-0.8 with --uplink-keep 0.5). Under DP the host's rule chooses instead.
SECAGG_CLIP_NORM = 0.5


ENGINES = ("mqtt", "flower")


def _device_rng(seed: int, device: str, *keys: int) -> np.random.Generator:
    """A device's own random stream (per round, ...), the same for the same seed. Keyed by the whole name: the sum
    of its bytes, as before, made node002, node011 and node020 (and 50 nodes in 14 such groups) fail and lag
    together."""
    return np.random.default_rng([seed, len(device), *device.encode(), *keys])


def _fails(seed: int, device: str, round_: int, fraction: float) -> bool:
    """Whether `device` drops out in `round_`: deterministic per seed, so runs are reproducible."""
    if fraction <= 0:
        return False
    return bool(_device_rng(seed, device, round_, 1).random() < fraction)


# A simulated node's idle heartbeat (the agent's default; the coordinator counts a device as seen for 300 s). Each
# heartbeat is a signed STATUS the node persists its whole state for, the broker retains and the coordinator
# verifies, so their cost grows with the run's wall time, not its work: at 5 s a node of the default run sent about
# 6 per round under load (rounds of ~30 s) beside the ~16 messages of its round's work (TASK, GLOBAL_UPDATE and
# DELTA chunks, ACKs).
HEARTBEAT_S = 30.0


def _worker(run_dir: str, devices: list[str], broker: str, config: dict, stop) -> None:
    """A worker process: hosts the node agents of `devices` until `stop` is set."""
    from fedtiny.planfile import load_plan
    from fedtiny_device.agent import NodeAgent
    from fedtiny_server.ops import log_to

    run = Path(run_dir)
    with log_to(run / "agents.log", "fedtiny.agent", "fedtiny.device", "fedtiny.mqtt", "paho", "amqtt"):
        plan = load_plan(run / "plan.ftp")
        factory = None
        if config["trainer"] == "c":
            from fedtiny_device.cruntime import CTrainer as factory
        from fedtiny.protocol.keys import load_peers

        from .stop import wait_for_stop

        agents = []
        for device in devices:
            samples = nodefile.load(run / "nodes" / f"{device}.npz")
            agent = NodeAgent(device, broker, run / "fleet", plan, samples.x, samples.y, fleet="sim",
                              state_dir=run / "state", seed=samples.seed, chunk_size=config["chunk_size"],
                              trainer_factory=factory, heartbeat_s=HEARTBEAT_S, ack_timeout_s=5.0,
                              faults=_faults(device, config), durable=False,
                              # secagg: its peers' public identities (`fedtiny keys`' peers.json), to check the round
                              # keys the coordinator relays
                              peers=load_peers(run / "fleet" / "devices" / device) if config.get("secagg") else None,
                              evaluation=samples.evaluation)
            agents.append(agent.start())
        wait_for_stop(stop)
        for agent in agents:
            agent.stop(leave=False)


def _faults(device: str, config: dict):
    """--dropout: the node fails the round: it does not train and answers nothing, then takes the next task as
    a rebooted device would. --stragglers: the node is slow in some rounds (straggler_delay), so it makes some
    rounds and misses others; it waits out its delay only with --realtime (in virtual time it answers at once,
    and the coordinator's `arrivals` say when its answer arrives)."""
    from fedtiny_device.agent import RoundFaults

    straggler = is_straggler(config, device) and config["realtime"]
    return RoundFaults(fails=lambda round_: _fails(config["seed"], device, round_, config["dropout"]),
                       delay=lambda round_: straggler_delay(config, device, round_) if straggler else 0.0)


# --- virtual time: how long a node's round takes, by seeded rules (FleetGrid's `arrivals`) --------------------

NOMINAL_CLOCK_HZ = 216e6  # the nominal device: a Cortex-M4/M7 at 216 MHz, one instruction per cycle
NOMINAL_INSNS_PER_MAC = 8.4  # the default plan's measured M4 instructions per training MAC (BENCHMARKS.md)


def nominal_step_seconds(plan) -> float:
    """Virtual seconds of one training step of `plan` on the nominal device (its MACs, count_train_macs)."""
    from fedtiny_device.codegen import count_train_macs

    return count_train_macs(plan)["total"] * NOMINAL_INSNS_PER_MAC / NOMINAL_CLOCK_HZ


def virtual_arrivals(config: dict, plan, samples: dict[str, int], firmware_devices=()):
    """`arrivals(device, round)` for the coordinator's FleetGrid: the virtual second a node's DELTA arrives after
    its TASK, or None when it drops out of the round (--dropout). A node's round lasts its training steps
    (--local-steps, or --epochs passes over its samples) at the nominal device speed, plus its straggler_delay
    when it is a straggler; the link itself takes no virtual time. Firmware nodes (QEMU) neither fail nor lag,
    as in real time. Only seeded rules: the same seed gives the same arrivals on any machine, under any load."""
    step = nominal_step_seconds(plan)
    firmware = set(firmware_devices)

    def arrival(device: str, round_: int) -> float | None:
        seconds = (config["local_steps"] or config["epochs"] * samples[device]) * step
        if device in firmware:
            return seconds
        if _fails(config["seed"], device, round_, config["dropout"]):
            return None
        return seconds + (straggler_delay(config, device, round_) if is_straggler(config, device) else 0.0)

    return arrival


def is_straggler(config: dict, device: str) -> bool:
    """Whether `device` is one of the --stragglers share of nodes: deterministic per seed."""
    return bool(_device_rng(config["seed"], device).random() < config["stragglers"])


def straggler_delay(config: dict, device: str, round_: int) -> float:
    """Seconds a straggler's round takes beyond its training. In a random half of its rounds it is slow: 1.25 to
    2 deadlines (it misses the round); in the others at most a quarter of a deadline (it makes it, unless its
    training takes most of the deadline). Drawn per (seed, device, round), so the rounds it is slow in do not
    depend on how many tasks it got, and clear of the deadline, so that scheduling noise does not decide
    whether it makes a round."""
    slow, share = _device_rng(config["seed"], device, round_, 2).random(2)
    return config["deadline"] * ((1.25 + 0.75 * share) if slow < 0.5 else 0.25 * share)


def slow_rounds(config: dict, devices: list[str]) -> dict[str, list[int]]:
    """The rounds each straggler is slow in (the run's record of the --stragglers draw)."""
    return {d: [r for r in range(1, config["rounds"] + 1) if straggler_delay(config, d, r) > config["deadline"]]
            for d in devices if is_straggler(config, d)}


def dropped_rounds(config: dict, devices: list[str]) -> dict[str, list[int]]:
    """The rounds each node drops out of (the run's record of the --dropout draw)."""
    dropped = {d: [r for r in range(1, config["rounds"] + 1) if _fails(config["seed"], d, r, config["dropout"])]
               for d in devices}
    return {d: rounds for d, rounds in dropped.items() if rounds}


def device_name(index: int) -> str:
    return f"node{index:03d}"


class ConfigError(ValueError):
    """An option of `fedtiny simulate` that cannot work; the message names the option and its value."""


def check_inputs(config: SimulationConfig, note=None, progress=None) -> Task:
    """Everything a user can get wrong, checked before any work (no folder written, nothing trained): the
    options, the strategy and its options, budget and reserve (a default reserve that a small budget cannot hold is scaled down), the engine,
    the data and the model. Returns the task with its data loaded and validated. Raises ConfigError,
    DataError, ModelSpecError or BudgetError (all ValueErrors), and then `note` has heard nothing: the error
    is the one line to show. Once every check passed, `note` hears how the data was read and split and any scaled
    reserve; `progress` hears how far a big data file is read, while it is read."""
    from fedtiny.compiler import reserve_for
    from fedtiny.protocol.chunking import MAX_CHUNK_PAYLOAD, MIN_CHUNK_PAYLOAD

    c = config
    for option, ok, rule in (
            ("nodes", c.nodes >= 1, "at least 1"), ("rounds", c.rounds >= 1, "at least 1"),
            ("epochs", c.epochs is None or c.epochs >= 1, "at least 1"), ("lr", c.lr is None or c.lr > 0, "positive"),
            ("baseline_lr", c.baseline_lr is None or c.baseline_lr > 0, "positive"),
            ("uplink_keep", 0.01 <= c.uplink_keep <= 1, "a fraction in [0.01, 1]"),
            ("chunk_size", MIN_CHUNK_PAYLOAD <= c.chunk_size <= MAX_CHUNK_PAYLOAD,
             f"{MIN_CHUNK_PAYLOAD}..{MAX_CHUNK_PAYLOAD} bytes"),
            ("dropout", 0 <= c.dropout < 1, "a fraction in [0, 1)"),
            ("stragglers", 0 <= c.stragglers <= 1, "a fraction in [0, 1]"),
            ("deadline", c.deadline > 0, "positive seconds"), ("workers", c.workers >= 1, "at least 1"),
            ("reply_timeout", c.reply_timeout > 0, "positive seconds"),
            ("fraction", 0 < c.fraction <= 1, "a fraction in (0, 1]"),
            ("quorum", c.quorum is None or 0 < c.quorum <= 1, "a fraction in (0, 1]"),
            ("local_steps", 0 <= c.local_steps <= 0xFFFF, "0..65535 (0: --epochs passes over the node's data)"),
            ("max_examples", c.max_examples >= 1, "at least 1"),
            ("clip_norm", c.clip_norm is None or c.clip_norm >= 0, "0 (off) or more"),
            ("max_staleness", c.max_staleness >= 0, "0 (synchronous) or more")):
        if not ok:
            raise ConfigError(f"--{option.replace('_', '-')} {getattr(c, option)}: must be {rule}")
    if c.clip_norm is None and not c.dp_epsilon:  # with DP: chosen on the host's data once lr and epochs are
        c.clip_norm = SECAGG_CLIP_NORM if c.secagg else 0.0
    if c.secagg:
        _check_secagg(c)
    if c.dp_epsilon:
        _check_privacy(c)
    if c.engine not in ENGINES:
        raise ConfigError(f"unknown engine {c.engine!r}; choose one of {', '.join(ENGINES)}")
    strategy_options(c)  # the strategy and its options, as the coordinator will build them
    wall_clock_note = None
    if semi_asynchronous(c) and c.engine == "mqtt" and not c.realtime:
        c.realtime = True
        wall_clock_note = "semi-asynchronous rounds (--strategy fedbuff, --max-staleness) run on the wall clock " \
                          "(as --realtime)"
    if not 0 <= c.qemu_nodes <= c.nodes:
        raise ConfigError(f"--qemu-nodes {c.qemu_nodes}: must be between 0 and --nodes ({c.nodes})")
    if c.qemu_nodes and c.engine != "mqtt":
        raise ConfigError("--qemu-nodes needs --engine mqtt: firmware nodes talk MQTT through their modem")
    if c.qemu_nodes:
        missing = [tool for tool in ("qemu-system-arm", "arm-none-eabi-gcc", "gcc", "make") if not shutil.which(tool)]
        if missing:
            raise ConfigError(f"--qemu-nodes needs {', '.join(missing)} (Debian: apt-get install qemu-system-arm "
                              f"gcc-arm-none-eabi libnewlib-arm-none-eabi gcc make)")
    if c.capture and (c.engine != "mqtt" or c.broker):
        raise ConfigError("--capture records what the embedded broker carries: it needs --engine mqtt and no --broker")
    if c.engine == "flower":
        from .flower_engine import check_config

        check_config(c)  # Ray installed, no MQTT-only option
    notes = [wall_clock_note] if wall_clock_note else []
    c.reserve, scaled = reserve_for(c.budget, c.reserve)
    if scaled:
        notes.append(scaled)
    task = load_task(c.scenario, c.nodes, c.seed, c.data, note=notes.append, progress=progress)
    if c.model:
        task.model = c.model
    check_model(task.model, task.input_shape, task.num_classes)
    if is_model_file(task.model):  # pretrained elsewhere: fed as its file says, and no float model for a baseline
        if c.baseline:
            raise ConfigError("--baseline trains the float PyTorch model, and a .ftm model file has none")
        from fedtiny.modelfile import load_model

        task = fed_as_model_file(task, load_model(task.model))
    for message in notes if note else ():
        note(message)
    return task


def strategy_options(config: SimulationConfig) -> dict:
    """The keyword arguments of the run's strategy (make_strategy), checked by building it once: an unknown
    strategy, a malformed --strategy-option or one the strategy does not take is a ConfigError."""
    import logging

    from fedtiny_server.app import parse_options
    from fedtiny_server.rounds import make_strategy

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # its notes on the fleet defaults (fraction_evaluate 0), chosen on purpose
    try:
        options = {"fraction_train": config.fraction, **parse_options(config.strategy_options)}
        make_strategy(config.strategy, **options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--strategy {config.strategy}: {exc}") from exc
    finally:
        flwr_log.setLevel(level)
    return options


def _check_secagg(c: SimulationConfig) -> None:
    """--secagg: the devices clip, no robust or semi-asynchronous strategy, MQTT node agents only."""
    from fedtiny_server.secagg import check_strategy

    try:
        check_strategy(c.strategy)
    except ValueError as exc:
        raise ConfigError(f"--secagg: {exc}") from None
    for ok, why in ((c.clip_norm is None or c.clip_norm > 0,
                     "--clip-norm 0: secure aggregation needs the devices to clip (default: the host's rule with "
                     f"--dp-epsilon, else {SECAGG_CLIP_NORM:g})"),
                    (c.engine == "mqtt", "--engine flower: secure aggregation runs over MQTT node agents only"),
                    (c.max_staleness == 0, "--max-staleness: masked rounds are synchronous"),
                    (c.nodes * c.fraction >= 3, "fewer than 3 nodes per round: secure aggregation needs 3")):
        if not ok:
            raise ConfigError(f"--secagg with {why}")


def _check_privacy(c: SimulationConfig) -> None:
    from fedtiny.privacy import epsilon
    from fedtiny_server.privacy import check_options

    try:
        check_options(c.dp_epsilon, c.dp_delta, c.clip_norm, c.dp_noise_multiplier, c.strategy)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if c.dp_noise_multiplier and epsilon(c.dp_noise_multiplier, 1, c.dp_delta) > c.dp_epsilon:
        raise ConfigError(f"--dp-noise-multiplier {c.dp_noise_multiplier}: one round already spends epsilon "
                          f"{epsilon(c.dp_noise_multiplier, 1, c.dp_delta):.3g}, more than --dp-epsilon {c.dp_epsilon}")


def privacy_noise_warning(config: SimulationConfig, plan) -> str | None:
    """Under --dp-epsilon, a line when the central noise on each round's mean update is larger than the trainable
    weights (fedtiny.privacy.fleet_noise_warning): a budget too small for the fleet."""
    from fedtiny.privacy import fleet_noise_warning, noise_multiplier_for
    from fedtiny_server.requantize import dequantize_state, tensor_specs

    z = config.dp_noise_multiplier or noise_multiplier_for(config.dp_epsilon, config.dp_delta, config.rounds)
    weights = [v for v in dequantize_state(tensor_specs(plan), plan.initial_state()).values()]
    rms = float(np.sqrt(np.mean(np.concatenate([w.ravel() for w in weights]) ** 2)))
    per_round = max(1, round(config.nodes * config.fraction))
    if config.secagg:  # distributed DP: the nodes' noise is calibrated for the m survivors the quorum expects
        from fedtiny.privacy import calibrated_survivors

        z *= math.sqrt(per_round / calibrated_survivors(per_round, round_quorum(config)))
    return fleet_noise_warning(z, config.clip_norm, per_round, rms, config.dp_epsilon, config.rounds)


def round_quorum(config) -> float:
    """--quorum, by default 1, or with --dropout or --stragglers max(0.3, 1 - dropout - 0.1)."""
    if config.quorum is not None:
        return config.quorum
    return 1.0 if config.dropout == 0 and config.stragglers == 0 else max(0.3, 1 - config.dropout - 0.1)


def node_seed(config, i: int) -> int:
    """The seed of the run's i-th node: its training order and the part of its samples it holds out."""
    return config.seed * 1000 + i


def baseline_nodes(config, task) -> list:
    """The fp32 baseline's clients' data: each node's samples less the part its device holds out (the device never
    trains on it), so both sides train on the same samples."""
    from fedtiny_device.agent import heldout_split

    return [ds.subset(heldout_split(node_seed(config, i), len(ds.y))[0]) for i, ds in enumerate(task.nodes)]


def training_plan(config: SimulationConfig, graph):
    """The plan a run of this configuration trains: its scheme (a scheme's text: auto is resolved before, in
    _prepare), compiled for its budget, reserve and learning rate."""
    from fedtiny.compiler import compile_plan
    from fedtiny.scheme import parse

    return compile_plan(graph, parse(config.scheme, graph), lr=config.lr, budget=config.budget, reserve=config.reserve)


def _prepare(config: SimulationConfig, run: Path, task: Task, say):
    """Pretrained int8 model, the learning settings the user left open (tuning.settle), plan and per-node data
    files; `say` hears the host model's accuracy and the settings chosen."""
    from fedtiny.planfile import save_plan
    from fedtiny.interpreter import quantize_input

    from .tuning import LRS, host_accuracy_lines, run_forward, settle

    kernels = None
    if config.trainer == "c":  # the C kernels do not depend on the model: gcc builds them on another core meanwhile
        from concurrent.futures import ThreadPoolExecutor

        from fedtiny_device.cruntime import build_host_kernels

        pool = ThreadPoolExecutor(1)
        kernels = pool.submit(build_host_kernels)
        pool.shutdown(wait=False)
    started = time.perf_counter()
    model, graph = pretrained(task, config.seed)
    host_model_seconds = time.perf_counter() - started  # shared: the model fedtiny and the baseline start from
    if kernels is not None:
        kernels.result()  # a BuildError is raised here, as the first plan's build would raise it
    train, val = host_split(task, config.seed)
    forward = None  # the int8 model's forward pass in the C library the trials and the run then share (any lr)
    if config.trainer == "c" and config.scheme != "auto":
        forward = run_forward(training_plan(replace(config, lr=config.lr or LRS[0]), graph))
    for line in host_accuracy_lines(model, graph, val, forward):
        say(line)
    trainer = None
    if config.trainer == "c":
        from fedtiny_device.cruntime import CTrainer as trainer
    auto = config.scheme == "auto"
    lrs = LRS
    if auto:  # the search first (cached by content): the lr rule below then runs for the scheme it chose
        from .autoscheme import auto_scheme, lr_neighbours

        searched = auto_scheme(graph, unseen_halves(task, config.seed), budget=config.budget, reserve=config.reserve,
                               lr=config.lr, epochs=config.epochs or 1, seed=config.seed, trainer=config.trainer,
                               note=say)
        say(searched.summary())
        config.scheme, lrs = searched.scheme, lr_neighbours(searched)  # the search's lr runs are the coarse grid
    for line in settle(config, task, model, graph, train, val, trainer_factory=trainer, lrs=lrs):
        say(line)
    plan = training_plan(config, graph)
    if config.clip_norm is None:  # --dp-epsilon without --clip-norm: the rule on the host's data (clipping.py)
        from .clipping import settle_clip_norm

        say(settle_clip_norm(config, task, plan, graph, train, val, trainer_factory=trainer))
    scheme = f"auto = {config.scheme}" if auto else config.scheme
    save_plan(plan, run / "plan.ftp")
    (run / "nodes").mkdir()
    devices = [device_name(i) for i in range(config.nodes)]
    tests = task.machine_tests or [None] * len(devices)
    for i, (device, ds, test) in enumerate(zip(devices, task.nodes, tests, strict=True)):
        nodefile.save(run / "nodes" / f"{device}.npz", quantize_input(graph, ds.X), ds.y, node_seed(config, i),
                      None if test is None else (quantize_input(graph, test.X), test.y))
    return model, graph, plan, scheme, devices, host_model_seconds


def simulate(config: SimulationConfig, progress=None, *, task: Task | None = None, note=None) -> dict:
    """Run a simulation; returns the run summary (also written into config.out). `task`: check_inputs(config)'s
    result when the caller checked first (else it is called here); `note` hears check_inputs' notes and a line
    as each phase begins."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    import flwr  # noqa: F401  (importing it sets its logger's level: before we quiet that logger below)

    started = time.perf_counter()
    if task is None:
        task = check_inputs(config, note)  # before any work
    run = Path(config.out)
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    with _run_logs(run):
        return _simulate_run(config, run, task, progress, note, started)


@contextmanager
def _run_logs(run: Path):
    """The run's coordinator.jsonl and link.log, detached again when the run ends: a second run in the same process
    (the Python API, a notebook, the tests) must not append its events to this run's files."""
    import logging

    from fedtiny_server import ops

    flwr_level = logging.getLogger("flwr").level
    with open(run / "coordinator.jsonl", "w") as events, ops.json_logging(events), \
            ops.log_to(run / "link.log", "fedtiny.mqtt", "fedtiny.coordinator_session", "fedtiny.task",
                       "fedtiny.brokers", "amqtt", "transitions", "paho"):
        logging.getLogger("flwr").setLevel(logging.ERROR)  # its notes on strategy settings we chose on purpose
        try:
            yield
        finally:
            logging.getLogger("flwr").setLevel(flwr_level)


def _simulate_run(config: SimulationConfig, run: Path, task: Task, progress, note, started: float) -> dict:
    """simulate()'s work, with the run folder made and its logs attached."""
    from fedtiny.interpreter import predict, quantize_input
    from fedtiny_server.rounds import confusion_matrix

    from .report import write_report
    from .report_data import accuracy_targets, evaluated_on

    if config.trainer == "c" and shutil.which("gcc") is None:
        config.trainer = "python"
    say = note or (lambda message: None)
    cache = os.environ.get("FEDTINY_CACHE", "~/.cache/fedtiny")
    say(f"preparing the model (pretrained on the host's data, or from {cache}) and the training plan")
    model, graph, plan, scheme, devices, host_model_seconds = _prepare(config, run, task, say)
    if config.secagg:  # known once the scheme is (auto's search): the devices could not mask it
        from fedtiny.protocol.secagg import check_plan

        try:
            check_plan(plan)
        except ValueError as exc:
            raise ConfigError(f"--secagg: {exc}") from None
    say(f"model {task.model}, update scheme {scheme}: {len(plan.trainable_buffers())} trainable buffers, "
        f"{plan.arena_size:,} B arena per node")
    # what each device's personalised, global and alone accuracies are scored on (nodefile)
    evaluation = nodefile.HELDOUT_FIFTH if task.machine_tests is None else nodefile.MACHINE_TESTS
    if plan.loss != "mse":
        say(f"personalised accuracy: {evaluated_on(dict(evaluation=evaluation))}")
    if config.dp_epsilon:
        warning = privacy_noise_warning(config, plan)
        if warning:
            say(warning)
    forward = None  # the held-out evaluation's forward pass: the interpreter's, or the same bits from the C runtime
    if config.trainer == "c":
        from fedtiny_device.cruntime import CPlanModel

        forward = CPlanModel(plan)
        logits = forward(plan.initial_state(), quantize_input(graph, task.test.X))
        predicted = logits.reshape(len(logits), -1).argmax(axis=1)
    else:
        predicted = predict(graph, task.test.X)
    initial = float((predicted == task.test.y).mean())

    privacy: dict = {}  # the coordinator's DP summary and why rounds stopped (--dp-epsilon)

    def coordinate(link, clock=time.monotonic, firmware_devices=()) -> list[dict]:
        return _rounds(config, link, plan, task, run, progress, clock, firmware_devices, privacy, say, forward)

    if config.engine == "flower":
        from .flower_engine import run_engine

        rounds, firmware = run_engine(config, run, plan, devices, coordinate), {}
    else:
        firmware_note = f", {config.qemu_nodes} of them as firmware under QEMU" if config.qemu_nodes else ""
        say(f"starting the broker and {config.nodes} nodes{firmware_note}; then {config.rounds} rounds")
        rounds, firmware = _run_mqtt(config, run, plan, devices, coordinate)
    alone, alone_started = {}, time.perf_counter()
    if config.alone and plan.loss != "mse" and rounds:
        from .personal import fleet_summary, round_summaries, train_alone

        say(f"training each node alone from the pretrained model, round by round as its {len(rounds)} rounds, for "
            f"the gain from federation (--alone)")
        alone = train_alone(run, dict(asdict(config), rounds=len(rounds)))
        for row, alone_round in zip(rounds, round_summaries(alone)):
            row.update(alone_accuracy=alone_round["mean"], alone_worst_tenth=alone_round["worst_tenth"])
    broker = config.broker or OWN_BROKERS.get(own_broker(config))
    summary = dict(scenario=task.name, nodes=config.nodes, model=task.model, scheme=scheme, strategy=config.strategy,
                   broker=broker, seed=config.seed, dropout=config.dropout, stragglers=config.stragglers,
                   deadline=config.deadline, engine=config.engine, clock=_clock_kind(config), lr=config.lr,
                   epochs=config.epochs, baseline_lr=config.baseline_lr, pretraining=graph.meta.get("pretraining"),
                   trainer=config.trainer, initial_accuracy=initial, trainable=plan.trainable_buffers(),
                   initial_confusion=confusion_matrix(task.test.y, predicted, task.num_classes),
                   classes=list(task.pretrain.classes), qemu_nodes=config.qemu_nodes, firmware=firmware,
                   wall_seconds=time.perf_counter() - started, host_model_seconds=host_model_seconds,
                   clip_norm=config.clip_norm, clip_rule=config.clip_rule,
                   rounds_seconds=sum(r["seconds"] for r in rounds),  # round 1's start to the last's end
                   privacy=privacy.get("summary"), stopped=privacy.get("stopped"), secure_aggregation=config.secagg,
                   evaluation=evaluation,
                   alone=dict(fleet_summary([curve[-1] if curve else None for curve in alone.values()]),
                              accuracy={d: curve[-1] if curve else None for d, curve in alone.items()})
                   if alone else None, alone_seconds=time.perf_counter() - alone_started if alone else None)
    baseline = None
    if config.baseline:
        from .baseline import run_baseline
        from .tuning import settle_baseline

        # the baseline's own work, on its side of the comparison: its lr choice (by the rule, on the host's data)
        # and its run; fedtiny's side is wall_seconds less host_model_seconds (the pretrained model both start from)
        lr_started = time.perf_counter()
        if config.baseline_lr is None:
            say("baseline: its fp32 learning rate, chosen by the devices' rule on the host's data")
        for line in settle_baseline(config, task, model, graph, *host_split(task, config.seed)):
            say(line)
        summary["baseline_lr"] = config.baseline_lr
        lr_seconds = time.perf_counter() - lr_started
        say(f"baseline: plain Flower FedAvg with PyTorch fp32 clients, {config.rounds} rounds on the same task, "
            f"in {config.workers} worker process(es) of one PyTorch thread each, as fedtiny's nodes")
        baseline = run_baseline(model, baseline_nodes(config, task), task.test, rounds=config.rounds,
                                lr=config.baseline_lr, epochs=config.epochs, seed=config.seed,
                                workers=config.workers, note=say)
        baseline.update(lr_seconds=lr_seconds, wall_seconds=lr_seconds + baseline["wall_seconds"])
    memory = plan.memory_report()  # arena, the C kernels' scratch, stack: the device's RAM
    summary["targets"] = accuracy_targets(initial, rounds, baseline)  # "rounds to X %", each with its rule
    first = summary["targets"][0] if summary["targets"] else {}
    summary.update(target_accuracy=first.get("accuracy"), rounds_to_target=first.get("fedtiny"))
    if baseline:
        baseline["rounds_to_target"] = first.get("baseline")
    agents = devices[config.qemu_nodes:]  # firmware nodes take no --dropout or --stragglers
    write_report(run, summary, rounds, memory, baseline, slow_rounds(asdict(config), agents),
                 dropped_rounds(asdict(config), agents))
    return dict(summary, rounds=rounds, baseline=baseline)


OWN_BROKERS = {"mosquitto": "mosquitto (loopback, TLS)", "amqtt": "embedded amqtt (loopback)"}


def own_broker(config: SimulationConfig) -> str | None:
    """The broker a run starts for itself on loopback (None: --broker, or the flower engine): mosquitto where it is
    installed, with the fleet's TLS certificates, passwords and ACL (a C broker: in the default run about 1 s of CPU
    where the embedded amqtt took 8-10 s, a seventh of the whole run's, for the same metrics); else, and with
    --capture (an amqtt plugin records the payloads), the embedded amqtt in a process of its own."""
    from fedtiny.protocol.brokers import mosquitto_binary

    if config.engine != "mqtt" or config.broker:
        return None
    return "mosquitto" if mosquitto_binary() and not config.capture else "amqtt"


def _start_broker(config: SimulationConfig, run: Path):
    """(the started broker to stop at the end, or None, and the URL every client connects to)."""
    kind = own_broker(config)
    if kind == "mosquitto":
        from fedtiny.protocol.brokers import MosquittoProcess, free_port, mosquitto_config

        port = free_port()
        # as root, mosquitto would drop to user `mosquitto`, who cannot read the run folder's 0600 keys
        (run / "mosquitto.conf").write_text(mosquitto_config(run / "fleet", port, run_as_root=os.geteuid() == 0))
        return MosquittoProcess(run / "mosquitto.conf", port, log_path=run / "broker.log").start(), \
            f"mqtts://127.0.0.1:{port}"
    if kind == "amqtt":
        from .broker_process import BrokerProcess

        capture = run / "capture.jsonl" if config.capture else None
        broker = BrokerProcess(run / "fleet", run / "link.log", capture=capture).start()
        return broker, f"mqtt://127.0.0.1:{broker.port}"
    return None, config.broker


def _run_mqtt(config: SimulationConfig, run: Path, plan, devices: list[str], coordinate
              ) -> tuple[list[dict], dict[str, dict]]:
    """The fleet's keys, a broker, the coordinator's link, the node agents in worker processes and the firmware
    nodes under QEMU; then rounds. Returns the rounds and the firmware nodes' report (FirmwareFleet.report)."""
    from fedtiny.transport.mqtt import CoordinatorLink
    from fedtiny.protocol.keys import provision_fleet

    if config.fleet_dir:
        shutil.copytree(config.fleet_dir, run / "fleet")
    else:
        provision_fleet(run / "fleet", "sim", devices)
    broker, url = _start_broker(config, run)
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    firmware = None
    if config.qemu_nodes:
        from .firmware_nodes import FirmwareFleet

        firmware = FirmwareFleet(run, plan, devices[:config.qemu_nodes], url, chunk_size=config.chunk_size,
                                 secagg=config.secagg)
    agents = devices[config.qemu_nodes:]
    shares = [agents[i::config.workers] for i in range(config.workers)]
    workers = [ctx.Process(target=_worker, args=(str(run), share, url, asdict(config), stop), daemon=True)
               for share in shares if share]
    # A simulation's coordinator never restarts within its run folder, so its durable state is not saved.
    link = CoordinatorLink(url, run / "fleet", plan, fleet="sim", chunk_size=config.chunk_size).start()
    try:
        for w in workers:
            w.start()
        if firmware is not None:
            firmware.start()
        _wait_for_devices(link, len(devices), timeout=120)
        rounds = coordinate(link, firmware_devices=devices[:config.qemu_nodes])
    finally:
        if firmware is not None:
            firmware.stop()
        stop.set()
        for w in workers:
            w.join(30)
            if w.is_alive():
                w.terminate()
        link.close()
        if broker is not None:
            broker.stop()
    return rounds, firmware.report() if firmware is not None else {}


def _rounds(config: SimulationConfig, link, plan, task, run: Path, progress, clock,
            firmware_devices=(), privacy: dict | None = None, say=None, forward=None) -> list[dict]:
    """The coordinator over `link` for config.rounds rounds; one row per round (the live table's and report's;
    with firmware nodes, `firmware` = how many of them had a DELTA accepted in the round; with --dp-epsilon,
    `epsilon` = the fleet's so far). Under DP, `privacy` gets the coordinator's summary and, if the budget ended
    the run early, why (`say` hears it too). `forward`: the held-out evaluation's (Coordinator heldout_forward)."""
    from flwr.serverapp.exception import PrivacyBudgetExhausted
    from fedtiny_server.grid import RoundPolicy
    from fedtiny_server.privacy import PrivacySettings
    from fedtiny_server.rounds import Coordinator, CoordinatorConfig
    from fedtiny_server.state import StateStore

    from .personal import HeldOutParts, fleet_summary, round_personal
    from .report_data import predicted_classes

    policy = RoundPolicy(quorum=round_quorum(config), deadline=config.deadline, max_examples=config.max_examples,
                         max_staleness=config.max_staleness, reply_timeout=config.reply_timeout)
    arrivals = None
    if _clock_kind(config) == "virtual":
        from fedtiny_device.agent import heldout_count

        # what a node trains on: its samples less the part it holds out (agent.heldout_split)
        samples = {device_name(i): len(ds.y) - heldout_count(len(ds.y)) for i, ds in enumerate(task.nodes)}
        arrivals = virtual_arrivals(asdict(config), plan, samples, firmware_devices)
    store = StateStore(run / "state.db", durable=False)  # a simulation's coordinator never restarts from it
    audit = _audit(run)
    coordinator = None
    try:
        train_config = {"epochs": config.epochs, "uplink_keep": config.uplink_keep,
                        "local_steps": config.local_steps, "clip_norm": config.clip_norm}
        coordinator = Coordinator(link, plan, store,
                                  CoordinatorConfig(rounds=config.rounds, strategy=config.strategy,
                                                    strategy_options=strategy_options(config), policy=policy,
                                                    train_config=train_config,
                                                    privacy=PrivacySettings(
                                                        config.dp_epsilon, config.dp_delta, config.clip_norm,
                                                        config.dp_noise_multiplier, noise_seed=config.seed,
                                                        clip_rule=config.clip_rule or "")
                                                    if config.dp_epsilon else None, secagg=config.secagg),
                                  heldout=(task.test.X, task.test.y), heldout_forward=forward, clock=clock,
                                  arrivals=arrivals, audit=audit)
        rounds = []
        # the global model of each round on every device's held-out part: the samples the personalised and alone
        # accuracies are measured on (a measurement on the host, which holds every node's data file)
        held_out = HeldOutParts(run, lambda state, x: predicted_classes(plan, state, x)) if plan.loss != "mse" else None
        for r in range(1, config.rounds + 1):
            up0, down0 = _bytes(coordinator)
            t0 = time.perf_counter()
            # Flower's strategies sample a round's nodes (--fraction below 1) with Python's global `random`
            random.seed(f"fedtiny-simulate:{config.seed}:{r}")
            try:
                result = coordinator.run_round(r)
            except PrivacyBudgetExhausted as exc:
                coordinator.stop(str(exc))
                if say:
                    say(f"stopped before round {r}: {exc}")
                break
            up1, down1 = _bytes(coordinator)
            row = dict(round=r, accuracy=float(result.eval_metrics.get("accuracy", float("nan"))),
                       loss=float(result.eval_metrics.get("loss", float("nan"))), participants=result.replies,
                       uplink_bytes=int(up1 - up0), downlink_bytes=int(down1 - down0),
                       seconds=time.perf_counter() - t0,
                       peak_device_memory=plan.memory_report()["device_ram_bytes"],  # arena, scratch, stack
                       confusion=list(result.eval_metrics.get("confusion", [])))
            # each device's personalised model (the global one after its own steps) on the samples it held out
            reported = round_personal(store, r) or {  # under --secagg: what the masked DELTAs carried in the clear
                d: m["personal_accuracy"] for d, m in coordinator.grid.secagg_metrics.get(r, {}).items()
                if "personal_accuracy" in m}
            personal = fleet_summary(list(reported.values()))
            row.update(personal_accuracy=personal["mean"], personal_worst_tenth=personal["worst_tenth"],
                       personal_devices=personal["devices"])
            if held_out is not None and held_out.parts:
                own = fleet_summary(list(held_out.accuracy(coordinator.model.ints).values()))
                row.update(global_heldout=own["mean"], global_heldout_worst_tenth=own["worst_tenth"])
            if firmware_devices:
                from .report_data import participation

                answered = participation(run / "coordinator.jsonl", {})
                row["firmware"] = sum(r in answered.get(d, {}).get("answered", ()) for d in firmware_devices)
            if config.dp_epsilon:
                row["epsilon"] = float(result.train_metrics.get("epsilon", rounds[-1]["epsilon"] if rounds else 0.0))
            rounds.append(row)
            if progress:
                progress(row)
        if privacy is not None and config.dp_epsilon:
            privacy.update(summary=coordinator.privacy(), stopped=coordinator.stopped)
        from fedtiny.modelfile import save_model

        save_model(plan.graph_with(coordinator.model.ints), run / "global.ftm")  # for `fedtiny evaluate`
        return rounds
    finally:
        audit.close(coordinator)
        store.close()


def _audit(run: Path):
    """The coordinator's signed audit log, run/audit.jsonl (server/audit.py), with the fleet's audit key. The
    flower engine has no fleet folder, and a --fleet-dir provisioned before audit keys existed has no key: then
    the run's own fleet folder (a copy) gets one, in the same place."""
    from fedtiny.audit import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, new_key_pem
    from fedtiny_server.audit import CoordinatorAudit, open_audit_log

    folder = run / "fleet" / "coordinator"
    if not (folder / PRIVATE_KEY_FILE).exists():
        folder.mkdir(parents=True, mode=0o700, exist_ok=True)
        private, public = new_key_pem()
        fd = os.open(folder / PRIVATE_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        (folder / PUBLIC_KEY_FILE).write_bytes(public)
        (run / "fleet" / PUBLIC_KEY_FILE).write_bytes(public)
    return CoordinatorAudit(open_audit_log(run / "audit.jsonl", folder), folder)


def _clock_kind(config: SimulationConfig) -> str:
    """"virtual" or "wall": what the run's round deadlines, dropout and stragglers run on (FleetGrid runs
    semi-asynchronous rounds on the wall clock only)."""
    return "wall" if config.realtime or semi_asynchronous(config) else "virtual"


def semi_asynchronous(config: SimulationConfig) -> bool:
    """fedbuff's rounds, or any with --max-staleness: tasks stay open across rounds, which FleetGrid runs on the
    wall clock only."""
    return config.max_staleness > 0 or config.strategy.lower().replace("-", "").replace("_", "") == "fedbuff"


def _bytes(coordinator) -> tuple[float, float]:
    m = coordinator.metrics
    return m.get("fedtiny_uplink_bytes_total"), m.get("fedtiny_downlink_bytes_total")


def _wait_for_devices(link, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(link.devices()) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(link.devices())} of {n} node agents joined within {timeout:.0f} s")
        time.sleep(0.2)


class LiveTable:
    """The view of `fedtiny simulate`: on a terminal, a live table with a row per round and a progress bar; into a
    file or a pipe (where a live display shows nothing until the end), one plain line per round. `note` prints a
    line above it (what the run is doing now)."""

    COLUMNS = ("round", "accuracy", "personalised", "loss", "nodes", "uplink B", "downlink B", "device memory B",
               "seconds")

    def __init__(self, rounds: int, firmware_nodes: int = 0, privacy: bool = False):
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        self.firmware_nodes = firmware_nodes  # a column of firmware nodes (QEMU) answered, when there are any
        self.rounds = rounds
        self.privacy = privacy  # a column of the fleet's epsilon spent so far, under --dp-epsilon
        columns = self.COLUMNS + (("firmware nodes",) if firmware_nodes else ()) + (("epsilon",) if privacy else ())
        self.table = Table(*columns, title="fedtiny simulate")
        self.progress = Progress(TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.task = self.progress.add_task("rounds", total=rounds)
        self.console = Console(stderr=True)
        self.live = Live(Group(self.table, self.progress), console=self.console, refresh_per_second=4) \
            if self.console.is_terminal else None

    def __enter__(self):
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.stop()

    def note(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def __call__(self, row: dict) -> None:
        personal = "-" if row.get("personal_accuracy") is None else \
            f"{100 * row['personal_accuracy']:.1f} % (worst 10 %: {100 * row['personal_worst_tenth']:.1f} %)"
        cells = [str(row["round"]), f"{100 * row['accuracy']:.1f} %", personal, f"{row['loss']:.3f}",
                 str(row["participants"]),
                 f"{row['uplink_bytes']:,}", f"{row['downlink_bytes']:,}", f"{row['peak_device_memory']:,}",
                 f"{row['seconds']:.1f}"]
        if self.firmware_nodes:
            cells.append(f"{row.get('firmware', 0)}/{self.firmware_nodes}")
        if self.privacy:
            cells.append(f"{row.get('epsilon', 0.0):.2f}")
        if self.live is None:
            self.note(f"round {row['round']}/{self.rounds}: " + ", ".join(
                f"{column.header} {cell}" for column, cell in zip(self.table.columns[1:], cells[1:], strict=False)))
            return
        self.table.add_row(*cells)
        self.progress.advance(self.task)


class QuietView:
    """--quiet: nothing while the run goes (errors and the final summary line are the command's)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def note(self, message: str) -> None:
        pass

    def __call__(self, row: dict) -> None:
        pass


class JsonLines(QuietView):
    """--json: one JSON object per line on stdout as the run goes: {"event": "note", "message": ...} for each phase
    line and note, {"event": "round", ...} with a round's row (the keys of metrics.json's rounds), and at the end
    the command's {"event": "summary", ...}. Nothing else is written to stdout."""

    def __init__(self, stream=None):
        import sys

        self.stream = stream or sys.stdout

    def emit(self, event: str, **fields) -> None:
        self.stream.write(json.dumps({"event": event, **fields}, default=float) + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        self.emit("note", message=message)

    def __call__(self, row: dict) -> None:
        self.emit("round", **row)


if __name__ == "__main__":
    with LiveTable(2) as live:
        result = simulate(SimulationConfig(nodes=4, rounds=2), live)
    print(json.dumps(result, indent=1, default=float))
