"""The report folder a simulation leaves behind: metrics as JSON and CSV, PNG plots, a one-page summary."""

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402

ROUND_FIELDS = ("round", "accuracy", "loss", "participants", "uplink_bytes", "downlink_bytes", "seconds")


def write_report(out_dir: str | Path, run: dict, rounds: list[dict], memory: dict, baseline: dict | None = None,
                 slow_rounds: dict[str, list[int]] | None = None) -> Path:
    """run: settings and totals; rounds: one dict per round (ROUND_FIELDS); memory: the plan's memory report;
    slow_rounds: the rounds each straggler was slow in (--stragglers)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    devices = participation(out / "coordinator.jsonl", slow_rounds or {})
    (out / "metrics.json").write_text(json.dumps(dict(run=run, rounds=rounds, memory=memory, baseline=baseline,
                                                      devices=devices), indent=2, default=float))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROUND_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rounds)
    _plot_accuracy(out / "accuracy_loss.png", rounds, baseline)
    _plot_bytes(out / "bytes_per_round.png", rounds, baseline)
    _plot_memory(out / "device_memory.png", memory)
    flows = data_flow(out / "coordinator.jsonl", run.get("trainable", []))
    with open(out / "data_flow.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FLOW_FIELDS)
        writer.writeheader()
        writer.writerows(flows)
    (out / "summary.md").write_text(summary(run, rounds, memory, baseline, flows, devices))
    return out


def participation(coordinator_log: Path, slow_rounds: dict[str, list[int]]) -> dict[str, dict]:
    """Per device, from the coordinator's log: the rounds it was sent a TASK (`tasked`), those with an accepted
    DELTA (`answered`), the tasked ones without (`missed`), and for a straggler the rounds it was slow in."""
    tasked: dict[str, set[int]] = {}
    answered: dict[str, set[int]] = {}
    if Path(coordinator_log).exists():
        for line in Path(coordinator_log).read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "task_sent":
                tasked.setdefault(event["device"], set()).add(event["round"])
            elif event.get("event") == "reply_accepted":
                answered.setdefault(event["device"], set()).add(event["round"])
    out = {}
    for device in sorted(set(tasked) | set(answered) | set(slow_rounds)):
        got, asked = answered.get(device, set()), tasked.get(device, set())
        out[device] = dict(tasked=sorted(asked), answered=sorted(got), missed=sorted(asked - got),
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


def _plot_accuracy(path, rounds, baseline):
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    r = [x["round"] for x in rounds]
    acc_ax.plot(r, [100 * x["accuracy"] for x in rounds], marker="o", label="fedtiny int8 (devices)")
    loss_ax.plot(r, [x["loss"] for x in rounds], marker="o", label="fedtiny int8 (devices)")
    if baseline:
        br = [x["round"] for x in baseline["rounds"]]
        acc_ax.plot(br, [100 * x["accuracy"] for x in baseline["rounds"]], marker="s", label="Flower + PyTorch fp32")
        loss_ax.plot(br, [x["loss"] for x in baseline["rounds"]], marker="s", label="Flower + PyTorch fp32")
    acc_ax.set(xlabel="round", ylabel="held-out accuracy (%)", title="Accuracy")
    loss_ax.set(xlabel="round", ylabel="held-out loss", title="Loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
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
            last = min(m for m in d["missed"] if not any(a > m for a in d["answered"]))
            fast = [r for r in d["tasked"] if r > last and r not in d["slow_rounds"]]
            why = (f"though not slow in round(s) {fast}" if fast else "slow in every round after it"
                   if any(r > last for r in d["tasked"]) else "the last round")
            lines.append(f"- {k} missed {d['missed']}, answered {d['answered']}, slow in {d['slow_rounds']}: "
                         f"nothing accepted after round {last} ({why})")
        lines += ["metrics.json `devices` has every device's tasked, answered and missed rounds.", ""]
    if baseline:
        b_last = baseline["rounds"][-1]
        lines += ["## Against plain Flower + PyTorch fp32 (same task, data, rounds)", "",
                  "| | fedtiny | Flower + PyTorch fp32 |", "|---|---:|---:|",
                  f"| final accuracy | {100 * last.get('accuracy', 0):.1f} % | {100 * b_last['accuracy']:.1f} % |",
                  f"| rounds to {100 * run['target_accuracy']:.0f} % | {run.get('rounds_to_target', '-')} | "
                  f"{baseline.get('rounds_to_target', '-')} |",
                  f"| bytes per node per round (uplink) | {up:,.0f} | {baseline['bytes_per_node_per_round']:,.0f} |",
                  f"| device memory for training | {memory['arena_bytes']:,} B | "
                  f"at least {baseline['training_memory_bytes']:,} B (fp32 weights + gradients) |",
                  f"| wall time of the rounds (round 1's start to the last round's end; same thread settings) | "
                  f"{run['rounds_seconds']:.1f} s | {baseline['rounds_seconds']:.1f} s |",
                  f"| wall time of the whole run | {run['wall_seconds']:.1f} s | {baseline['wall_seconds']:.1f} s |", ""]
    lines += ["## Rounds", "", "| round | accuracy | loss | participants | uplink B | downlink B | seconds |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for x in rounds:
        lines.append(f"| {x['round']} | {100 * x['accuracy']:.1f} % | {x['loss']:.3f} | {x['participants']} | "
                     f"{x['uplink_bytes']:,} | {x['downlink_bytes']:,} | {x['seconds']:.2f} |")
    lines += ["", "Plots: accuracy_loss.png, bytes_per_round.png, device_memory.png. Data: metrics.json, metrics.csv, "
              "data_flow.csv (per transfer: round, device, direction, bytes, contents)."]
    return "\n".join(lines) + "\n"


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
