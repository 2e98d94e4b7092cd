"""What `fedtiny simulate` writes when its output goes to a file, as a user's `fedtiny simulate > run.txt 2>&1` or a
CI log has it: each phase and round while the run goes (not all at the end), and no component's traceback.

amqtt 0.11.4 printed "Unhandled exception in client_connected_cb ... RuntimeError: dictionary changed size during
iteration" on the console in 6 of about 20 default runs; the broker now runs in its own process, whose stderr
goes to the run's link.log (simulations/broker_process.py), and this test runs the command several times.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUNS = 2  # one with plain lines, one with --json
# The smallest plan (medical: the mlp), two nodes, two rounds; --lr and --epochs skip the choice on host data.
ARGS = ["--nodes", "2", "--rounds", "2", "--scenario", "medical", "--scheme", "last:2", "--lr", "0.03", "--epochs",
        "1"]
PHASES = ("preparing the model", "starting the broker and 2 nodes")
ROUNDS = {False: ("round 1/2:", "round 2/2:"),  # a plain line per round (not a terminal)
          True: ('"event": "round", "round": 1,', '"event": "round", "round": 2,')}  # --json
# What Python, asyncio and threads print when something failed that nothing handled.
TRACEBACKS = ("Traceback (most recent call last)", "Unhandled exception", "Exception ignored in",
              "Exception in thread", "Task exception was never retrieved")


def _run_into_file(out: Path, log: Path, json_lines: bool, timeout: float = 600) -> dict[str, bool]:
    """`fedtiny simulate ... [--json] > log 2>&1`; for each phase and round line, whether the file showed it while
    the command was still running."""
    cli = [sys.executable, "-c", "from fedtiny.cli import main; main()", "simulate", *ARGS, "--out", str(out),
           *(["--json"] if json_lines else [])]
    lines = PHASES + ROUNDS[json_lines]
    seen_running = {}
    with log.open("wb") as sink:
        proc = subprocess.Popen(cli, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
        end = time.monotonic() + timeout
        while proc.poll() is None:
            text = log.read_text(errors="replace")
            for line in lines:
                if line in text and proc.poll() is None:
                    seen_running.setdefault(line, True)
            if time.monotonic() > end:
                proc.kill()
                pytest.fail(f"fedtiny simulate did not finish in {timeout:.0f} s:\n{text[-3000:]}")
            time.sleep(0.05)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return {line: seen_running.get(line, False) for line in lines if line in text}


def test_output_into_a_file_is_live_and_free_of_tracebacks(tmp_path):
    for i in range(RUNS):
        log = tmp_path / f"console-{i}.txt"
        json_lines = i == 1  # one run with --json: its events go to stdout, a file here too
        live = _run_into_file(tmp_path / f"run-{i}", log, json_lines)
        text = log.read_text(errors="replace")
        found = [t for t in TRACEBACKS if t in text]
        assert not found, f"run {i} printed {found}:\n{text[-4000:]}"
        assert set(live) == set(PHASES + ROUNDS[json_lines]), f"run {i} lacks lines:\n{text}"
        # Each phase, and the first round, was in the file before the command ended: written when it happened.
        # (After round 1 come round 2 and the report, so a run that buffered its output would show none of these.)
        late = [line for line in PHASES + ROUNDS[json_lines][:1] if not live[line]]
        assert not late, f"run {i}: {late} reached the file only at the end:\n{text}"
        assert (tmp_path / f"run-{i}" / "metrics.json").exists()


def test_broker_process_stderr_goes_to_the_run_log(tmp_path):
    """Anything the broker's process writes to stderr (asyncio's reports of exceptions no task handled, Python's
    "Exception ignored", a dying thread's traceback) lands in the run folder's log, not on the console."""
    from fedtiny.protocol.keys import provision_fleet
    from fedtiny_sim.broker_process import BrokerProcess

    if not Path("/proc/self/fd/2").exists():
        pytest.skip("needs /proc to read the broker process's file descriptors")
    provision_fleet(tmp_path / "fleet", "sim", ["node000"])
    log = tmp_path / "link.log"
    broker = BrokerProcess(tmp_path / "fleet", log).start()
    try:
        pid = broker._process.pid
        assert os.readlink(f"/proc/{pid}/fd/2") == str(log)
    finally:
        broker.stop()
