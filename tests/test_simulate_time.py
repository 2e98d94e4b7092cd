"""Virtual time: a simulation's rounds do not depend on how fast the machine is (issue 17).

The coordinator's FleetGrid takes `arrivals` (device, round) -> virtual seconds or None; a synchronous round then
admits exactly the replies that arrive virtually by its close, whatever order they come in on the wall clock."""

import json
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from fedtiny_server.grid import MissingReplies, RoundPolicy
from fedtiny_server.rounds import Coordinator, CoordinatorConfig
from fedtiny_server.state import StateStore
from fedtiny.protocol.coordinator import SecAggOutcome
from fedtiny_server.testing import FakeClock, FakeLink, make_reply
from test_server import plan  # noqa: F401 (the grid tests' small plan, a fixture)

B = "train:classifier.bias"


def one_lsb_delta(plan, device):
    """A delta that moves the classifier's bias by the device's index: which replies were admitted shows in the
    global model."""
    d = {n: np.zeros(plan.buffers[n].shape, np.int16 if plan.buffers[n].dtype == "int8" else np.int32)
         for n in plan.trainable_buffers()}
    d[B][:] = int(device[1:]) + 1
    return d


def virtual_coordinator(plan, tmp_path, arrivals, wall_delay, *, quorum=1.0, deadline=10.0, reply_timeout=600.0):
    """Ten devices d0..d9; each answers `wall_delay(device)` fake wall seconds after its TASK unless
    arrivals(device, round) is None (it dropped out and never answers)."""
    clock = FakeClock()
    link = FakeLink(clock)
    names = [f"d{i}" for i in range(10)]
    for name in names:
        link.add_device(name)

    def on_task(lk, task):
        if arrivals(task.device, task.round) is not None:
            lk.schedule(make_reply(task.device, task.round, task.model_version, one_lsb_delta(plan, task.device)),
                        wall_delay(task.device))
    link.on_task = on_task
    policy = RoundPolicy(quorum=quorum, deadline=deadline, poll=0.5, reply_timeout=reply_timeout)
    tmp_path.mkdir()
    store = StateStore(tmp_path / "state.db")
    coordinator = Coordinator(link, plan, store, CoordinatorConfig(1, "fedavg", {}, policy), clock=clock,
                              arrivals=arrivals)
    return coordinator, clock


def test_virtual_round_admits_by_virtual_arrival_not_by_wall_order(plan, tmp_path):
    """Device i arrives virtually at i+1 s; on the wall clock they come in the reverse order (d9 first). With a
    50 % quorum the round closes at virtual 5 s: d0..d4 are admitted, whatever came first in wall time, and the
    late ones are refused as late in this round, not in the next."""
    arrivals = lambda device, round_: float(int(device[1:]) + 1)  # noqa: E731
    coordinator, clock = virtual_coordinator(plan, tmp_path / "a", arrivals, lambda d: 10.0 - int(d[1:]),
                                             quorum=0.5)
    [result] = coordinator.run()
    assert result.replies == 5
    assert coordinator.metrics.get("fedtiny_replies_rejected_total", reason="late") == 5
    assert clock() - 1000.0 == pytest.approx(10.0)  # it waited (in wall time) for every promised reply
    # the bias moved by the mean of d0..d4's deltas (1..5 LSB): 3 LSB
    scale = coordinator.model.specs[B].scale
    before = coordinator.model.master_of(0)[B]
    np.testing.assert_allclose((coordinator.model.master[B] - before) / scale, 3.0, rtol=1e-6)


def test_virtual_deadline_dropout_and_a_node_that_never_answers(plan, tmp_path):
    """d7 dropped out (arrival None: nobody waits for it); d8 and d9 arrive after the 10 s deadline (late,
    though their replies come first on the wall clock); the round closes at the deadline with d0..d6."""
    def arrivals(device, round_):
        i = int(device[1:])
        return None if i == 7 else 20.0 + i if i >= 8 else 1.0 + i
    coordinator, clock = virtual_coordinator(plan, tmp_path / "b", arrivals, lambda d: 3.0 - 0.1 * int(d[1:]))
    [result] = coordinator.run()
    assert result.replies == 7
    assert coordinator.metrics.get("fedtiny_replies_rejected_total", reason="late") == 2
    assert clock() - 1000.0 == pytest.approx(3.0)  # no deadline waited out in wall time

    # a promised reply that never comes is an error after the wall-clock safety timeout, not a silent cut
    coordinator, clock = virtual_coordinator(plan, tmp_path / "c", lambda d, r: 1.0, lambda d: 1.0,
                                             reply_timeout=50.0)
    coordinator.grid.link.on_task = lambda lk, task: None if task.device == "d4" else lk.schedule(
        make_reply(task.device, task.round, task.model_version, one_lsb_delta(plan, task.device)), 1.0)
    with pytest.raises(MissingReplies, match=r"round 1: no reply from 1 node\(s\) \(d4\) within 50 s"):
        coordinator.run()

    # a loaded machine: replies 30 s apart on the wall clock, 300 s in all, each within 50 s of the one before
    coordinator, clock = virtual_coordinator(plan, tmp_path / "d", lambda d, r: 1.0, lambda d: 30.0 * (int(d[1:]) + 1),
                                             reply_timeout=50.0)
    [result] = coordinator.run()
    assert result.replies == 10 and clock() - 1000.0 == pytest.approx(300.0, abs=1.0)


