"""The report folder a simulation leaves behind: metrics as JSON and CSV, PNG plots, a one-page summary and a
self-contained HTML report (report_html.py) that a person opens in any browser, offline."""

import csv
import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402

ROUND_FIELDS = ("round", "accuracy", "loss", "participants", "uplink_bytes", "downlink_bytes", "seconds")
PLOTS = ("accuracy_loss.png", "recall.png", "bytes_per_round.png", "device_memory.png")

# Below this many samples of a class, a node's accuracy on that class moves in steps of 20 points or more and its
# update for the class rests on a handful of training steps: the report names such nodes.
NODE_MIN_PER_CLASS = 5
# "rounds to X %": the targets' rules, stated in the report beside each target.
TARGET_SHARE = 0.9  # of the smaller of the two gains: a target both sides reach
PARITY_MARGIN = 0.02  # "as well as fp32": within 2 points of the baseline's final accuracy


def write_report(out_dir: str | Path, run: dict, rounds: list[dict], memory: dict, baseline: dict | None = None,
                 slow_rounds: dict[str, list[int]] | None = None,
                 dropped_rounds: dict[str, list[int]] | None = None) -> Path:
    """run: settings and totals (with `initial_accuracy`, `initial_confusion`, `classes` and `targets` from
    accuracy_targets); rounds: one dict per round (ROUND_FIELDS and the held-out `confusion`); memory: the plan's
    memory report; slow_rounds / dropped_rounds: the rounds each straggler was slow in (--stragglers) and each node
    dropped out of (--dropout). Also reads the run folder: coordinator.jsonl, state.db, plan.ftp, nodes/."""
    from .report_html import html_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    devices = participation(out / "coordinator.jsonl", slow_rounds or {}, dropped_rounds or {})
    for device, facts in device_accuracy(out).items():
        devices.setdefault(device, dict(tasked=[], answered=[], missed=[], why={}, straggler=False,
                                        slow_rounds=[])).update(facts)
    warnings = few_samples(devices)
    (out / "metrics.json").write_text(json.dumps(dict(run=run, rounds=rounds, memory=memory, baseline=baseline,
                                                      devices=devices, few_samples=warnings), indent=2, default=float))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROUND_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rounds)
    _plot_accuracy(out / "accuracy_loss.png", run, rounds, baseline)
    _plot_recall(out / "recall.png", run, rounds)
    _plot_bytes(out / "bytes_per_round.png", rounds, baseline)
    _plot_memory(out / "device_memory.png", memory)
    flows = data_flow(out / "coordinator.jsonl", run.get("trainable", []))
    with open(out / "data_flow.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FLOW_FIELDS)
        writer.writeheader()
        writer.writerows(flows)
    (out / "summary.md").write_text(summary(run, rounds, memory, baseline, flows, devices))
    (out / "report.html").write_text(html_report(out, run, rounds, memory, baseline, flows, devices))
    return out


# --- what the numbers mean ------------------------------------------------------------------------------------

def accuracy_targets(initial: float, rounds: list[dict], baseline: dict | None = None) -> list[dict]:
    """The "rounds to X %" rows: a target accuracy, the rule that set it, and the first round each side's held-out
    accuracy reached it (0: already at the start; None: not in this run). Without a baseline, one target from
    fedtiny's own curve; with one, a target both reach (TARGET_SHARE of the way from the higher start to the lower
    best, so neither side's rounds can look fast by a target set below its start) and the parity target
    (the baseline's final accuracy minus PARITY_MARGIN: how long fedtiny takes to do as well as fp32, if it does)."""
    if not rounds:
        return []
    starts, curves = {"fedtiny": initial}, {"fedtiny": rounds}
    if baseline and baseline.get("rounds"):
        starts["baseline"], curves["baseline"] = baseline.get("initial_accuracy"), baseline["rounds"]
    start = max(v for v in starts.values() if v is not None)
    lower_best = min(max(r["accuracy"] for r in c) for c in curves.values())
    targets = []
    if lower_best > start:
        whose = "the lower of the two best accuracies" if len(curves) > 1 else "the best accuracy"
        rule = (f"{100 * TARGET_SHARE:.0f} % of the way from the start ({100 * start:.1f} %) to {whose} "
                f"({100 * lower_best:.1f} %)")
        targets.append(_target(start + TARGET_SHARE * (lower_best - start), rule, starts, curves))
    if "baseline" in curves:
        final = curves["baseline"][-1]["accuracy"]
        rule = f"the fp32 baseline's final accuracy ({100 * final:.1f} %) minus {100 * PARITY_MARGIN:.0f} points"
        targets.append(_target(final - PARITY_MARGIN, rule, starts, curves))
    return targets


def _target(accuracy: float, rule: str, starts: dict, curves: dict) -> dict:
    def first(side):
        if starts.get(side) is not None and starts[side] >= accuracy:
            return 0
        return next((r["round"] for r in curves[side] if r["accuracy"] >= accuracy), None)

    return dict(accuracy=accuracy, rule=rule, **{side: first(side) for side in curves})


def confusion(flat: list[int] | None) -> np.ndarray | None:
    """A round's held-out confusion matrix (row: true class, column: predicted) from its flat list."""
    if not flat:
        return None
    k = int(round(len(flat) ** 0.5))
    return np.asarray(flat, dtype=np.int64).reshape(k, k)


def recall(flat: list[int] | None) -> list[float | None]:
    """Per class, the share of its held-out samples the model labels right (None: no sample of that class).
    For a fault class, 1 - recall is the share of faults missed; for the normal class, the false-alarm rate."""
    m = confusion(flat)
    if m is None:
        return []
    return [float(m[c, c] / m[c].sum()) if m[c].sum() else None for c in range(len(m))]


def class_names(run: dict, k: int) -> list[str]:
    names = [str(c) for c in run.get("classes") or []]
    return names if len(names) == k else [str(c) for c in range(k)]


def few_samples(devices: dict[str, dict]) -> dict[str, dict[str, int]]:
    """Nodes holding fewer than NODE_MIN_PER_CLASS samples of a class they have: {device: {class: count}}."""
    out = {}
    for device, d in sorted(devices.items()):
        few = {c: n for c, n in d.get("class_counts", {}).items() if 0 < n < NODE_MIN_PER_CLASS}
        if few:
            out[device] = few
    return out


def device_accuracy(run_dir: Path) -> dict[str, dict]:
    """Per node, from the run folder: its samples per class (nodes/<device>.npz), the accuracy on its own samples
    of the global model before round 1 and after the last round (plan.ftp, the final integers in state.db), and
    the accuracy its last accepted DELTA reported (its model right after its own local training, on the same
    samples). Classification plans only."""
    from fedtiny.planfile import load_plan
    from fedtiny_server.state import StateStore

    run = Path(run_dir)
    files = sorted((run / "nodes").glob("*.npz"))
    if not files or not (run / "plan.ftp").exists() or not (run / "state.db").exists():
        return {}
    plan = load_plan(run / "plan.ftp")
    store = StateStore(run / "state.db")
    try:
        checkpoint, reported = store.load(), store.reply_metrics()
    finally:
        store.close()
    data = {f.stem: np.load(f) for f in files}
    out = {}
    for device, d in data.items():
        classes, counts = np.unique(d["y"], return_counts=True)
        out[device] = dict(samples=int(len(d["y"])),
                           class_counts={str(int(c)): int(n) for c, n in zip(classes, counts)})
        mine = sorted(r for r, dev in reported if dev == device)
        if mine and "accuracy" in reported[mine[-1], device]:
            out[device].update(reported_accuracy=float(reported[mine[-1], device]["accuracy"]), reported_round=mine[-1])
    if plan.loss == "mse" or checkpoint is None:
        return out
    x = np.concatenate([d["x"] for d in data.values()])
    y = np.concatenate([d["y"] for d in data.values()])
    ends = np.cumsum([len(d["y"]) for d in data.values()])
    # The C build of the pretrained model is cached (the same in every run of it); the trained one's is not. One
    # thread per model: ctypes lets go of the GIL, so the two use two cores.
    models = {"accuracy_before": (plan.graph, True), "accuracy_after": (plan.graph_with(checkpoint.ints), False)}
    with ThreadPoolExecutor(len(models)) as pool:
        labels = dict(zip(models, pool.map(lambda m: _labels(m[0], x, m[1]), models.values())))
    for key, predicted in labels.items():
        for device, hits in zip(data, np.split(predicted == y, ends[:-1])):
            out[device][key] = float(hits.mean()) if len(hits) else None
    return out


def _labels(graph, x_int8: np.ndarray, cached: bool) -> np.ndarray:
    """The int8 model's labels for int8 samples: by the generated C model when gcc is here (the same integers,
    many times faster; built in the C runtime's cache if `cached`, else in a folder removed after), else by the
    reference interpreter."""
    from fedtiny.interpreter import run

    if len(x_int8) and shutil.which("gcc"):
        from fedtiny_device.cruntime import BuildError, CModel

        with tempfile.TemporaryDirectory() as build:
            try:
                model = CModel(graph, cache_dir=None if cached else Path(build))
                return model.run(x_int8).reshape(len(x_int8), -1).argmax(axis=1)
            except BuildError:
                pass
    outputs = [run(graph, x_int8[i:i + 256]) for i in range(0, len(x_int8), 256)]
    return np.concatenate(outputs).reshape(len(x_int8), -1).argmax(axis=1)


# Reasons the coordinator gives when it refuses a reply (server/grid.py), as a person reads them.
REFUSALS = {"late": "its DELTA came after the round had closed", "stale-version": "it trained an old model version",
            "bad-delta": "its DELTA did not decode", "duplicate": "a second DELTA for the round",
            "wrong-round": "its DELTA was for another round", "too-stale": "its model version was too old",
            "no-examples": "its DELTA counted no examples", "unsolicited": "a DELTA nobody asked for"}


def participation(coordinator_log: Path, slow_rounds: dict[str, list[int]],
                  dropped_rounds: dict[str, list[int]] | None = None) -> dict[str, dict]:
    """Per device, from the coordinator's log: the rounds it was sent a TASK (`tasked`), those with an accepted
    DELTA (`answered`), the tasked ones without (`missed`) and, per missed round, why (`why`): it dropped out
    (dropped_rounds), the coordinator refused its reply or another message of it in that round (the log's reason),
    it was a straggler slow that round (slow_rounds), its TASK could not be sent, or else no DELTA came before the
    round closed (quorum or deadline)."""
    dropped_rounds = dropped_rounds or {}
    tasked: dict[str, set[int]] = {}
    answered: dict[str, set[int]] = {}
    refused: dict[tuple[str, int], list[str]] = {}
    completed = 0  # the last round the coordinator closed: events without a round belong to the next one
    if Path(coordinator_log).exists():
        for line in Path(coordinator_log).read_text().splitlines():
            event = json.loads(line)
            kind, device = event.get("event"), event.get("device")
            if kind == "task_sent":
                tasked.setdefault(device, set()).add(event["round"])
            elif kind == "reply_accepted":
                answered.setdefault(device, set()).add(event["round"])
            elif kind == "reply_rejected":
                reason = event.get("reason", "")
                if reason == "wrong-round" and event.get("expected_round", 0) > event.get("round", 0):
                    reason = "late"  # it came when the device's next TASK was already out
                refused.setdefault((device, event.get("round", completed + 1)), []).append(
                    f"refused: {REFUSALS.get(reason, reason)}")
            elif kind == "message_rejected":
                refused.setdefault((device, completed + 1), []).append(
                    f"a message refused by the link ({event.get('reason', '')})")
            elif kind == "task_failed":
                refused.setdefault((device, completed + 1), []).append(f"its TASK was not sent ({event.get('error')})")
            elif kind == "round_completed":
                completed = max(completed, event["round"])
    out = {}
    for device in sorted(set(tasked) | set(answered) | set(slow_rounds)):
        got, asked = answered.get(device, set()), tasked.get(device, set())
        why = {}
        for r in sorted(asked - got):
            reasons = []
            if r in dropped_rounds.get(device, ()):
                reasons.append("dropped out (--dropout): did not train or answer")
            if r in slow_rounds.get(device, ()):
                reasons.append("straggler, slow this round (--stragglers)")
            reasons += refused.get((device, r), [])
            why[r] = "; ".join(reasons) or "no DELTA before the round closed (quorum reached or deadline passed)"
        out[device] = dict(tasked=sorted(asked), answered=sorted(got), missed=sorted(asked - got), why=why,
                           straggler=device in slow_rounds, slow_rounds=slow_rounds.get(device, []))
    return out


def stragglers_back(devices: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(stragglers that missed a round and answered a later one after every miss, those that did not)."""
    back, not_back = [], []
    for device, d in devices.items():
        if d["straggler"] and d["missed"]:
            later = all(any(a > m for a in d["answered"]) for m in d["missed"])
            (back if later else not_back).append(device)
    return back, not_back


FLOW_FIELDS = ("round", "device", "direction", "message", "bytes", "contents")


def data_flow(coordinator_log: Path, trainable: list[str]) -> list[dict]:
    """The data-flow manifest a compliance review asks for: every transfer the coordinator accepted or sent,
    per round and device, with its size and what it contained, from the coordinator's own structured log."""
    if not Path(coordinator_log).exists():
        return []
    uplink = "DELTA: integer changes of " + " ".join(trainable) + "; example count; loss; accuracy"
    rows = []
    for line in Path(coordinator_log).read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "reply_accepted":
            rows.append(dict(round=event["round"], device=event["device"], direction="device -> coordinator",
                             message="DELTA", bytes=event["uplink_bytes"], contents=uplink))
        elif event.get("event") == "task_sent":
            rows.append(dict(round=event["round"], device=event["device"], direction="coordinator -> device",
                             message="TASK + GLOBAL_UPDATE", bytes=event.get("downlink_bytes", 0),
                             contents="round settings; changed global trainable tensors"))
    return rows


def _plot_accuracy(path, run, rounds, baseline):
    """Held-out accuracy and loss per round, from round 0 (the model before any round); accuracy on 0..100 %, loss
    from 0: a fixed scale, so a step of a point looks like one."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    r = [0] + [x["round"] for x in rounds]
    acc_ax.plot(r, [100 * run["initial_accuracy"]] + [100 * x["accuracy"] for x in rounds], marker="o",
                label="fedtiny int8 (devices)")
    loss_ax.plot(r[1:], [x["loss"] for x in rounds], marker="o", label="fedtiny int8 (devices)")
    if baseline:
        start = [] if baseline.get("initial_accuracy") is None else [(0, baseline["initial_accuracy"])]
        points = start + [(x["round"], x["accuracy"]) for x in baseline["rounds"]]
        acc_ax.plot([p for p, _ in points], [100 * a for _, a in points], marker="s", label="Flower + PyTorch fp32")
        loss_ax.plot([x["round"] for x in baseline["rounds"]], [x["loss"] for x in baseline["rounds"]], marker="s",
                     label="Flower + PyTorch fp32")
    for target in run.get("targets", [])[:1]:
        acc_ax.axhline(100 * target["accuracy"], color="gray", ls=":", lw=1,
                       label=f"target {100 * target['accuracy']:.1f} %")
    acc_ax.set(xlabel="round (0: before the first)", ylabel="held-out accuracy (%)", title="Accuracy", ylim=(0, 100))
    loss_ax.set(xlabel="round", ylabel="held-out loss", title="Loss")
    loss_ax.set_ylim(bottom=0)
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_recall(path, run, rounds):
    """Per class, the held-out recall of the global model from round 0 on."""
    curves = [recall(run.get("initial_confusion"))] + [recall(x.get("confusion")) for x in rounds]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    k = max((len(c) for c in curves), default=0)
    for c, name in enumerate(class_names(run, k)):
        points = [(r, 100 * v[c]) for r, v in enumerate(curves) if len(v) > c and v[c] is not None]
        ax.plot([p for p, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set(xlabel="round (0: before the first)", ylabel="recall (%)", ylim=(0, 100),
           title="Per-class recall of the global model (held-out)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if k:
        ax.legend(fontsize=8, ncol=2 if k > 5 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bytes(path, rounds, baseline):
    fig, ax = plt.subplots(figsize=(6, 3.6))
    r = [x["round"] for x in rounds]
    n = [max(1, x["participants"]) for x in rounds]
    ax.plot(r, [x["uplink_bytes"] / k for x, k in zip(rounds, n)], marker="o", label="fedtiny uplink / node")
    ax.plot(r, [x["downlink_bytes"] / k for x, k in zip(rounds, n)], marker="o", label="fedtiny downlink / node")
    if baseline:
        ax.axhline(baseline["bytes_per_node_per_round"], color="C3", ls="--", label="Flower fp32 full model / node")
    ax.set(xlabel="round", ylabel="bytes", yscale="log", title="Bytes per node per round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_memory(path, memory):
    parts = {"trainable copies": memory["trainable_sram_bytes"],
             "activations, masks, gradients": memory["activation_and_gradient_bytes"],
             "kernel scratch (C runtime)": memory["scratch_bytes"],
             "reserved (network stack)": memory["reserve_bytes"]}
    parts["free"] = max(0, memory["budget_bytes"] - sum(parts.values()))
    fig, ax = plt.subplots(figsize=(7, 2.4))
    left = 0
    for i, (label, value) in enumerate(parts.items()):
        ax.barh(0, value / 1024, left=left / 1024, color=f"C{i}", label=f"{label}: {value / 1024:.1f} KB")
        left += value
    ax.set(yticks=[], title=f"Device SRAM for one training step (KB of {memory['budget_bytes'] // 1024} KB)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summary(run: dict, rounds: list[dict], memory: dict, baseline: dict | None, flows: list[dict],
            devices: dict[str, dict] | None = None) -> str:
    last = rounds[-1] if rounds else {}
    up = sum(x["uplink_bytes"] for x in rounds) / max(1, sum(x["participants"] for x in rounds))
    flower = run.get("engine") == "flower"
    where = "Flower's simulation engine on Ray (no MQTT link)" if flower else f"broker {run['broker']}"
    lines = [
        f"# fedtiny simulation: {run['scenario']}, {run['nodes']} nodes, {len(rounds)} rounds", "",
        f"Model `{run['model']}`, scheme `{run['scheme']}`, strategy `{run['strategy']}`, {where}, "
        f"seed {run['seed']}, dropout {run.get('dropout', 0)}. Wall time {run['wall_seconds']:.1f} s.", "",
        "| | value |", "|---|---:|",
        f"| held-out accuracy before / after | {100 * run['initial_accuracy']:.1f} % / "
        f"{100 * last.get('accuracy', float('nan')):.1f} % |",
        f"| uplink bytes per node per round (mean{', DELTA bodies' if flower else ''}) | {up:,.0f} |",
        f"| training memory per device (whole step: planned arena + kernel scratch) | {memory['arena_bytes']:,} B + "
        f"{memory['scratch_bytes']:,} B of {memory['budget_bytes'] - memory['reserve_bytes']:,} B available |",
        f"| flash for the model and plan | {memory['flash_bytes']:,} B |", "",
    ]
    lines += few_samples_lines(few_samples(devices or {}), run)
    if run.get("firmware"):
        lines += firmware_section(run["firmware"])
    if flower:
        lines += [
            "What left each device: per round one DELTA body (the trainable tensors' integer changes, its example",
            "count, loss and accuracy), built by the devices' own code, and a JOIN. No sample, feature or label left",
            "any device. This engine has no MQTT link: nothing was signed, encrypted or chunked, so every byte count",
            "here is of the encoded DELTA and TASK + GLOBAL_UPDATE bodies alone; over MQTT the envelope (header,",
            "EdDSA signature, AEAD tag) and chunk headers come on top (`--engine mqtt` counts them).",
        ]
    else:
        lines += [
            "What left each device: per round one DELTA (the trainable tensors' integer changes, signed with the device's",
            "EdDSA key and encrypted end to end with ChaCha20-Poly1305), its example count, loss and accuracy;",
            "heartbeats and a JOIN. No sample, feature or label left any device (see docs/security.md).",
        ]
    lines += [
        f"data_flow.csv lists every transfer: {sum(f['message'] == 'DELTA' for f in flows)} DELTAs from "
        f"{len({f['device'] for f in flows if f['message'] == 'DELTA'})} devices, "
        f"{sum(f['bytes'] for f in flows if f['message'] == 'DELTA'):,} bytes in all.", "",
    ]
    stragglers = {k: d for k, d in (devices or {}).items() if d["straggler"]}
    if stragglers:
        back, not_back = stragglers_back(stragglers)
        lines += [f"Stragglers: {len(stragglers)} of {run['nodes']} nodes, each slow (1.25-2 deadlines late) in a "
                  f"random half of its rounds. {len(back) + len(not_back)} of them missed rounds; {len(back)} answered "
                  f"a later round after every miss."]
        for k in not_back:
            d = stragglers[k]
            gone = min(m for m in d["missed"] if not any(a > m for a in d["answered"]))
            fast = [r for r in d["tasked"] if r > gone and r not in d["slow_rounds"]]
            why = (f"though not slow in round(s) {fast}" if fast else "slow in every round after it"
                   if any(r > gone for r in d["tasked"]) else "the last round")
            lines.append(f"- {k} missed {d['missed']}, answered {d['answered']}, slow in {d['slow_rounds']}: "
                         f"nothing accepted after round {gone} ({why})")
        lines += ["metrics.json `devices` has every device's tasked, answered and missed rounds.", ""]
    if baseline:
        b_last = baseline["rounds"][-1]
        lines += ["## Against plain Flower + PyTorch fp32 (same task, data, rounds)", "",
                  "| | fedtiny | Flower + PyTorch fp32 |", "|---|---:|---:|",
                  f"| final accuracy | {100 * last.get('accuracy', 0):.1f} % | {100 * b_last['accuracy']:.1f} % |",
                  *[f"| rounds to {100 * t['accuracy']:.1f} % (*{i + 1}) | {_reached(t, 'fedtiny', rounds)} | "
                    f"{_reached(t, 'baseline', baseline['rounds'])} |" for i, t in enumerate(run.get("targets", []))],
                  f"| bytes per node per round (uplink) | {up:,.0f} | {baseline['bytes_per_node_per_round']:,.0f} |",
                  f"| device memory for training | {memory['arena_bytes']:,} B | "
                  f"at least {baseline['training_memory_bytes']:,} B (fp32 weights + gradients) |",
                  f"| wall time | {run['wall_seconds']:.1f} s | {baseline['wall_seconds']:.1f} s |", "",
                  *[f"(*{i + 1}) target: {t['rule']}; round 0 is the start."
                    for i, t in enumerate(run.get("targets", []))],
                  ""]
    elif run.get("targets"):
        t = run["targets"][0]
        lines += [f"Rounds to {100 * t['accuracy']:.1f} % ({t['rule']}): {_reached(t, 'fedtiny', rounds)}.", ""]
    lines += recall_lines(run, rounds) + device_lines(devices or {})
    lines += ["## Rounds", "", "| round | accuracy | loss | participants | uplink B | downlink B | seconds |",
              "|---:|---:|---:|---:|---:|---:|---:|",
              f"| 0 (before the first) | {100 * run['initial_accuracy']:.1f} % | - | - | - | - | - |"]
    for x in rounds:
        lines.append(f"| {x['round']} | {100 * x['accuracy']:.1f} % | {x['loss']:.3f} | {x['participants']} | "
                     f"{x['uplink_bytes']:,} | {x['downlink_bytes']:,} | {x['seconds']:.2f} |")
    lines += ["", f"report.html: this page with its plots in one file. Plots: {', '.join(PLOTS)}. Data: metrics.json, "
              "metrics.csv, data_flow.csv (per transfer: round, device, direction, bytes, contents)."]
    return "\n".join(lines) + "\n"


def _reached(target: dict, side: str, curve: list[dict]) -> str:
    r = target.get(side)
    if r is not None:
        return str(r)
    return f"not in {len(curve)} rounds (best {100 * max(x['accuracy'] for x in curve):.1f} %)" if curve else "-"


def few_samples_lines(few: dict[str, dict[str, int]], run: dict, shown: int = 10) -> list[str]:
    if not few:
        return []
    names = class_names(run, len(run.get("classes") or []))
    label = (lambda c: names[int(c)] if int(c) < len(names) else c)
    items = [f"{device} ({', '.join(f'{label(c)}: {n}' for c, n in counts.items())})"
             for device, counts in list(few.items())[:shown]]
    more = f", and {len(few) - shown} more (metrics.json `few_samples`)" if len(few) > shown else ""
    return [f"**Warning:** {len(few)} of {run['nodes']} nodes hold fewer than {NODE_MIN_PER_CLASS} samples of a class "
            f"they have (samples per class): {'; '.join(items)}{more}. Their accuracy on such a class moves in big "
            f"steps and their updates for it rest on a few training steps.", ""]


def recall_rows(run: dict, rounds: list[dict]) -> list[tuple[str, float | None, float | None, int]]:
    """Per class: (name, recall before round 1, recall after the last round, held-out samples of the class)."""
    first, final = run.get("initial_confusion"), rounds[-1].get("confusion") if rounds else None
    m = confusion(final if final else first)
    if m is None:
        return []
    before, after = recall(first), recall(final)
    return [(name, before[c] if c < len(before) else None, after[c] if c < len(after) else None, int(m[c].sum()))
            for c, name in enumerate(class_names(run, len(m)))]


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def recall_lines(run: dict, rounds: list[dict]) -> list[str]:
    rows = recall_rows(run, rounds)
    if not rows:
        return []
    lines = ["## Per-class recall of the global model (held-out)", "",
             "Of each class's held-out samples, the share labelled right. For a fault class 100 % minus it is the "
             "share of faults missed; for the normal class, the share of false alarms.", "",
             "| class | held-out samples | before round 1 | after the last round |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {n} | {percent(a)} | {percent(b)} |" for name, a, b, n in rows]
    return lines + [""]


def device_lines(devices: dict[str, dict], shown: int = 5) -> list[str]:
    """Devices' accuracy on their own samples before and after, and the rounds they missed, with why."""
    lines = []
    measured = {k: d for k, d in devices.items() if d.get("accuracy_after") is not None}
    if measured:
        before = [d["accuracy_before"] for d in measured.values()]
        after = [d["accuracy_after"] for d in measured.values()]
        better = sum(b > a for a, b in zip(before, after))
        worse = sum(b < a for a, b in zip(before, after))
        worst = sorted(measured.items(), key=lambda kv: kv[1]["accuracy_after"])[:shown]
        lines += ["## Devices: the global model on each device's own samples", "",
                  f"Mean accuracy {percent(float(np.mean(before)))} before round 1, {percent(float(np.mean(after)))} "
                  f"after the last round; better on {better}, worse on {worse}, of {len(measured)} devices. "
                  f"Lowest after: " + ", ".join(f"{k} {percent(d['accuracy_before'])} -> {percent(d['accuracy_after'])}"
                                               for k, d in worst) + ". "
                  "report.html and metrics.json `devices` have every device, with the accuracy its last DELTA "
                  "reported (its own model right after local training).", ""]
    missed = [(k, r, why) for k, d in devices.items() for r, why in d.get("why", {}).items()]
    if missed:
        lines += [f"## Missed rounds: {len(missed)} (device, round: why)", ""]
        lines += [f"- {k}, round {r}: {why}" for k, r, why in missed[:20]]
        if len(missed) > 20:
            lines.append(f"- and {len(missed) - 20} more (report.html, metrics.json `devices` `why`)")
        lines.append("")
    return lines


def firmware_section(firmware: dict[str, dict]) -> list[str]:
    """The firmware nodes (--qemu-nodes): RAM and flash by the linker, DELTAs sent, and the instructions of a
    round by part (from one DELTA to the next, idle polling left out; the first round, which also boots and
    joins, is left out when there are others), with the time they take at two Cortex-M4 clocks."""
    lines = ["## Firmware nodes (C on a Cortex-M4 under QEMU mps2-an386)", "",
             "| device | RAM B | flash B | DELTAs sent | refused downlinks | training | crypto | protocol | "
             "instructions per round | at 64 MHz | at 216 MHz |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for device, node in sorted(firmware.items()):
        rounds = node["instructions"][1:] or node["instructions"]
        mean = {part: sum(r[part] for r in rounds) / max(1, len(rounds)) for part in ("training", "crypto", "protocol")}
        total = sum(mean.values())
        lines.append(f"| {device} (firmware) | {node['ram_bytes']:,} | {node['flash_bytes']:,} | "
                     f"{node['rounds_sent']} | {len(node['refused'])} | {mean['training']:,.0f} | "
                     f"{mean['crypto']:,.0f} | "
                     f"{mean['protocol']:,.0f} | {total:,.0f} | {total / 64e6:.2f} s | {total / 216e6:.2f} s |")
    return lines + ["", "Instructions are executed instructions counted by QEMU (one per instruction, not cycles: a "
                        "real M4 needs about 1.1-1.5x as many cycles, plus flash wait states).", ""]
