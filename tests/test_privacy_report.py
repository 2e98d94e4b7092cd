"""`fedtiny privacy-report` on one small real run (medical, 3 nodes, 2 rounds, central DP, --capture): its epsilon
against dp-accounting's own, the page in headless chromium, the capture scan (clean on the real run, and finding
samples a node publishes through the real embedded broker on purpose), and bad input as one line."""

import json
import shutil
import subprocess
import time
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from fedtiny.cli import main
from fedtiny_sim.sample_scan import Payload, scan
from fedtiny_sim.simulate import SimulationConfig, simulate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("privacy") / "run"
    # lr and epochs given (no tuning trials) and one worker process: the cheapest real run with DP and a capture
    simulate(SimulationConfig(nodes=3, rounds=2, scenario="medical", scheme="last:2", out=str(out), seed=3,
                              dp_epsilon=8.0,
                              capture=True, lr=0.03, epochs=1, workers=1))
    return out


def copy_of(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def report(args):
    result = CliRunner().invoke(main, ["privacy-report", *map(str, args)])
    return result.exit_code, result.output


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    section = markdown.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]


def test_the_report_says_what_the_run_did(run, tmp_path):
    out = copy_of(run, tmp_path)
    code, output = report([out])
    assert code == 0, output
    captured = len((out / "capture.jsonl").read_text().splitlines())
    carried = sum(len(__import__("base64").b64decode(json.loads(line)["payload"]))
                  for line in (out / "capture.jsonl").read_text().splitlines())
    clean = f"no raw sample found in {captured:,} payloads, {carried:,} bytes"
    assert clean in output and "lines verified" in output
    markdown = (out / "privacy_report.md").read_text()
    assert clean in markdown
    # every accepted DELTA of the coordinator's log, per round and device
    deltas = [json.loads(line) for line in (out / "coordinator.jsonl").read_text().splitlines()]
    deltas = sorted((e["round"], e["device"], e["uplink_bytes"]) for e in deltas if e["event"] == "reply_accepted")
    rows = table_rows(markdown, "What left each device")
    assert [(int(r[0]), r[1], int(r[3].replace(",", ""))) for r in rows if r[2] == "DELTA" and r[0].isdigit()] == deltas
    # the broker saw the DELTAs as ciphertext, JOIN and STATUS in the clear, from each device
    assert any(r[1] == "DELTA" and r[2] == "encrypted" for r in rows if r[0] == "node000")
    for heading in ("What the coordinator saw", "Crypto and key inventory", "Retention", "Audit log",
                    "Requirements, mechanisms and evidence in this run"):
        assert f"## {heading}" in markdown
    assert "each device's individual update, decrypted" in markdown  # no secure aggregation in this run
    requirements = [r[0] for r in table_rows(markdown, "Requirements, mechanisms and evidence in this run")]
    for article in ("GDPR Art. 25", "GDPR Art. 30", "GDPR Art. 32", "GDPR Art. 35", "HIPAA 164.312(b)",
                    "IEC 62443-3-3 SR 2.8"):
        assert any(r.startswith(article) for r in requirements), article
    # no key material: the private keys' bytes appear nowhere in the report
    secret = (out / "fleet/coordinator/audit.key").read_text().splitlines()[1]
    identity = (out / "fleet/coordinator/identity.key").read_bytes().hex()
    html = (out / "privacy_report.html").read_text()
    assert secret not in html and identity[:32] not in html and identity[:32] not in markdown


def test_the_attack_section_is_membership_auc_on_the_run(run, tmp_path):
    from fedtiny_sim.attack import membership_auc

    out = copy_of(run, tmp_path)
    code, output = report([out, "--attack"])
    assert code == 0, output
    rows = table_rows((out / "privacy_report.md").read_text(), "Membership inference, measured on this run")
    result = membership_auc(out)
    assert rows[2][0] == "the final global model" and float(rows[2][2]) == round(result["global_model"]["auc"], 3)
    assert int(rows[3][3]) == result["device_update"]["attacks"] > 0  # no secure aggregation: each DELTA attacked