class StagedSecAggLink(FakeLink):
    """A FakeLink with secure aggregation's four stages (keys, shares, masked, unmask): in each stage device di's
    message comes (i+1) x `gap` fake seconds after the stage opened, except the `silent` device's keys, which never
    come. A stage advances when every device still in it answered, or when the coordinator closes it; `closes`
    records each close: (stage, devices heard, fake seconds after the round began)."""

    STAGES = ("keys", "shares", "masked", "unmask")

    def __init__(self, clock, gap: float, silent: str = "") -> None:
        super().__init__(clock)
        self.gap, self.silent = gap, silent
        self.closes, self.outcomes = [], []

    def begin_secagg(self, round, model_version, devices, clip_norm, noise_sigma=0.0, min_survivors=0):
        self.round, self.stage, self.began = round, 0, self.clock()
        self.cohort, self.opened = list(devices), self.clock()

    def _heard(self) -> set[str]:
        return {d for i, d in enumerate(self.cohort) if self.clock() >= self.opened + self.gap * (i + 1)
                and not (d == self.silent and self.stage == 0)}

    def _advance(self) -> None:
        self.cohort = sorted(self._heard())
        self.stage, self.opened = self.stage + 1, self.clock()
        if self.stage == len(self.STAGES):
            self.outcomes.append(SecAggOutcome(self.round, None, "a fake link sums nothing", (), {}, {}))

    def secagg_status(self, round):
        if self.stage < len(self.STAGES) and self._heard() == set(self.cohort):
            self._advance()
        return (self.STAGES[self.stage], self._heard()) if self.stage < len(self.STAGES) else ("", set())

    def secagg_close(self, round, admitted=None):
        self.closes.append((self.STAGES[self.stage], sorted(self._heard()), self.clock() - self.began))
        self._advance()

    def secagg_outcomes(self):
        out, self.outcomes = self.outcomes, []
        return out


def test_secagg_stages_wait_from_the_latest_message_in_virtual_time(plan, tmp_path):
    """A loaded machine under secure aggregation: each stage's messages come 30 s apart on the wall clock (300 s
    for ten devices), each within the 50 s reply timeout of the one before. Every stage then waits for all ten, as
    a plain virtual round does (above), instead of closing 50 s after it opened on the one device heard by then.
    A device that never sends its keys still ends the stage, 50 s after the stage's last message."""
    for silent in ("", "d9"):
        clock = FakeClock()
        link = StagedSecAggLink(clock, gap=30.0, silent=silent)
        for i in range(10):
            link.add_device(f"d{i}")
        policy = RoundPolicy(deadline=10.0, poll=0.5, reply_timeout=50.0)
        coordinator = Coordinator(link, plan, StateStore(tmp_path / f"{silent or 'all'}.db"),
                                  CoordinatorConfig(1, "fedavg", {}, policy, train_config={"clip_norm": 1.0},
                                                    secagg=True), clock=clock, arrivals=lambda d, r: 1.0)
        coordinator.run()
        if not silent:
            assert link.closes == [] and clock() - link.began == pytest.approx(4 * 300.0, abs=2.0)
        else:  # the keys stage closes on the nine (d8's keys came at 270 s), the others wait for those nine
            assert link.closes == [("keys", [f"d{i}" for i in range(9)], pytest.approx(320.0, abs=1.0))]


# --- the whole simulation: the same metrics.json on an idle and on a saturated machine --------------------------

def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def _comparable(out):
    """metrics.json without what measures the machine (seconds of each round, of the run), and the final global
    model's integers."""
    from fedtiny_server.state import StateStore

    metrics = json.loads((out / "metrics.json").read_text())
    metrics["run"].pop("wall_seconds")
    metrics["run"].pop("rounds_seconds")
    metrics["run"].pop("host_model_seconds")
    for row in metrics["rounds"]:
        row.pop("seconds")
    store = StateStore(out / "state.db")
    try:
        ints = {k: v.tolist() for k, v in store.load().ints.items()}
    finally:
        store.close()
    return metrics, ints


