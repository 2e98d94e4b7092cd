"""The report folder a simulation leaves behind: metrics as JSON and CSV, PNG plots, a one-page summary and a
self-contained HTML report (report_html.py) that a person opens in any browser, offline. What they say is computed
in report_data.py."""

import csv
import json
from pathlib import Path

import numpy as np
import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from .report_data import (  # noqa: E402
    FLOW_FIELDS, NODE_MIN_PER_CLASS, class_names, data_flow, device_accuracy, evaluated_on, federation_gains,
    federation_rows, few_samples, firmware_table, participation, percent, personal_rows, points, privacy_lines, reached,
    recall, recall_rows, stragglers_back)
from .report_html import html_report  # noqa: E402

ROUND_FIELDS = ("round", "accuracy", "global_heldout", "global_heldout_worst_tenth", "personal_accuracy",
                "personal_worst_tenth", "alone_accuracy", "alone_worst_tenth", "loss", "participants", "uplink_bytes",
                "downlink_bytes", "seconds")
PLOTS = ("accuracy_loss.png", "federation.png", "recall.png", "bytes_per_round.png", "device_memory.png")


def write_report(out_dir: str | Path, run: dict, rounds: list[dict], memory: dict, baseline: dict | None = None,
                 slow_rounds: dict[str, list[int]] | None = None,
                 dropped_rounds: dict[str, list[int]] | None = None) -> Path:
    """run: settings and totals (with `initial_accuracy`, `initial_confusion`, `classes` and `targets` from
    accuracy_targets, and `alone`: the devices trained alone, personal.fleet_summary with `accuracy` per device);
    rounds: one dict per round (ROUND_FIELDS and the held-out `confusion`); memory: the plan's
    memory report; slow_rounds / dropped_rounds: the rounds each straggler was slow in (--stragglers) and each node
    dropped out of (--dropout). Also reads the run folder: coordinator.jsonl, state.db, plan.ftp, nodes/."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    devices = participation(out / "coordinator.jsonl", slow_rounds or {}, dropped_rounds or {})
    for device, facts in device_accuracy(out).items():
        devices.setdefault(device, dict(tasked=[], answered=[], missed=[], why={}, straggler=False,
                                        slow_rounds=[])).update(facts)
    for device, accuracy in ((run.get("alone") or {}).get("accuracy") or {}).items():
        if device in devices:
            devices[device]["alone_accuracy"] = accuracy
    warnings = few_samples(devices)
    (out / "metrics.json").write_text(json.dumps(dict(run=run, rounds=rounds, memory=memory, baseline=baseline,
                                                      devices=devices, few_samples=warnings), indent=2, default=float))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROUND_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rounds)
    _plot_accuracy(out / "accuracy_loss.png", run, rounds, baseline)
    _plot_federation(out / "federation.png", federation_rows(devices, rounds))
    _plot_recall(out / "recall.png", run, rounds)
    _plot_bytes(out / "bytes_per_round.png", rounds, baseline)
    _plot_memory(out / "device_memory.png", memory)
    flows = data_flow(out / "coordinator.jsonl", run.get("trainable", []))
    with open(out / "data_flow.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FLOW_FIELDS)
        writer.writeheader()
        writer.writerows(flows)
    (out / "summary.md").write_text(summary(run, rounds, memory, baseline, flows, devices))
    (out / "report.html").write_text(html_report(run, rounds, memory, baseline, flows, devices,
                                                 [out / name for name in PLOTS if (out / name).exists()]))
    return out


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


def _plot_federation(path, rows):
    """On every device's evaluation part, per round from 0: the global model, the device's personalised model and the
    device trained alone; mean (solid) and worst tenth (dashed), on 0..100 %. No plot without such figures."""
    path.unlink(missing_ok=True)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, name in enumerate(("global model", "personalised (global + its own steps)", "alone (its own samples)")):
        for key, style, label in (("mean", "-", f"{name}, mean"), ("worst_tenth", "--", "worst tenth")):
            pts = [(r, 100 * cells[i][key]) for r, *cells in rows if cells[i].get(key) is not None]
            if pts:
                ax.plot([p for p, _ in pts], [v for _, v in pts], style, color=f"C{i}", marker="o" if style == "-"
                        else None, label=label if key == "mean" else f"{name}, worst tenth")
    ax.set(xlabel="round (0: the pretrained model)", ylabel="accuracy on its evaluation part (%)", ylim=(0, 100),
           title="Each device's evaluation part: federation against training alone")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
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
    # plain numbers ("4000", "1e+05") where the log axis's default writes 10^x in mathtext, whose parser was a third
    # of the report's CPU time
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
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
        f"| device RAM for training (arena {memory['arena_bytes']:,} B + kernel scratch {memory['scratch_bytes']:,} B "
        f"+ stack and runtime statics) | {memory['device_ram_bytes']:,} B of "
        f"{memory['budget_bytes'] - memory['reserve_bytes']:,} B available |",
        f"| flash for the model and plan | {memory['flash_bytes']:,} B |", "",
    ]
    lines += [*privacy_lines(run, rounds), ""] if run.get("privacy") else []
    lines += few_samples_lines(few_samples(devices or {}), run)
    if run.get("firmware"):
        lines += firmware_section(run["firmware"])
    if flower:
        lines += [
            "What left each device: per round one DELTA body (the trainable tensors' integer changes, its example",
            "count, loss, accuracy and personalised accuracy), built by the devices' own code, and a JOIN. No sample, feature or label left",
            "any device. This engine has no MQTT link: nothing was signed, encrypted or chunked, so every byte count",
            "here is of the encoded DELTA and TASK + GLOBAL_UPDATE bodies alone; over MQTT the envelope (header,",
            "EdDSA signature, AEAD tag) and chunk headers come on top (`--engine mqtt` counts them).",
        ]
    else:
        lines += [
            "What left each device: per round one DELTA (the trainable tensors' integer changes, signed with the device's",
            "EdDSA key and encrypted end to end with ChaCha20-Poly1305), its example count, loss, accuracy and",
            "personalised accuracy (on its evaluation part);",
            "heartbeats and a JOIN. No sample, feature or label left any device (see docs/security.md).",
        ]
        if run.get("secure_aggregation"):
            lines += ["Under secure aggregation (--secagg) each DELTA was masked: the coordinator learned only each",
                      "round's sum over the devices that answered, never one device's change (docs/security.md)."]
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
                  *[f"| rounds to {100 * t['accuracy']:.1f} % (*{i + 1}) | {reached(t, 'fedtiny', rounds)} | "
                    f"{reached(t, 'baseline', baseline['rounds'])} |" for i, t in enumerate(run.get("targets", []))],
                  f"| bytes per node per round (uplink) | {up:,.0f} | {baseline['bytes_per_node_per_round']:,.0f} |",
                  f"| device RAM for training (arena, kernel scratch, stack) | {memory['device_ram_bytes']:,} B | "
                  f"at least {baseline['training_memory_bytes']:,} B (fp32 weights + gradients) |",
                  f"| wall time of the rounds (round 1's start to the last round's end; same thread settings) | "
                  f"{run['rounds_seconds']:.1f} s | {baseline['rounds_seconds']:.1f} s |",
                  f"| wall time of the whole run from the pretrained float model (fedtiny: lr choice, quantizing, "
                  f"compiling, broker, nodes, rounds; baseline: its lr choice, workers, rounds) | "
                  f"{run['wall_seconds'] - run.get('host_model_seconds', 0):.1f} s | {baseline['wall_seconds']:.1f} s |",
                  "",
                  *[f"(*{i + 1}) target: {t['rule']}; round 0 is the start."
                    for i, t in enumerate(run.get("targets", []))],
                  ""]
    elif run.get("targets"):
        t = run["targets"][0]
        lines += [f"Rounds to {100 * t['accuracy']:.1f} % ({t['rule']}): {reached(t, 'fedtiny', rounds)}.", ""]
    lines += federation_lines(run, devices or {}, rounds)
    lines += personal_lines(run, devices or {}) + recall_lines(run, rounds) + device_lines(devices or {})
    lines += ["## Rounds", "", "Accuracy: the global model on the held-out data. On each device's evaluation part "
              "(mean / worst tenth of the devices): the global model, each device's personalised model (after its "
              f"local steps of the round) and the device trained alone for as many rounds. {evaluated_on(run)}",
              "", "| round | accuracy | devices' evaluation: global | personalised | alone | loss | participants | "
              "uplink B | downlink B | seconds |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| 0 (before the first) | {100 * run['initial_accuracy']:.1f} % | - | - | - | - | - | - | - | - |"]
    for x in rounds:
        lines.append(f"| {x['round']} | {100 * x['accuracy']:.1f} % | {personal_cell(x, 'global_heldout')} | "
                     f"{personal_cell(x)} | {personal_cell(x, 'alone_accuracy')} | {x['loss']:.3f} | "
                     f"{x['participants']} | {x['uplink_bytes']:,} | {x['downlink_bytes']:,} | {x['seconds']:.2f} |")
    lines += ["", f"report.html: this page with its plots in one file. Plots: {', '.join(PLOTS)}. Data: metrics.json, "
              "metrics.csv, data_flow.csv (per transfer: round, device, direction, bytes, contents)."]
    return "\n".join(lines) + "\n"


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


def personal_cell(row: dict, key: str = "personal_accuracy") -> str:
    """A round's accuracy over the devices' evaluation parts (`key`: personal_accuracy, global_heldout or
    alone_accuracy), "mean / worst tenth", or "-" when it was not measured."""
    if row.get(key) is None:
        return "-"
    return f"{percent(row[key])} / {percent(row[key.removesuffix('_accuracy') + '_worst_tenth'])}"


def federation_lines(run: dict, devices: dict[str, dict], rounds: list[dict]) -> list[str]:
    gains = federation_gains(federation_rows(devices, rounds))
    if not gains:
        return []
    cell = (lambda what, v: points(v) if what.startswith("gain") else percent(v))
    return ["## What federation and personalisation gain (each device's evaluation part, after the last round)", "",
            f"{evaluated_on(run)} Personalised: the global model after the device's own local steps of the round. Alone: the device trained from the pretrained model "
            "on its own samples only, round after round as the run's rounds (federation.png has every round).", "",
            "| | mean | worst tenth of devices |", "|---|---:|---:|",
            *[f"| {what} | {cell(what, v['mean'])} | {cell(what, v['worst_tenth'])} |" for what, v in gains], ""]


def personal_lines(run: dict, devices: dict[str, dict]) -> list[str]:
    rows = personal_rows(devices)
    if not rows:
        return []
    return ["## Personalisation (each device's evaluation part)", "",
            f"{evaluated_on(run)} A device's personalised model is the global model after its own local steps of a "
            "round; it reports that model's accuracy on its evaluation part in its DELTA, so no sample leaves it.", "",
            "| model, on each device's evaluation part | mean | worst tenth of devices | devices |", "|---|---:|---:|---:|",
            *[f"| {what} | {percent(s['mean'])} | {percent(s['worst_tenth'])} | {s['devices']} |" for what, s in rows],
            ""]


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
    header, rows, note = firmware_table(firmware)
    return (["## Firmware nodes (C on a Cortex-M4 under QEMU mps2-an386)", "", "| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)] + ["| " + " | ".join(row) + " |" for row in rows] + ["", note, ""])
