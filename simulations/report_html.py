"""report.html: the run's report for a person, in one file that any browser shows offline.

The plots are the run folder's PNGs, embedded as data: URLs; everything else is tables. No script, no style sheet,
font or image from elsewhere: the page makes no network request, so it can be mailed, archived or opened on a
machine without a network, and shows the same everywhere.
"""

import base64
from html import escape
from pathlib import Path

from .report_data import (NODE_MIN_PER_CLASS, class_names, confusion, evaluated_on, federation_gains, federation_rows,
                          few_samples, firmware_table, percent, personal_rows, points, privacy_lines, reached,
                          recall_rows, stragglers_back)

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; }
.warning { background: #fff4e0; border-left: 4px solid #e69500; padding: 0.5em 1em; }
.note { color: #555; font-size: 0.9em; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
td.ok { color: #1a7f37; } td.miss { color: #b42318; font-weight: bold; } td.idle { color: #aaa; }
"""

PLOT_TITLES = {"accuracy_loss.png": "Held-out accuracy and loss per round (round 0: the model before any round)",
               "federation.png": "On each device's evaluation part per round: the global model, the device's "
                                 "personalised model and the device trained alone (mean and worst tenth)",
               "recall.png": "Per-class recall of the global model per round",
               "bytes_per_round.png": "Bytes per node per round",
               "device_memory.png": "Device SRAM for one training step"}


def html_report(run: dict, rounds: list[dict], memory: dict, baseline: dict | None, flows: list[dict],
                devices: dict[str, dict], plots: list[Path]) -> str:
    """The page, from what write_report computed and the PNG plots it wrote."""
    last = rounds[-1] if rounds else {}
    parts = [f"<h1>fedtiny simulation: {escape(str(run['scenario']))}, {run['nodes']} nodes, {len(rounds)} rounds</h1>",
             _table(["", "value"], [
                 ["held-out accuracy before round 1 / after the last round",
                  f"{percent(run['initial_accuracy'])} / {percent(last.get('accuracy'))}"],
                 ["uplink bytes per node per round (mean)", f"{_uplink_per_node(rounds):,.0f}"],
                 ["device RAM for training (arena + kernel scratch + stack and runtime statics)",
                  f"{memory['device_ram_bytes']:,} B ({memory['arena_bytes']:,} + {memory['scratch_bytes']:,} + "
                  f"{memory['stack_bytes'] + memory['runtime_static_bytes']:,}) of "
                  f"{memory['budget_bytes'] - memory['reserve_bytes']:,} B available"],
                 ["flash for the model and plan", f"{memory['flash_bytes']:,} B"]])]
    if run.get("privacy"):
        parts += [f"<p>{escape(line)}</p>" for line in privacy_lines(run, rounds) if line]
    parts += _warnings(run, devices)
    parts += _federation(run, devices, rounds)
    parts += _comparison(run, rounds, memory, baseline)
    parts.append("<h2>Plots</h2>")
    for plot in plots:
        data = base64.b64encode(plot.read_bytes()).decode("ascii")
        parts.append(f"<figure><figcaption>{escape(PLOT_TITLES.get(plot.name, plot.name))}</figcaption>"
                     f'<img alt="{escape(plot.name)}" src="data:image/png;base64,{data}"></figure>')
    parts += _rounds(run, rounds)
    parts += _personal(run, devices)
    parts += _recall(run, rounds)
    parts += _devices(run, rounds, devices)
    parts += _data_flow(run, flows)
    if run.get("firmware"):
        header, rows, note = firmware_table(run["firmware"])
        parts += ["<h2>Firmware nodes (C on a Cortex-M4 under QEMU mps2-an386)</h2>", _table(header, rows),
                  f"<p>{escape(note)}</p>"]
    parts += ["<h2>Settings</h2>", _table(["setting", "value"], _settings(run, memory), text=(0, 1)),
              '<p class="note">Files beside this page: summary.md (the same in short), metrics.json (every number '
              "here), metrics.csv, data_flow.csv (every transfer), coordinator.jsonl (the coordinator's log), "
              f"plan.ftp, and the plots as PNG: {escape(', '.join(p.name for p in plots))}.</p>"]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>fedtiny report: {escape(str(run['scenario']))}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def _table(header: list[str], rows: list[list], text: tuple[int, ...] = (0,)) -> str:
    """An HTML table; the columns in `text` are text (left-aligned), the others numbers. A cell may be a pair
    (value, css class)."""
    def cell(tag: str, column: int, value) -> str:
        value, css = value if isinstance(value, tuple) else (value, None)
        classes = " ".join(c for c in ("text" if column in text else None, css) if c)
        attribute = f' class="{classes}"' if classes else ""
        return f"<{tag}{attribute}>{escape(str(value))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>\n" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>"


def _uplink_per_node(rounds: list[dict]) -> float:
    return sum(x["uplink_bytes"] for x in rounds) / max(1, sum(x["participants"] for x in rounds))


def _warnings(run: dict, devices: dict[str, dict]) -> list[str]:
    parts = []
    few = few_samples(devices)
    if few:
        names = class_names(run, len(run.get("classes") or []))
        rows = [[device, ", ".join(f"{names[int(c)] if int(c) < len(names) else c}: {n}" for c, n in counts.items())]
                for device, counts in few.items()]
        parts += [f'<div class="warning"><p><b>Warning:</b> {len(few)} of {run["nodes"]} nodes hold fewer than '
                  f"{NODE_MIN_PER_CLASS} samples of a class they have. Their accuracy on such a class moves in big "
                  "steps, and their updates for it rest on a few training steps.</p>",
                  _table(["node", "classes with too few samples (samples)"], rows, text=(0, 1)), "</div>"]
    stragglers = {k: d for k, d in devices.items() if d.get("straggler")}
    _, not_back = stragglers_back(stragglers)
    if not_back:
        parts.append(f'<div class="warning"><p><b>Warning:</b> stragglers with nothing accepted after a missed round: '
                     f"{escape(', '.join(not_back))} (see Missed rounds).</p></div>")
    return parts


def _comparison(run: dict, rounds: list[dict], memory: dict, baseline: dict | None) -> list[str]:
    targets = run.get("targets", [])

    if not baseline:
        if not targets:
            return []
        t = targets[0]
        return ["<h2>Rounds to a target</h2>",
                _table(["target", "rule", "fedtiny"],
                       [[percent(t["accuracy"]), t["rule"], reached(t, "fedtiny", rounds)]], text=(1,))]
    b_rounds = baseline["rounds"]
    rows = [["held-out accuracy before round 1", percent(run["initial_accuracy"]),
             percent(baseline.get("initial_accuracy"))],
            ["final held-out accuracy", percent(rounds[-1]["accuracy"] if rounds else None),
             percent(b_rounds[-1]["accuracy"] if b_rounds else None)],
            ["best held-out accuracy", percent(max((r["accuracy"] for r in rounds), default=None)),
             percent(max((r["accuracy"] for r in b_rounds), default=None))]]
    rows += [[f"rounds to {percent(t['accuracy'])} ({i + 1})", reached(t, "fedtiny", rounds),
              reached(t, "baseline", b_rounds)] for i, t in enumerate(targets)]
    rows += [["bytes per node per round (uplink)", f"{_uplink_per_node(rounds):,.0f}",
              f"{baseline['bytes_per_node_per_round']:,.0f}"],
             ["device RAM for training (arena, kernel scratch, stack)", f"{memory['device_ram_bytes']:,} B",
              f"at least {baseline['training_memory_bytes']:,} B (fp32 weights + gradients)"],
             ["wall time from the pretrained float model (each side's lr choice included)",
              f"{run['wall_seconds'] - run.get('host_model_seconds', 0):.1f} s", f"{baseline['wall_seconds']:.1f} s"]]
    rules = "".join(f"<li>({i + 1}) {escape(t['rule'])}; round 0 is the start.</li>" for i, t in enumerate(targets))
    return ["<h2>Against plain Flower + PyTorch fp32 (same task, data, rounds)</h2>",
            _table(["", "fedtiny", "Flower + PyTorch fp32"], rows), f"<p>Targets:</p><ul>{rules}</ul>"]


def _federation(run: dict, devices: dict[str, dict], rounds: list[dict]) -> list[str]:
    gains = federation_gains(federation_rows(devices, rounds))
    if not gains:
        return []
    cell = (lambda what, v: points(v) if what.startswith("gain") else percent(v))
    return ["<h2>What federation and personalisation gain</h2>",
            f"<p>On each device's evaluation part, after the last round. {escape(evaluated_on(run))} "
            "Personalised: the global model after the device's own local steps of the round. Alone: the device "
            "trained from the pretrained model on its own samples only, round after round as the run's rounds. The "
            "plot below (federation.png) has every round.</p>",
            _table(["", "mean", "worst tenth of devices"],
                   [[what, cell(what, v["mean"]), cell(what, v["worst_tenth"])] for what, v in gains])]


def _rounds(run: dict, rounds: list[dict]) -> list[str]:
    rows = [[0, percent(run["initial_accuracy"]), *["-"] * 11]]
    rows += [[x["round"], percent(x["accuracy"]), percent(x.get("global_heldout")),
              percent(x.get("global_heldout_worst_tenth")), percent(x.get("personal_accuracy")),
              percent(x.get("personal_worst_tenth")), percent(x.get("alone_accuracy")),
              percent(x.get("alone_worst_tenth")), f"{x['loss']:.3f}", x["participants"], f"{x['uplink_bytes']:,}",
              f"{x['downlink_bytes']:,}", f"{x['seconds']:.2f}"] for x in rounds]
    return ["<h2>Rounds</h2>",
            _table(["round", "held-out accuracy (global model)", "devices' evaluation: global, mean",
                    "global, worst tenth", "personalised, mean", "personalised, worst tenth", "alone, mean",
                    "alone, worst tenth", "loss", "participants", "uplink B", "downlink B", "seconds"], rows, text=()),
            '<p class="note">Round 0 is the pretrained int8 model before any round. On the devices\' evaluation '
            "parts: the global model of the round, each device's model after its local steps of the round "
            "(personalised, over the devices that answered the round with one) and each device trained alone for as "
            f"many rounds (mean, and the mean of the lowest tenth). {escape(evaluated_on(run))}</p>"]


def _personal(run: dict, devices: dict[str, dict]) -> list[str]:
    rows = personal_rows(devices)
    if not rows:
        return []
    return ["<h2>Personalisation (each device's evaluation part)</h2>",
            f"<p>{escape(evaluated_on(run))} A device's personalised model is the global model after its own local steps of a round: it costs no memory "
            "beyond the round's, and the device reports its accuracy in its DELTA, so no sample leaves it. The "
            "device alone: trained from the pretrained model, on its own samples only, round after round as the "
            "run's rounds.</p>",
            _table(["model, on each device's evaluation part", "mean", "worst tenth of devices", "devices"],
                   [[what, percent(s["mean"]), percent(s["worst_tenth"]), s["devices"]] for what, s in rows])]


def _recall(run: dict, rounds: list[dict]) -> list[str]:
    rows = recall_rows(run, rounds)
    if not rows:
        return []
    parts = ["<h2>Per-class recall of the global model (held-out)</h2>",
             "<p>Of each class's held-out samples, the share the global model labels right. For a fault class, 100 % "
             "minus it is the share of faults missed; for the normal class, the share of false alarms: the two cost "
             "different amounts.</p>",
             _table(["class", "held-out samples", "before round 1", "after the last round"],
                    [[name, n, percent(a), percent(b)] for name, a, b, n in rows])]
    m = confusion(rounds[-1].get("confusion") if rounds else None)
    if m is not None:
        names = class_names(run, len(m))
        parts += ["<p>Confusion matrix after the last round (row: true class, column: predicted class):</p>",
                  _table(["true \\ predicted", *names], [[name, *m[i].tolist()] for i, name in enumerate(names)])]
    return parts


def _devices(run: dict, rounds: list[dict], devices: dict[str, dict]) -> list[str]:
    if not devices:
        return []
    names = class_names(run, len(run.get("classes") or []))
    label = (lambda c: names[int(c)] if int(c) < len(names) else c)
    rows = []
    for device, d in devices.items():
        reported = (f"{percent(d['reported_accuracy'])} (round {d['reported_round']})"
                    if d.get("reported_accuracy") is not None else "-")
        rows.append([device, d.get("samples", "-"),
                     ", ".join(f"{label(c)}: {n}" for c, n in d.get("class_counts", {}).items()) or "-",
                     percent(d.get("accuracy_before")), percent(d.get("accuracy_after")), reported,
                     d.get("heldout_samples", "-"), percent(d.get("heldout_before")), percent(d.get("heldout_after")),
                     percent(d.get("personal_accuracy")), percent(d.get("alone_accuracy")),
                     f"{len(d['answered'])} of {len(d['tasked'])}", "yes" if d.get("straggler") else ""])
    parts = ["<h2>Devices</h2>",
             "<p>Accuracy on all of each device's own samples: of the global model before round 1 and after the last "
             "round, computed here from the run's records; and as its last accepted DELTA reported it (its own model "
             "right after its local training, on the samples it trains on). Then on its evaluation part: the global "
             "model before and after, its personalised model (its last DELTA's report) and the device trained alone. "
             f"{escape(evaluated_on(run))}</p>",
             _table(["device", "samples", "samples per class", "global model before", "global model after",
                     "its own model (last report)", "evaluation samples", "evaluation: global before",
                     "evaluation: global after", "evaluation: personalised", "evaluation: alone", "rounds answered", "straggler"], rows,
                    text=(0, 2))]
    numbers = [r["round"] for r in rounds]
    if numbers:
        grid = []
        for device, d in devices.items():
            cells = []
            for r in numbers:
                if r in d["answered"]:
                    cells.append(("answered", "ok"))
                elif r in d["missed"]:
                    cells.append(("missed", "miss"))
                else:
                    cells.append(("not asked", "idle"))
            grid.append([device, *cells])
        parts += ["<h3>Participation per round</h3>", _table(["device", *map(str, numbers)], grid)]
    missed = [[device, r, why] for device, d in devices.items() for r, why in d.get("why", {}).items()]
    if missed:
        parts += [f"<h3>Missed rounds: {len(missed)}</h3>", _table(["device", "round", "why"], missed, text=(0, 2))]
    return parts


def _data_flow(run: dict, flows: list[dict]) -> list[str]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for f in flows:
        groups.setdefault((f["direction"], f["message"]), []).append(f)
    rows = [[direction, message, len(fs), len({f["device"] for f in fs}), f"{sum(f['bytes'] for f in fs):,}",
             f"{sum(f['bytes'] for f in fs) / len(fs):,.0f}", fs[0]["contents"]]
            for (direction, message), fs in sorted(groups.items())]
    flower = run.get("engine") == "flower"
    what = ("No sample, feature or label left any device. This engine has no MQTT link: the bytes are the encoded "
            "message bodies alone, without envelope or chunk headers." if flower else
            "No sample, feature or label left any device. Each DELTA was signed with the device's EdDSA key and "
            "encrypted end to end with ChaCha20-Poly1305; the bytes are whole MQTT payloads (docs/security.md).")
    return ["<h2>Data flow</h2>", f"<p>{escape(what)} data_flow.csv lists every transfer (round, device, "
            "direction, bytes, contents).</p>",
            _table(["direction", "message", "transfers", "devices", "bytes in all", "bytes per transfer", "contents"],
                   rows, text=(0, 1, 6))]


def _settings(run: dict, memory: dict) -> list[list]:
    keys = ("scenario", "model", "scheme", "strategy", "nodes", "engine", "broker", "trainer", "seed", "dropout",
            "stragglers", "deadline", "qemu_nodes")
    rows = [[k, run[k]] for k in keys if run.get(k) is not None]
    rows += [["budget", f"{memory['budget_bytes']:,} B"], ["reserve (network stack)", f"{memory['reserve_bytes']:,} B"],
             ["trainable tensors", ", ".join(run.get("trainable", []))],
             ["classes", ", ".join(map(str, run.get("classes") or []))],
             ["wall time", f"{run['wall_seconds']:.1f} s"]]
    return [[k, str(v)] for k, v in rows]
