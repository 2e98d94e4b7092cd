"""What a simulation's report says, from the run's records: the "rounds to X %" targets and their rules, the
held-out confusion matrix and per-class recall, each device's samples and accuracy before and after, the global
model against each device's personalised model and the device trained alone (on each device's evaluation part), which
device missed which round and why, and the data-flow manifest. report.py writes them as files and summary.md,
report_html.py as report.html."""

import json
import shutil
from pathlib import Path

import numpy as np

# Below this many samples of a class, a node's accuracy on that class moves in steps of 20 points or more and its
# update for the class rests on a handful of training steps: the report names such nodes.
NODE_MIN_PER_CLASS = 5

# "rounds to X %": the targets' rules, stated in the report beside each target.
TARGET_SHARE = 0.9  # of the smaller of the two gains: a target both sides reach
PARITY_MARGIN = 0.02  # "as well as fp32": within 2 points of the baseline's final accuracy


# --- held-out accuracy: targets and per-class recall -----------------------------------------------------------

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
        both = len(curves) > 1
        rule = (f"{100 * TARGET_SHARE:.0f} % of the way from the {'higher ' if both else ''}start "
                f"({100 * start:.1f} %) to the {'lower of the two best accuracies' if both else 'best accuracy'} "
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


def reached(target: dict, side: str, curve: list[dict]) -> str:
    """A target's round for one side, as the report shows it; where the side never got there, its best."""
    r = target.get(side)
    if r is not None:
        return str(r)
    return f"not in {len(curve)} rounds (best {100 * max(x['accuracy'] for x in curve):.1f} %)" if curve else "-"


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


def recall_rows(run: dict, rounds: list[dict]) -> list[tuple[str, float | None, float | None, int]]:
    """Per class: (name, recall before round 1, recall after the last round, held-out samples of the class)."""
    first, final = run.get("initial_confusion"), rounds[-1].get("confusion") if rounds else None
    m = confusion(final if final else first)
    if m is None:
        return []
    before, after = recall(first), recall(final)
    return [(name, before[c] if c < len(before) else None, after[c] if c < len(after) else None, int(m[c].sum()))
            for c, name in enumerate(class_names(run, len(m)))]


def class_names(run: dict, k: int) -> list[str]:
    names = [str(c) for c in run.get("classes") or []]
    return names if len(names) == k else [str(c) for c in range(k)]


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


# --- devices: samples, accuracy, participation ----------------------------------------------------------------

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
    of the global model before round 1 and after the last round (plan.ftp, the final integers in state.db), the
    same on its evaluation part (`heldout_before`, `heldout_after`; nodefile.NodeFile.scored_on: its machine's
    tests, or the part it holds out; `heldout_samples` of them), and what its last accepted DELTA reported: the
    accuracy of its model right after its own local training on the samples it trains on (`reported_accuracy`) and
    on its evaluation part (`personal_accuracy`, the personalised model). Classification plans only."""
    from fedtiny.planfile import load_plan
    from fedtiny_server.state import StateStore

    from . import nodefile

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
    data = {f.stem: nodefile.load(f) for f in files}
    scored = {device: d.scored_on() for device, d in data.items()}
    out = {}
    for device, d in data.items():
        classes, counts = np.unique(d.y, return_counts=True)
        out[device] = dict(samples=int(len(d.y)),
                           class_counts={str(int(c)): int(n) for c, n in zip(classes, counts)})
        mine = sorted(r for r, dev in reported if dev == device)
        last = reported[mine[-1], device] if mine else {}
        if "accuracy" in last:
            out[device].update(reported_accuracy=float(last["accuracy"]), reported_round=mine[-1])
        if last.get("personal_accuracy") is not None:
            out[device].update(personal_accuracy=float(last["personal_accuracy"]))
        out[device]["heldout_samples"] = len(scored[device][1])
    if plan.loss == "mse" or checkpoint is None:
        return out
    for key, parts in (("accuracy", {device: (d.x, d.y) for device, d in data.items()}), ("heldout", scored)):
        x = np.concatenate([x for x, _ in parts.values()])
        y = np.concatenate([y for _, y in parts.values()])
        ends = np.cumsum([len(y) for _, y in parts.values()])[:-1]
        for when, state in (("before", plan.initial_state()), ("after", checkpoint.ints)):
            for device, hits in zip(parts, np.split(predicted_classes(plan, state, x) == y, ends)):
                out[device][f"{key}_{when}"] = float(hits.mean()) if len(hits) else None
    return out


def evaluated_on(run: dict) -> str:
    """One sentence for the report: what each device's global, personalised and alone accuracies are scored on (the
    run's `evaluation`, nodefile)."""
    from .nodefile import MACHINE_TESTS

    if run.get("evaluation") == MACHINE_TESTS:
        return ("Each device is scored on its machine's held-out windows of every class (what the machine will meet, "
                "faults its own history never had included), which no device trains on.")
    return ("Each device is scored on the fifth of its own samples it holds out (from 10 samples on) and never trains "
            "on: only the classes its own samples have.")


def personal_rows(devices: dict[str, dict]) -> list[tuple[str, dict]]:
    """The personalisation table, each row (what, fleet_summary of it over the devices), all on each device's
    evaluation part: the global model before round 1 and after the last round, the device's personalised model (the
    global model after its own local steps, as its last DELTA reported it), and the device trained alone from the
    pretrained model on its own samples, round after round as the run's rounds. Empty when no device has an
    evaluation part."""
    from .personal import fleet_summary

    rows = [("global model before round 1", "heldout_before"), ("global model after the last round", "heldout_after"),
            ("personalised: the global model after the device's own local steps (last DELTA)", "personal_accuracy"),
            ("the device alone: trained from the pretrained model on its own samples, as many rounds",
             "alone_accuracy")]
    out = [(what, fleet_summary([d.get(key) for d in devices.values()])) for what, key in rows]
    return out if any(s["devices"] for _, s in out[2:]) else []


def federation_rows(devices: dict[str, dict], rounds: list[dict]) -> list[tuple[int, dict, dict, dict]]:
    """Per round from round 0, on every device's evaluation part: (round, global, personalised, alone), each
    {mean, worst_tenth} (None where not measured). Round 0 is the pretrained model for all three: every line starts
    from it. Empty when no round has a personalised or alone figure."""
    from .personal import fleet_summary

    if not any(x.get("personal_accuracy") is not None or x.get("alone_accuracy") is not None for x in rounds):
        return []
    start = fleet_summary([d.get("heldout_before") for d in devices.values()])

    def pair(row, key):
        return dict(mean=row.get(key), worst_tenth=row.get(f"{key.removesuffix('_accuracy')}_worst_tenth"))

    rows = [(0, start, start, start)]
    rows += [(x["round"], pair(x, "global_heldout"), pair(x, "personal_accuracy"), pair(x, "alone_accuracy"))
             for x in rounds]
    return rows


def federation_gains(rows: list[tuple[int, dict, dict, dict]]) -> list[tuple[str, dict]]:
    """After the last round, on the devices' evaluation parts: (what, {mean, worst_tenth}) for the global model, the
    personalised one, the device alone, and the gains in points: from federation (personalised - alone: what
    taking part gives a device over training on its own data) and from personalisation (personalised - global)."""
    if not rows:
        return []
    _, glob, personal, alone = rows[-1]

    def minus(a, b):
        return {k: None if a.get(k) is None or b.get(k) is None else a[k] - b[k] for k in ("mean", "worst_tenth")}

    return [("global model", glob), ("personalised: the global model after the device's own local steps", personal),
            ("the device alone: its own samples only, as many rounds", alone),
            ("gain from federation (personalised - alone)", minus(personal, alone)),
            ("gain from personalisation (personalised - global)", minus(personal, glob))]


def points(value: float | None) -> str:
    """A difference of two accuracies in percentage points, signed."""
    return "-" if value is None else f"{100 * value:+.1f} points"


def predicted_classes(plan, state: dict, x_int8: np.ndarray) -> np.ndarray:
    """The labels of the plan's int8 model with trainable `state` for int8 samples: by the plan's C library when gcc
    is here (CPlanModel: the same integers, many times faster, and the library the run's nodes and held-out
    evaluation already built, where a model with the trained weights baked in took a fresh gcc build per run), else
    by the reference interpreter."""
    from fedtiny.interpreter import run

    if len(x_int8) and shutil.which("gcc"):
        from fedtiny_device.cruntime import BuildError, CPlanModel

        try:
            return CPlanModel(plan)(state, x_int8).reshape(len(x_int8), -1).argmax(axis=1)
        except BuildError:
            pass
    graph = plan.graph_with(state)
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
            elif kind == "secagg_round":  # secure aggregation: whose masked DELTA is in the round's sum
                for name in event.get("survivors", ()):
                    answered.setdefault(name, set()).add(event["round"])
                for name in event.get("dropped", ()):
                    refused.setdefault((name, event["round"]), []).append(
                        "sent its secure-aggregation keys and shares, then no masked DELTA in time (left out of "
                        "the sum)")
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


# --- data flow -------------------------------------------------------------------------------------------------

FLOW_FIELDS = ("round", "device", "direction", "message", "bytes", "contents")


def data_flow(coordinator_log: Path, trainable: list[str]) -> list[dict]:
    """The data-flow manifest a compliance review asks for: every transfer the coordinator accepted or sent,
    per round and device, with its size and what it contained, from the coordinator's own structured log."""
    if not Path(coordinator_log).exists():
        return []
    uplink = ("DELTA: integer changes of " + " ".join(trainable) + "; example count; loss; accuracy; the "
              "personalised model's accuracy on the device's evaluation part (where it has one)")
    masked = ("secure aggregation: round keys (signed), Shamir shares encrypted to its neighbours, masked DELTA (the "
              "integer changes of " + " ".join(trainable) + " plus masks in Z/2^k: the coordinator sees only the "
              "round's sum), shares revealed for unmasking; example count; loss; accuracy")
    rows = []
    for line in Path(coordinator_log).read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "reply_accepted":
            rows.append(dict(round=event["round"], device=event["device"], direction="device -> coordinator",
                             message="DELTA", bytes=event["uplink_bytes"], contents=uplink))
        elif event.get("event") == "secagg_round":
            for device in event.get("survivors", ()):
                rows.append(dict(round=event["round"], device=device, direction="device -> coordinator",
                                 message="DELTA", bytes=event["uplink_bytes"].get(device, 0), contents=masked))
        elif event.get("event") == "task_sent":
            rows.append(dict(round=event["round"], device=event["device"], direction="coordinator -> device",
                             message="TASK + GLOBAL_UPDATE", bytes=event.get("downlink_bytes", 0),
                             contents="round settings; changed global trainable tensors"))
    return rows


# --- firmware nodes -------------------------------------------------------------------------------------------

def firmware_table(firmware: dict[str, dict]) -> tuple[list[str], list[list[str]], str]:
    """The firmware nodes (--qemu-nodes): RAM and flash by the linker, DELTAs sent, and the instructions of a
    round by part (from one DELTA to the next, idle polling left out; the first round, which also boots and
    joins, is left out when there are others), with the time they take at two Cortex-M4 clocks. Returns the
    table's header, its rows and a note on what the instructions are."""
    header = ["device", "RAM B", "flash B", "DELTAs sent", "refused downlinks", "training", "crypto", "protocol",
              "instructions per round", "at 64 MHz", "at 216 MHz"]
    rows = []
    for device, node in sorted(firmware.items()):
        rounds = node["instructions"][1:] or node["instructions"]
        mean = {part: sum(r[part] for r in rounds) / max(1, len(rounds)) for part in ("training", "crypto", "protocol")}
        total = sum(mean.values())
        rows.append([f"{device} (firmware)", f"{node['ram_bytes']:,}", f"{node['flash_bytes']:,}",
                     str(node["rounds_sent"]), str(len(node["refused"])), f"{mean['training']:,.0f}",
                     f"{mean['crypto']:,.0f}", f"{mean['protocol']:,.0f}", f"{total:,.0f}", f"{total / 64e6:.2f} s",
                     f"{total / 216e6:.2f} s"])
    return header, rows, ("Instructions are executed instructions counted by QEMU (one per instruction, not cycles: "
                          "a real M4 needs about 1.1-1.5x as many cycles, plus flash wait states).")


def privacy_lines(run: dict, rounds: list[dict]) -> list[str]:
    """Under --dp-epsilon: the epsilon spent (the fleet's: every device's guarantee), how, and per round."""
    p = run["privacy"]
    lines = [f"Differential privacy: epsilon {p['epsilon']:.3f} spent of {p['budget']:g} at delta {p['delta']:g} "
             f"({p['mechanism']}; noise multiplier {p['noise_multiplier']:.3f}, clip norm {p['clip_norm']:g}, "
             f"{p['noised_rounds']} noised rounds). " + (
                 f"Each node added discrete Gaussian noise of std {p['device_noise_sigma']:.4g} before masking, for "
                 f"at least {p['min_survivors']} survivors: it protects each device also against the coordinator, "
                 "which saw only the noised sums (docs/privacy.md)." if p.get("distributed") else
                 "It protects each device against whoever sees the global models; the coordinator itself still "
                 "sees every device's clipped update (docs/privacy.md)."), "",
             "Epsilon after each round: " + ", ".join(f"{x['round']}: {x['epsilon']:.2f}" for x in rounds
                                                      if "epsilon" in x) + "."]
    if run.get("stopped"):
        lines.append(f"Rounds stopped early: {run['stopped']}")
    return lines
