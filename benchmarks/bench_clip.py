"""The clip norm under central DP: the host's rule (fedtiny.privacy.clip_norm_rule) against the devices' own update
norms and against other clip norms at the same budget (issue 13).

    python benchmarks/bench_clip.py [--scenario industrial] [--budgets 8,4] [--clip-norms devices,0.3] [--runs DIR]
                                    [--reuse]

First the run without DP (bench_privacy.py's, the same folder name): each round's DELTAs as the coordinator stored
them, unclipped, give the devices' update norms (update.delta_norm, what clipping measures), and what
update.clip_delta would send of each at the rule's C. Then for each budget the run with the rule's C (bench_privacy's
folder) and one run per --clip-norms value: a number, or `devices` for the median of the devices' first-round norms
(what private adaptive clipping, Andrew et al. NeurIPS'21, tracks and spends budget on). Each run is `fedtiny
simulate` with bench_privacy.py's settings (20 nodes, --deadline 120, seed 0); --reuse takes the runs already in --runs.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from bench_privacy import SCENARIOS, run_name, simulate
from report import provenance, write_section

SECTION = "## The clip norm under DP: the host's rule against the devices' update norms (issue 13)"


def device_norms(run: Path, clip_norm: float) -> dict[int, tuple[list[float], list[float]]]:
    """round -> (each stored DELTA's norm, its norm after clip_delta at clip_norm)."""
    from fedtiny.planfile import load_plan
    from fedtiny.protocol.update import clip_delta, delta_norm, row_scales, zero_delta
    from fedtiny_sim.attack import _read_store

    plan = load_plan(run / "plan.ftp")
    scales, zero = row_scales(plan), zero_delta(plan)
    out: dict[int, tuple[list[float], list[float]]] = {}
    for rnd, _, _, delta in _read_store(run / "state.db")[1]:
        delta = {**zero, **delta}
        norms, sent = out.setdefault(rnd, ([], []))
        norms.append(delta_norm(delta, scales))
        sent.append(delta_norm(clip_delta(delta, scales, clip_norm), scales))
    return out


def accuracy(run: Path) -> tuple[float, float, float]:
    """The run's accuracy in % after the last round, its best, and the mean of its last 5 rounds."""
    a = [100 * r["accuracy"] for r in json.loads((run / "metrics.json").read_text())["rounds"]]
    return a[-1], max(a), float(np.mean(a[-5:]))


def cells(run: Path) -> str:
    return " | ".join(f"{a:.1f} %" for a in accuracy(run))


def spread(values: list[float]) -> str:
    return f"{np.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="industrial", choices=sorted(SCENARIOS))
    parser.add_argument("--budgets", default="8,4", help="comma-separated epsilons")
    parser.add_argument("--clip-norms", default="devices,0.3",
                        help="comma-separated clip norms beside the rule's: numbers, or 'devices'")
    parser.add_argument("--runs", help="folder for the run folders (default: a new temporary one)")
    parser.add_argument("--reuse", action="store_true", help="take the runs already in --runs")
    args = parser.parse_args()
    runs = Path(args.runs or tempfile.mkdtemp(prefix="bench_clip_"))
    cache = os.environ.get("FEDTINY_CACHE") or tempfile.mkdtemp(prefix="fedtiny_cache_")
    nodes = SCENARIOS[args.scenario]
    budgets = [float(b) for b in args.budgets.split(",")]
    plain = runs / run_name(args.scenario, None, secagg=False)
    simulate(args.scenario, nodes, None, plain, cache, args.reuse)
    ruled = runs / run_name(args.scenario, budgets[0], secagg=False)
    simulate(args.scenario, nodes, budgets[0], ruled, cache, args.reuse)
    rule = json.loads((ruled / "metrics.json").read_text())["run"]["clip_norm"]
    norms = device_norms(plain, rule)
    devices = float(f"{np.median(norms[min(norms)][0]):.3g}")
    clips = [devices if c == "devices" else float(c) for c in args.clip_norms.split(",")]
    norm_rows = ["| round | devices' update norms without DP: median (lowest-highest) | what clip_delta sends of "
                 f"them at the rule's C = {rule:g} |", "|---:|---:|---:|"]
    norm_rows += [f"| {r} | {spread(n)} | {spread(s)} |" for r, (n, s) in sorted(norms.items())]
    rows = ["| epsilon | clip norm C | how C was chosen | accuracy after 10 rounds | best | mean of the last 5 |",
            "|---:|---:|---|---:|---:|---:|"]
    for budget in budgets:
        ruled = runs / run_name(args.scenario, budget, secagg=False)
        simulate(args.scenario, nodes, budget, ruled, cache, args.reuse)
        rows.append(f"| {budget:g} | {rule:g} | the host's rule | {cells(ruled)} |")
        for c in clips:
            out = runs / f"{run_name(args.scenario, budget, secagg=False)}-C{c:g}"
            simulate(args.scenario, nodes, budget, out, cache, args.reuse, clip_norm=c)
            how = "the devices' median in round 1 (without DP)" if c == devices else f"{c / rule:.2f} x the rule's"
            rows.append(f"| {budget:g} | {c:g} | {how} | {cells(out)} |")
        print(rows[-1], flush=True)
    command = "python benchmarks/bench_clip.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("scenario", args.scenario), ("budgets", args.budgets),
                                                      ("clip_norms", args.clip_norms)))
    lines = [SECTION, "", provenance(command), "",
             f"`{args.scenario}`, {nodes} nodes, central DP, 10 rounds, delta 1e-5; without DP the run ends at "
             f"{accuracy(plain)[0]:.1f} %.", "", *rows, "", *norm_rows, "",
             "- Update norms: L2 in real units of each DELTA the coordinator stored in the run without DP "
             "(update.delta_norm, what the devices clip); the last column is what update.clip_delta (the device's and "
             "the grid's clipping, integers truncated toward zero) leaves of each at the rule's C."]
    write_section(SECTION, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