def test_same_seed_same_metrics_on_a_machine_busy_on_every_core(tmp_path):
    """Issue 17: the same small run with dropout and stragglers, once as it is and once with a spinning process on
    every core, gives the same metrics.json (accuracy, loss, participants, bytes of every round, who answered)
    and the same global model. The first run speaks JSON lines (--json), the second only its summary (--quiet).
    The deadline is short on purpose: the same pair of runs with --realtime differed here (participants 3, 1, 4
    idle and 0, 0, 1 busy), as issue 17 saw at the default deadline on a loaded machine."""
    from click.testing import CliRunner

    from fedtiny.cli import main

    args = ["simulate", "--nodes", "6", "--rounds", "3", "--scenario", "medical", "--scheme", "last:2",
            "--dropout", "0.2", "--stragglers", "0.5", "--deadline", "0.5", "--seed", "5"]
    idle = CliRunner(mix_stderr=False).invoke(main, args + ["--out", str(tmp_path / "idle"), "--json"])
    assert idle.exit_code == 0, idle.output + idle.stderr
    lines = [json.loads(line) for line in idle.stdout.splitlines()]  # every line of stdout is one JSON object
    events = [e["event"] for e in lines]
    assert events[-1] == "summary" and events.count("round") == 3 and set(events) == {"note", "round", "summary"}
    assert [e["round"] for e in lines if e["event"] == "round"] == [1, 2, 3]
    assert any(e["event"] == "note" and e["message"].startswith("model mlp, update scheme") for e in lines)
    assert lines[-1]["clock"] == "virtual" and lines[-1]["report"].endswith("report.html")

    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    spinners = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 1)]
    for p in spinners:
        p.start()
    try:
        busy = CliRunner(mix_stderr=False).invoke(main, args + ["--out", str(tmp_path / "busy"), "--quiet"])
    finally:
        stop.set()
        for p in spinners:
            p.join(10)
            if p.is_alive():
                p.terminate()
    assert busy.exit_code == 0, busy.output + busy.stderr
    assert busy.stdout.splitlines() == [line for line in busy.stdout.splitlines() if line.startswith("report: ")]
    assert len(busy.stdout.splitlines()) == 1 and busy.stderr == "", (busy.stdout, busy.stderr)

    idle_metrics, idle_ints = _comparable(tmp_path / "idle")
    busy_metrics, busy_ints = _comparable(tmp_path / "busy")
    participants = [r["participants"] for r in idle_metrics["rounds"]]
    assert min(participants) < 6, participants  # dropouts and late stragglers did cut rounds
    assert any(d["straggler"] and d["missed"] for d in idle_metrics["devices"].values())
    assert busy_metrics == idle_metrics
    assert busy_ints == idle_ints