def test_the_reports_epsilon_is_dp_accountings(run, tmp_path):
    """Each device's and the fleet's epsilon, as the report prints them, against dp-accounting's RDP accountant
    composed here from the run's noise multiplier, the device's rounds and delta."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    out = copy_of(run, tmp_path)
    assert report([out])[0] == 0
    privacy = json.loads((out / "metrics.json").read_text())["run"]["privacy"]
    rows = table_rows((out / "privacy_report.md").read_text(), "Differential privacy")[1:]
    assert len(rows) == 4  # three devices and the fleet
    for device, releases, here, _, delta in rows:
        accountant = RdpAccountant()
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(privacy["noise_multiplier"]), int(releases)))
        assert float(here) == pytest.approx(accountant.get_epsilon(float(delta)), abs=5e-5), device
    assert float(rows[-1][2]) == pytest.approx(8.0, abs=1e-3)  # the budget, spent
    # no --clip-norm: the run took it from the host's data (fedtiny.privacy.clip_norm_rule), and says so
    run_settings = json.loads((out / "metrics.json").read_text())["run"]
    rule = f"clip norm {privacy['clip_norm']:g} from the host's data: quantile 0.5 of the L2 norms of "
    assert run_settings["clip_norm"] == privacy["clip_norm"] > 0 and run_settings["clip_rule"].startswith(rule)
    assert privacy["clip_norm_rule"] == run_settings["clip_rule"]
    assert f"How the clip norm was chosen: {run_settings['clip_rule']}." in (out / "privacy_report.md").read_text()


# --- the page in a browser ----------------------------------------------------------------------------------------

def browse(page, tmp):
    """Headless chromium on `page`: its console messages (chromium's log on stderr) and the URLs it requested
    (its net log; the browser's own background requests are told apart by their network isolation key)."""
    from conftest import require_tool

    chromium = require_tool("chromium")
    net_log = tmp / f"{page.stem}-net.json"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions", "--no-first-run",
         "--virtual-time-budget=5000", f"--user-data-dir={tmp / 'chromium-profile'}", f"--log-net-log={net_log}",
         "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    log = json.loads(net_log.read_text())
    requests = [e["params"]["url"] for e in log["events"] if "url" in e.get("params", {})
                and str(e["params"].get("network_isolation_key", "")).startswith("file:")]
    return done.stdout, console, requests


def test_the_console_check_sees_a_page_with_errors(tmp_path):
    page = tmp_path / "noisy.html"
    page.write_text("<html><body><script>console.error('planted error'); undefined_call();</script></body></html>")
    _, console, _ = browse(page, tmp_path)
    assert any("planted error" in line for line in console), console


def test_the_html_report_opens_in_chromium_without_console_errors(run, tmp_path):
    out = copy_of(run, tmp_path)
    assert report([out])[0] == 0
    html = (out / "privacy_report.html").read_text()
    assert "<script" not in html.lower() and "http" not in html.lower() and "url(" not in html.lower()
    dom, console, requests = browse(out / "privacy_report.html", tmp_path)
    assert console == [] and requests == []
    assert "Capture scan" in dom and "no raw sample found in" in dom.lower()


# --- the capture scan ---------------------------------------------------------------------------------------------

def test_planted_samples_are_found_through_the_real_broker(run, tmp_path):
    """node000 publishes, through the embedded amqtt broker with its capture on, payloads that hide samples: its
    own int8 sample at an odd offset, node001's sample as float32 inside a zlib stream after some bytes, node002's
    as big-endian float64, and one split over two chunks of a chunked transfer. The scan finds each one."""
    import paho.mqtt.client as mqtt
    from fedtiny.planfile import load_plan
    from fedtiny.protocol.chunking import split
    from fedtiny_sim.broker_process import BrokerProcess
    from fedtiny_sim.sample_scan import input_quantization

    out = copy_of(run, tmp_path)
    clean = len((out / "capture.jsonl").read_text().splitlines())
    scale, zero_point = input_quantization(load_plan(out / "plan.ftp"))
    x = {d: np.load(out / "nodes" / f"{d}.npz")["x"] for d in ("node000", "node001", "node002")}
    real = lambda q: (q.reshape(-1).astype(np.float64) - zero_point) * scale  # noqa: E731
    noise = np.random.default_rng(5).integers(0, 256, 300, dtype=np.uint8).tobytes()
    planted = [noise[:7] + x["node000"][3].tobytes() + noise[7:40],
               noise[:13] + zlib.compress(real(x["node001"][5]).astype("<f4").tobytes()) + noise[:5],
               real(x["node002"][0]).astype(">f8").tobytes() + noise[:3],
               *split(noise[:220] + x["node000"][7].tobytes() + noise[220:], 77, 256)]  # chunks of 232 B of data
    broker = BrokerProcess(out / "fleet", tmp_path / "link.log", capture=out / "capture.jsonl").start()
    try:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="node000")
        client.username_pw_set("node000", (out / "fleet/devices/node000/password").read_text())
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        for payload in planted:
            client.publish("fedtiny/sim/up/node000", payload, qos=1).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()
        deadline = time.monotonic() + 10
        while len((out / "capture.jsonl").read_text().splitlines()) < clean + len(planted):
            assert time.monotonic() < deadline, "the broker did not record every publish"
            time.sleep(0.05)
    finally:
        broker.stop()
    code, output = report([out])
    assert code == 0, output
    assert "RAW SAMPLES FOUND" in output
    rows = table_rows((out / "privacy_report.md").read_text(), "Capture scan: raw samples in what the broker carried")
    found = {(r[3], int(r[4]), r[5]) for r in rows[1:]}
    assert {("node000", 3, "int8"), ("node001", 5, "float32 LE"), ("node002", 0, "float64 BE"),
            ("node000", 7, "int8")} <= found, rows
    by_sample = {(r[3], int(r[4])): r for r in rows[1:]}
    assert by_sample["node000", 3][6] == "7" and by_sample["node001", 5][7] == "13"  # offset; the zlib stream's start
    assert all(r[1] == "node000" and r[2] == "fedtiny/sim/up/node000" for r in rows[1:])


def test_the_scan_finds_a_sample_at_every_offset_and_reports_uniform_ones():
    rng = np.random.default_rng(1)
    samples = {"dev": rng.integers(-128, 128, size=(4, 12)).astype(np.int8)}
    samples["dev"][3] = 5  # one value only: it would match any padding of that byte
    payloads = [Payload("dev", "t", rng.bytes(offset) + samples["dev"][1].tobytes() + rng.bytes(9))
                for offset in range(9)]
    payloads.append(Payload("dev", "t", zlib.compress(rng.bytes(50)) + rng.bytes(64)))  # no sample in it
    result = scan(payloads, samples, 0.1, 0)
    assert [(f.payload, f.sample, f.offset, f.encoding) for f in result.findings] == \
        [(offset, 1, offset, "int8") for offset in range(9)]
    assert result.uniform == [("dev", 3)] and result.inflated >= 1


# --- secure aggregation, and bad input ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):
    """`fedtiny simulate --secagg --dp-epsilon 4`, as small as it runs: 3 nodes (secure aggregation's least), 2
    rounds, lr and epochs given (no tuning trials), one worker process."""
    out = tmp_path_factory.mktemp("privacy_secagg") / "run"
    simulate(SimulationConfig(nodes=3, rounds=2, scenario="medical", out=str(out), seed=3, dp_epsilon=4.0,
                              secagg=True, lr=0.03, epochs=1, workers=1))
    return out


def test_a_real_secagg_runs_report_says_what_the_coordinator_saw_and_what_the_clamp_costs(secagg_run, tmp_path):
    """The report of a real secure-aggregation run with distributed DP, checked against the run's own files:
    the coordinator's log names each round's survivors, its state.db holds no individual DELTA, the attack
    section's round-sum row attacks exactly those survivors' rounds and no DELTA, and the clamp's delta term is
    (1 + e^epsilon) 2 e^-72 per element noised in a released round, from the plan's trainable elements and the
    logged survivors."""
    import math
    import sqlite3

    from fedtiny.planfile import load_plan

    out = copy_of(secagg_run, tmp_path)
    code, output = report([out, "--attack"])
    assert code == 0, output
    markdown = (out / "privacy_report.md").read_text()
    events = [json.loads(line) for line in (out / "coordinator.jsonl").read_text().splitlines()]
    survivors = {e["round"]: e["survivors"] for e in events if e["event"] == "secagg_round" and "survivors" in e}
    assert sorted(survivors) == [1, 2] and all(len(s) == 3 for s in survivors.values())
    db = sqlite3.connect(out / "state.db")
    assert db.execute("SELECT COUNT(*) FROM replies").fetchone()[0] == 0  # never one device's DELTA
    db.close()
    assert "only masked sums (secure aggregation)" in markdown and "individual update, decrypted" not in markdown
    saw = table_rows(markdown, "What the coordinator saw")[1:]  # each masked round, as the coordinator logged it
    assert [(int(r[0]), r[1], r[2], r[5]) for r in saw] == [
        (rnd, f"3: {', '.join(names)}", "none", "the sum of the survivors' masked deltas only")
        for rnd, names in sorted(survivors.items())]
    rows = {r[0]: r for r in table_rows(markdown, "Membership inference, measured on this run")}
    assert "This run used secure aggregation: the coordinator never held a device's DELTA" in markdown
    assert rows["one device's DELTA"][2:] == ["-", "0"]
    assert int(rows["the round's sum"][3]) == sum(len(s) for s in survivors.values())
    # the clamp line, from the run's files: the plan's elements, the logged survivors, the fleet's epsilon
    plan = load_plan(out / "plan.ftp")
    elements = sum(int(np.prod(plan.buffers[n].shape)) for n in plan.trainable_buffers())
    privacy = json.loads((out / "metrics.json").read_text())["run"]["privacy"]
    fleet = table_rows(markdown, "Differential privacy")[-1]
    assert fleet[0].startswith("fleet") and float(fleet[2]) == pytest.approx(privacy["epsilon"], abs=5e-5)
    clamp = (1 + math.exp(privacy["epsilon"])) * 2 * math.exp(-72) * elements * sum(map(len, survivors.values()))
    assert f"the clamp adds {clamp:.2g} to delta" in markdown
    assert f"epsilon {privacy['epsilon']:.4f} at delta {privacy['delta']:g} + {clamp:.2g}" in markdown
    assert privacy["round_survivors"] == [len(survivors[r]) for r in sorted(survivors)]


def test_bad_input_is_one_line_and_exit_2(run, tmp_path):
    from fedtiny.audit import new_key_pem

    out = copy_of(run, tmp_path)
    (tmp_path / "empty").mkdir()
    _, other = new_key_pem()
    (tmp_path / "other.pub").write_bytes(other)
    cases = [([tmp_path / "missing"], "no such run folder"),
             ([tmp_path / "empty"], "not a run folder of `fedtiny simulate` (no metrics.json)"),
             ([out, "--key", tmp_path / "other.pub"], "line 1: signed by key")]
    for args, message in cases:
        code, output = report(args)
        assert code == 2 and output.count("\n") == 1 and message in output, (args, output)
    lines = (out / "audit.jsonl").read_text().splitlines(keepends=True)
    (out / "audit.jsonl").write_text("".join(lines[:2] + lines[3:]))
    code, output = report([out])
    assert code == 2 and output.count("\n") == 1 and "audit.jsonl: line 3" in output, output
    (out / "audit.jsonl").write_text("".join(lines))
    (out / "capture.jsonl").write_text("{not json\n")
    code, output = report([out])
    assert code == 2 and output.count("\n") == 1 and "capture.jsonl: line 1: not a capture record" in output, output


def test_capture_needs_the_embedded_broker():
    from fedtiny_sim.simulate import ConfigError, check_inputs

    for options in (dict(broker="mqtt://127.0.0.1:1883", fleet_dir="fleet"), dict(engine="flower")):
        with pytest.raises(ConfigError, match="--capture records what the embedded broker carries"):
            check_inputs(SimulationConfig(nodes=2, rounds=1, scenario="medical", capture=True, **options))
