"""The report a simulation leaves: report.html in a real headless browser, and each item of the report checked
against an independent computation, on one small real run (medical, 4 nodes, dropout, with the fp32 baseline)
and on hand-made inputs where a real run cannot show a case (a target only one side reaches, every reason a round
can be missed)."""

import json
import re
import subprocess
from html import escape
from pathlib import Path

import numpy as np
import pytest

from fedtiny_sim import report, report_data
from fedtiny_sim.simulate import SimulationConfig, dropped_rounds, simulate


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    config = SimulationConfig(nodes=4, rounds=2, scenario="medical", scheme="last:2", out=str(out), seed=3, dropout=0.3,
                              deadline=4.0, baseline=True)
    result = simulate(config)
    return result, out, config


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# --- report.html in a browser -----------------------------------------------------------------------------------

# Added to a copy of the page by the test only (the report itself has no script): once the page has loaded, it
# writes each image's decoded and laid-out size into the DOM, which --dump-dom then prints.
PROBE = """<script>
window.addEventListener('load', () => {
  for (const img of document.images)
    img.setAttribute('data-rendered', img.naturalWidth + 'x' + img.naturalHeight + 'x' +
                     Math.round(img.getBoundingClientRect().width));
  document.body.setAttribute('data-probed', 'yes');
});
</script>"""


def render(page: Path, tmp: Path) -> tuple[str, list[str]]:
    """Chromium headless on `page`: the DOM after load, and the URLs of every network request the page made
    (from the browser's own net log; the browser's background requests are left out by their network isolation
    key: a page opened from a file has file://)."""
    from conftest import require_tool

    chromium = require_tool("chromium")
    net_log = tmp / f"{page.stem}-net.json"
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions", "--no-first-run",
         "--virtual-time-budget=5000", f"--user-data-dir={tmp / 'chromium-profile'}", f"--log-net-log={net_log}",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    log = json.loads(net_log.read_text())
    return dom, [e["params"]["url"] for e in log["events"] if "url" in e.get("params", {})
                 and str(e["params"].get("network_isolation_key", "")).startswith("file:")]


def test_the_net_log_check_sees_a_page_that_fetches(tmp_path):
    """The check below can fail: a page with images from elsewhere shows their requests."""
    page = tmp_path / "fetches.html"
    page.write_text('<html><body><img src="http://127.0.0.1:9/a.png"><img src="https://example.invalid/b.png">'
                    "</body></html>")
    _, requests = render(page, tmp_path)
    assert {"http://127.0.0.1:9/a.png", "https://example.invalid/b.png"} <= set(requests), requests


def test_report_html_renders_offline_with_its_tables_and_plots(real_run, tmp_path):
    result, out, _ = real_run
    html = (out / "report.html").read_text()
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)  # base64 may hold "//"
    assert not re.search(r"(https?|ftp):|//[a-z0-9]|<script|<link|@import|url\(", text, re.I), "external or script"
    page = tmp_path / "report.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    dom, requests = render(page, tmp_path)
    assert requests == []
    assert 'data-probed="yes"' in dom
    sizes = re.findall(r'<img alt="([\w.]+)"[^>]*data-rendered="(\d+)x(\d+)x(\d+)"', dom)
    assert sorted(name for name, *_ in sizes) == sorted(report.PLOTS)
    assert all(int(w) > 0 and int(h) > 0 and int(shown) > 0 for _, w, h, shown in sizes), sizes
    rounds_table = dom.split("<h2>Rounds</h2>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr><td>(\d+)</td><td>([\d.]+) %</td>", rounds_table)
    assert [int(r) for r, _ in rows] == [0, 1, 2]  # round 0: the model before any round
    assert [float(a) for _, a in rows] == [round(100 * a, 1) for a in
                                          [result["initial_accuracy"]] + [r["accuracy"] for r in result["rounds"]]]
    flow = dom.split("<h2>Data flow</h2>", 1)[1].split("</table>", 1)[0]
    deltas = sum(1 for line in (out / "data_flow.csv").read_text().splitlines() if ",DELTA," in line)
    assert re.search(rf"<td class=\"text\">DELTA</td><td>{deltas}</td>", flow), flow
    for heading in ("Per-class recall", "Devices", "Settings", "Against plain Flower + PyTorch fp32",
                    "What federation and personalisation gain"):
        assert heading in dom


# --- the items of the report, on the real run -------------------------------------------------------------------

def test_accuracy_plot_starts_at_round_0_on_a_0_to_100_axis(real_run, monkeypatch, tmp_path):
    result, out, _ = real_run
    m = metrics(out)
    figures = []
    monkeypatch.setattr(report.plt, "close", figures.append)
    report._plot_accuracy(tmp_path / "a.png", m["run"], m["rounds"], m["baseline"])
    accuracy_axes = figures[0].axes[0]
    assert accuracy_axes.get_ylim() == (0, 100)
    fedtiny, fp32 = accuracy_axes.lines[:2]
    assert list(fedtiny.get_xdata()) == [0, 1, 2]
    assert fedtiny.get_ydata()[0] == pytest.approx(100 * result["initial_accuracy"])
    assert list(fp32.get_xdata()) == [0, 1, 2]
    assert fp32.get_ydata()[0] == pytest.approx(100 * result["baseline"]["initial_accuracy"])