# --- the coordinator's options in simulate ---------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (["--strategy", "fedsgd"], "--strategy fedsgd: unknown strategy 'fedsgd'"),
    (["--strategy", "fedavg", "--strategy-option", "beta=0.2"], "FedAvg takes no option(s) ['beta']"),
    (["--strategy", "krum", "--strategy-option", "num_malicious_nodes"], "must read KEY=VALUE"),
    (["--quorum", "0"], "--quorum 0.0: must be a fraction in (0, 1]"),
    (["--fraction", "1.5"], "--fraction 1.5: must be a fraction in (0, 1]"),
    (["--clip-norm", "-1"], "--clip-norm -1.0: must be 0 (off) or more"),
    (["--local-steps", "70000"], "--local-steps 70000: must be 0..65535"),
    (["--max-examples", "0"], "--max-examples 0: must be at least 1"),
    (["--max-staleness", "-1"], "--max-staleness -1: must be 0 (synchronous) or more"),
    (["--quiet", "--json"], "--quiet and --json: choose one"),
    (["--engine", "flower", "--realtime"], "--realtime is for --engine mqtt"),
])
def test_bad_coordinator_options_are_one_line_and_exit_2(tmp_path, options, message):
    from click.testing import CliRunner

    from fedtiny.cli import main

    if "flower" in options:
        from conftest import require_module

        require_module("ray", "simulation")
    out = tmp_path / "run"
    result = CliRunner(mix_stderr=False).invoke(main, ["simulate", "--nodes", "2", "--scenario", "medical",
                                                       "--out", str(out), *options])
    assert result.exit_code == 2, (result.output, result.stderr)
    assert result.stderr.startswith("Error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()  # refused before any work


def test_coordinator_options_reach_the_coordinator(tmp_path):
    """--strategy with --strategy-option, --local-steps and --clip-norm as `fedtiny coordinator` takes them: the
    strategy the coordinator runs, what each node trained (num_examples = the distinct samples of 5 steps), and
    updates clipped to a norm of 1e-9: the global model's integers do not move."""
    from fedtiny.planfile import load_plan
    from fedtiny_server.state import StateStore
    from fedtiny_sim.simulate import SimulationConfig, simulate

    out = tmp_path / "run"
    result = simulate(SimulationConfig(nodes=3, rounds=1, scenario="medical", scheme="last:2", out=str(out),
                                       strategy="fedtrimmedavg",
                                       strategy_options="beta=0.34", local_steps=5, clip_norm=1e-9))
    events = [json.loads(line) for line in (out / "coordinator.jsonl").read_text().splitlines()]
    started = next(e for e in events if e["event"] == "coordinator_started")
    assert started["strategy"] == "FedTrimmedAvg"
    accepted = [e for e in events if e["event"] == "reply_accepted"]
    assert len(accepted) == 3 and {e["num_examples"] for e in accepted} == {5}
    assert result["rounds"][0]["participants"] == 3
    store = StateStore(out / "state.db")
    try:
        final = store.load()
    finally:
        store.close()
    initial = load_plan(out / "plan.ftp").initial_state()
    assert final.model_version == 1 and all(np.array_equal(final.ints[k], initial[k]) for k in initial)


def test_flower_engine_gives_the_mqtt_engines_rounds_with_dropout_and_stragglers(tmp_path):
    """Both engines give the coordinator the same virtual arrivals: with dropouts and late stragglers, the same
    participants, accuracy and loss in every round, and the same global model."""
    from conftest import require_module
    from fedtiny_sim.simulate import SimulationConfig, simulate

    require_module("ray", "simulation")
    runs = {}
    for engine in ("mqtt", "flower"):
        config = SimulationConfig(nodes=6, rounds=3, scenario="medical", scheme="last:2", dropout=0.3, stragglers=0.5,
                                  deadline=1.0,
                                  seed=1, out=str(tmp_path / engine), engine=engine)
        runs[engine] = simulate(config)
    keys = ("accuracy", "loss", "participants")
    mqtt, flower = ([[r[k] for k in keys] for r in runs[e]["rounds"]] for e in ("mqtt", "flower"))
    assert flower == mqtt
    assert min(r[2] for r in mqtt) < 6  # dropouts and stragglers did cut rounds
    assert _comparable(tmp_path / "flower")[1] == _comparable(tmp_path / "mqtt")[1]


def test_a_fraction_of_the_nodes_is_sampled_the_same_way_for_the_same_seed(tmp_path):
    """--fraction 0.5: Flower samples the cohort with Python's `random`; seeded per round, two runs task the same
    nodes in every round (and not the same nodes in every round)."""
    from fedtiny_sim.simulate import SimulationConfig, simulate

    tasked = []
    for run in ("a", "b"):
        out = tmp_path / run
        simulate(SimulationConfig(nodes=6, rounds=3, scenario="medical", scheme="last:2", fraction=0.5, seed=4,
                                  out=str(out)))
        events = [json.loads(line) for line in (out / "coordinator.jsonl").read_text().splitlines()]
        tasked.append([sorted(e["device"] for e in events if e["event"] == "task_sent" and e["round"] == r)
                       for r in (1, 2, 3)])
    assert tasked[0] == tasked[1]
    assert all(len(devices) == 3 for devices in tasked[0]) and len({tuple(d) for d in tasked[0]}) > 1, tasked


# --- a run killed outright: its helper processes end too -------------------------------------------------------

def _helper(pids) -> None:
    """Plays the broker or a worker: waits for a stop nobody will set."""
    from fedtiny_sim.stop import wait_for_stop

    stop = multiprocessing.get_context("spawn").Event()
    pids.put(os.getpid())  # started and imported: only the wait is left
    wait_for_stop(stop, 0.2)


def _run_process(pids) -> None:
    """Plays a simulate process: starts a helper, then waits to be killed."""
    multiprocessing.get_context("spawn").Process(target=_helper, args=(pids,)).start()
    time.sleep(600)


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaps (a container's init may not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_helper_process_ends_when_the_run_that_started_it_is_killed():
    if not os.path.isdir("/proc"):
        pytest.skip("reads /proc")
    ctx = multiprocessing.get_context("spawn")
    pids = ctx.Queue()
    run = ctx.Process(target=_run_process, args=(pids,))
    run.start()
    helper = pids.get(timeout=120)
    os.kill(run.pid, signal.SIGKILL)  # no finally, no stop.set(): only the helper's own check can end it
    run.join(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _gone(helper):
            return
        time.sleep(0.2)
    os.kill(helper, signal.SIGKILL)
    pytest.fail(f"helper {helper} outlived the killed run by 30 s")