def test_plots_render_without_the_mathtext_parser(real_run, monkeypatch, tmp_path):
    """The bytes plot's log axis is labelled in plain numbers: matplotlib's default 10^x labels went through its
    mathtext parser, a third of the report's CPU time. Every plot renders with the parser gone."""
    import matplotlib.mathtext

    _, out, _ = real_run
    m = metrics(out)
    monkeypatch.setattr(matplotlib.mathtext.MathTextParser, "parse",
                        lambda *a, **k: pytest.fail("a plot label went through the mathtext parser"))
    report._plot_bytes(tmp_path / "b.png", m["rounds"], m["baseline"])
    report._plot_bytes(tmp_path / "b.png", m["rounds"], None)  # one decade or less: the minor ticks are labelled
    report._plot_accuracy(tmp_path / "a.png", m["run"], m["rounds"], m["baseline"])
    report._plot_recall(tmp_path / "r.png", m["run"], m["rounds"])
    report._plot_memory(tmp_path / "m.png", m["memory"])


def test_per_class_recall_comes_from_the_held_out_confusion_matrix(real_run):
    result, out, _ = real_run
    m = metrics(out)
    held_out = None
    for accuracy, flat in [(m["run"]["initial_accuracy"], m["run"]["initial_confusion"])] + \
            [(r["accuracy"], r["confusion"]) for r in m["rounds"]]:
        matrix = report_data.confusion(flat)
        assert matrix.shape == (2, 2)  # medical: malignant, benign
        held_out = held_out or int(matrix.sum())
        assert matrix.sum() == held_out and np.trace(matrix) / held_out == pytest.approx(accuracy)
    summary = (out / "summary.md").read_text()
    final = report_data.recall(m["rounds"][-1]["confusion"])
    for name, value in zip(m["run"]["classes"], final):
        assert re.search(rf"\| {name} \| \d+ \| [\d.]+ % \| {100 * value:.1f} % \|", summary), summary


def test_device_accuracy_before_and_after_on_its_own_samples(real_run):
    from fedtiny.interpreter import run
    from fedtiny.planfile import load_plan
    from fedtiny_server.state import StateStore

    _, out, _ = real_run
    devices = metrics(out)["devices"]
    plan = load_plan(out / "plan.ftp")
    store = StateStore(out / "state.db")
    final, reported = store.load().ints, store.reply_metrics()
    store.close()
    for device in ("node000", "node003"):
        data = np.load(out / "nodes" / f"{device}.npz")
        for key, graph in (("accuracy_before", plan.graph), ("accuracy_after", plan.graph_with(final))):
            labels = run(graph, data["x"]).reshape(len(data["y"]), -1).argmax(axis=1)  # the reference interpreter
            assert devices[device][key] == pytest.approx(float((labels == data["y"]).mean())), (device, key)
        last = devices[device]["answered"][-1]
        assert devices[device]["reported_round"] == last
        assert devices[device]["reported_accuracy"] == pytest.approx(reported[last, device]["accuracy"])
        table = (out / "report.html").read_text().split("<h2>Devices</h2>", 1)[1]
        row = table.split(f'<td class="text">{device}</td>', 1)[1].split("</tr>")[0]
        assert f"<td>{100 * devices[device]['accuracy_after']:.1f} %</td>" in row


def test_missed_rounds_say_why(real_run):
    _, out, config = real_run
    from dataclasses import asdict

    devices = metrics(out)["devices"]
    dropped = dropped_rounds(asdict(config), [f"node{i:03d}" for i in range(4)])
    assert dropped, "seed 3 drops a node: the test needs one"
    for device, rounds in dropped.items():
        for r in rounds:
            assert r in devices[device]["missed"]
            assert devices[device]["why"][str(r)].startswith("dropped out (--dropout)")
    missed = [(k, r) for k, d in devices.items() for r in d["missed"]]
    assert sorted(missed) == sorted((k, int(r)) for k, d in devices.items() for r in d["why"])
    html = (out / "report.html").read_text()
    assert all(f"<td class=\"text\">{k}</td><td>{r}</td>" in html for k, r in missed)


def test_nodes_with_too_few_samples_of_a_class_are_named(real_run):
    _, out, _ = real_run
    few = {}
    for path in sorted((out / "nodes").glob("*.npz")):
        classes, counts = np.unique(np.load(path)["y"], return_counts=True)
        small = {str(int(c)): int(n) for c, n in zip(classes, counts) if n < report_data.NODE_MIN_PER_CLASS}
        if small:
            few[path.stem] = small
    assert few, "seed 3 gives a node a single benign sample: the test needs one"
    assert metrics(out)["few_samples"] == few
    summary = (out / "summary.md").read_text()
    assert f"**Warning:** {len(few)} of 4 nodes hold fewer than {report_data.NODE_MIN_PER_CLASS} samples" in summary
    html = (out / "report.html").read_text()
    assert all(device in summary and f"<td class=\"text\">{device}</td>" in html for device in few)


def test_targets_are_stated_with_their_rule(real_run):
    result, out, _ = real_run
    summary = (out / "summary.md").read_text()
    assert result["targets"], "with a baseline there is always the parity target"
    for t in result["targets"]:
        assert t["rule"] in summary and escape(t["rule"]) in (out / "report.html").read_text()
        curve = [(0, result["initial_accuracy"])] + [(r["round"], r["accuracy"]) for r in result["rounds"]]
        assert t["fedtiny"] == next((r for r, a in curve if a >= t["accuracy"]), None)


# --- cases a small real run does not show -----------------------------------------------------------------------

def rounds_of(*accuracies):
    return [dict(round=i + 1, accuracy=a) for i, a in enumerate(accuracies)]


def test_targets_compare_against_the_baselines_results_not_fedtinys_own():
    """Issue #16's run: fp32 reached 87.5 %, fedtiny 55 % from a 50 % start. The old rule (0.9 x fedtiny's best,
    49.5 %) showed "1 vs 1"."""
    fedtiny = rounds_of(0.50, 0.52, 0.53, 0.55, 0.55)
    fp32 = dict(initial_accuracy=0.5, rounds=rounds_of(0.70, 0.80, 0.85, 0.875, 0.875))
    both, parity = report_data.accuracy_targets(0.50, fedtiny, fp32)
    assert both["accuracy"] == pytest.approx(0.5 + 0.9 * 0.05)  # both reach it, above either start
    assert (both["fedtiny"], both["baseline"]) == (4, 1)
    assert parity["accuracy"] == pytest.approx(0.855) and "minus 2 points" in parity["rule"]
    assert (parity["fedtiny"], parity["baseline"]) == (None, 4)  # 85 % < 85.5 % <= 87.5 %
    assert report_data.reached(parity, "fedtiny", fedtiny) == "not in 5 rounds (best 55.0 %)"


def test_no_target_both_reach_when_a_side_never_beats_the_start():
    flat = rounds_of(0.70, 0.69)
    assert report_data.accuracy_targets(0.70, flat) == []
    (parity,) = report_data.accuracy_targets(0.70, flat, dict(initial_accuracy=0.6, rounds=rounds_of(0.8, 0.9)))
    assert parity["accuracy"] == pytest.approx(0.88) and parity["fedtiny"] is None and parity["baseline"] == 2


def test_every_reason_for_a_missed_round(tmp_path):
    events = [
        dict(event="task_sent", device="a", round=1), dict(event="task_sent", device="b", round=1),
        dict(event="task_sent", device="c", round=1), dict(event="task_sent", device="d", round=1),
        dict(event="task_sent", device="e", round=1), dict(event="task_sent", device="f", round=1),
        dict(event="message_rejected", device="c", reason="bad-signature", detail=""),
        dict(event="task_failed", device="e", error="broker gone"),
        dict(event="task_expired", device="b", round=1), dict(event="task_expired", device="d", round=1),
        dict(event="round_completed", round=1),
        dict(event="reply_rejected", device="b", round=1, reason="late"),
        dict(event="reply_rejected", device="f", round=1, reason="wrong-round", expected_round=2),
        dict(event="task_sent", device="a", round=2), dict(event="reply_accepted", device="a", round=2),
        dict(event="round_completed", round=2)]
    log = tmp_path / "coordinator.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    devices = report_data.participation(log, slow_rounds={"b": [1]}, dropped_rounds={"a": [1]})
    assert devices["a"]["missed"] == [1] and devices["a"]["answered"] == [2]
    assert devices["a"]["why"][1].startswith("dropped out")
    assert devices["b"]["why"][1] == ("straggler, slow this round (--stragglers); refused: its DELTA came after "
                                      "the round had closed")
    assert devices["c"]["why"][1] == "a message refused by the link (bad-signature)"
    assert devices["d"]["why"][1].startswith("no DELTA before the round closed")
    assert devices["e"]["why"][1] == "its TASK was not sent (broker gone)"
    assert devices["f"]["why"][1] == "refused: its DELTA came after the round had closed"  # its next TASK was out


def test_the_evaluator_counts_true_against_predicted_class():
    from fedtiny_server.rounds import confusion_matrix

    counts = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert counts == [1, 1, 0, 0, 1, 0, 1, 0, 2]
    assert report_data.recall(counts) == [0.5, 1.0, pytest.approx(2 / 3)]
    assert report_data.recall([1, 0, 0, 0]) == [1.0, None]  # no held-out sample of class 1
