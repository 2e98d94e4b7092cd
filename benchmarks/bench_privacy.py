"""Differential privacy and membership inference (issue 13): accuracy at epsilon 8, 4 and 1 against no DP on two
scenarios, and what a membership-inference attack learns from each run's models and updates.

    python benchmarks/bench_privacy.py [--runs DIR] [--reuse] [--scenarios medical,industrial]
    python benchmarks/bench_privacy.py --secagg [--runs DIR] [--reuse] [--scenarios medical,industrial]

With --secagg the same runs use secure aggregation (`--secagg`), and --dp-epsilon is then distributed DP: each
node adds discrete Gaussian noise before masking, calibrated for the survivors the round's quorum expects (here
all 20; docs/privacy.md); beside each, the same run with central DP and no secure aggregation, on the same
code and machine (the same folders as the first section's runs: --reuse shares them). It writes its own section,
with the membership inference of each run: under secure aggregation the coordinator holds no individual DELTA,
only each round's sum, which is attacked as it was (simulations/attack.py).

Each row is one `fedtiny simulate` run with the defaults (10 rounds, --uplink-keep 0.5, seed 0, the scheme, lr and
epochs chosen on the host's data),
--deadline 120 (every node answers every round even on a loaded machine: the noise on the mean grows as 1/nodes
answering, so late nodes would confound the comparison) and 20 nodes (`medical`'s 569 samples leave 318 for
the nodes; 50 nodes would shrink the noise 2.5x). With --dp-epsilon the noise multiplier is the smallest that
keeps the 10 rounds within (epsilon, delta 1e-5), every update is clipped to the clip norm the run takes from the
host's data (fedtiny.privacy.clip_norm_rule: the median norm of the host's own first-round updates; column C) and
the coordinator adds Gaussian noise to each round's mean (docs/privacy.md).

Then simulations/attack.py's membership_auc attacks the run folder (its assumptions are in that module): the
global model, each device's DELTA as the coordinator sees it, the round's sum (what secure aggregation would
leave visible) and the released global models. The runs are kept in --runs (default: a new temporary folder);
--reuse takes a run (and its attack, membership.json) already there instead of simulating it again.
"""

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from report import provenance, write_section

SECTION = "## Differential privacy and membership inference: accuracy and attack AUC at epsilon 8, 4, 1 (issue 13)"
SECTION_SECAGG = "## Secure aggregation with distributed DP: accuracy at epsilon 8, 4, 1 (issue 13)"
SCENARIOS = {"medical": 20, "industrial": 20}


def simulate(scenario: str, nodes: int, dp_epsilon: float | None, out: Path, cache: str, reuse: bool,
             secagg: bool = False, clip_norm: float | None = None) -> float:
    """The run's wall time in seconds (from its metrics.json when reused); clip_norm None: the run's default."""
    if reuse and (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())["run"]["wall_seconds"]
    args = ["fedtiny", "simulate", "--scenario", scenario, "--nodes", str(nodes), "--deadline", "120", "--quiet",
            "--out", str(out)] + (["--secagg"] if secagg else [])
    if dp_epsilon is not None:
        args += ["--dp-epsilon", str(dp_epsilon)]
    if clip_norm is not None:
        args += ["--clip-norm", str(clip_norm)]
    start = time.perf_counter()
    subprocess.run(args, check=True, env=dict(os.environ, FEDTINY_CACHE=cache), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_name(scenario: str, budget: float | None, secagg: bool) -> str:
    """One folder name per run for both sections, so that --reuse shares the central runs between them."""
    return f"{scenario}-{'secagg' if secagg else 'central'}-{'none' if budget is None else f'eps{budget:g}'}"


def missing(args, out: Path) -> bool:
    """--no-new-runs and the run folder (or its attack) is not there."""
    return args.no_new_runs and not (out / "metrics.json").exists()


def dp_name(budget: float | None, secagg: bool | None = None) -> str:
    """The DP column's name of a row (secagg None: the first section's)."""
    if secagg is None:
        return "none" if budget is None else f"epsilon {budget:g}"
    if budget is None:
        return "secagg, no DP" if secagg else "none"
    return f"secagg + distributed, epsilon {budget:g}" if secagg else f"central, epsilon {budget:g}"


def clip(run: dict) -> str:
    """The run's clip norm, '-' for none."""
    return f"{run['clip_norm']:g}" if run.get("clip_norm") else "-"


def per_node(rounds: list[dict], key: str) -> float:
    return sum(r[key] for r in rounds) / max(1, sum(r["participants"] for r in rounds))


def attack_of(out: Path, reuse: bool) -> dict:
    """membership_auc of a run folder with its time, kept in membership.json (taken from there with --reuse)."""
    from fedtiny_sim.attack import membership_auc

    saved = out / "membership.json"
    if reuse and saved.exists():
        return json.loads(saved.read_text())
    start = time.perf_counter()
    a = membership_auc(out)
    a["seconds"] = time.perf_counter() - start
    saved.write_text(json.dumps(a, indent=1))
    return a


def auc(attack: dict) -> str:
    if not attack["attacks"]:
        return "-"
    return f"{attack['auc']:.3f} ({attack['auc_min']:.2f}-{attack['auc_max']:.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", help="folder for the run folders (default: a new temporary one)")
    parser.add_argument("--reuse", action="store_true", help="take the runs and attacks already in --runs")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of " + ", ".join(SCENARIOS))
    parser.add_argument("--attack-scenarios", help="the scenarios whose runs are attacked (default: all of them); "
                        "the others' attack rows say 'not measured'")
    parser.add_argument("--secagg", action="store_true", help="secure aggregation, DP from the nodes' noise")
    parser.add_argument("--budgets", default="none,8,4,1",
                        help="comma-separated epsilons ('none': no DP), run in this order; the section gets their rows")
    parser.add_argument("--no-new-runs", action="store_true",
                        help="with --reuse: a run not in --runs gets a 'not run' row instead, and one without its "
                             "attack (membership.json) a 'not measured' attack row")
    args = parser.parse_args()
    args.budgets = [None if b == "none" else float(b) for b in args.budgets.split(",")]
    if args.secagg:
        return secagg_main(args)
    attacked = (args.attack_scenarios or args.scenarios).split(",")
    runs = Path(args.runs or tempfile.mkdtemp(prefix="bench_privacy_"))
    cache = os.environ.get("FEDTINY_CACHE") or tempfile.mkdtemp(prefix="fedtiny_cache_")
    command = "python benchmarks/bench_privacy.py" + (f" --scenarios {args.scenarios}"
                                                      if args.scenarios != ",".join(SCENARIOS) else "") + (
        f" --attack-scenarios {args.attack_scenarios}" if args.attack_scenarios else "")
    accuracy_rows = [
        "| scenario, nodes | DP | clip norm C | noise multiplier z | noise std on the mean | "
        "epsilon spent (delta 1e-5) | "
        "accuracy before -> after 10 rounds (best) | nodes per round | uplink / downlink B per node and round | "
        "wall time |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    attack_rows = [
        "| scenario, nodes | DP | global model: before round 1 -> after the last | one device's DELTA (the "
        "coordinator today) | the round's sum (secure aggregation) | the released round (every device) | "
        "attack time |", "|---|---|---:|---:|---:|---:|---:|"]
    for scenario in args.scenarios.split(","):
        nodes = SCENARIOS[scenario]
        for budget in args.budgets:
            out = runs / run_name(scenario, budget, secagg=False)
            if missing(args, out):
                accuracy_rows.append(f"| {scenario}, {nodes} | {dp_name(budget)} | not run | | | | | | | |")
                attack_rows.append(f"| {scenario}, {nodes} | {dp_name(budget)} | not run | | | | |")
                continue
            wall = simulate(scenario, nodes, budget, out, cache, args.reuse)
            m = json.loads((out / "metrics.json").read_text())
            run, rounds = m["run"], m["rounds"]
            p = run.get("privacy")
            accuracy = (f"{100 * run['initial_accuracy']:.1f} % -> {100 * rounds[-1]['accuracy']:.1f} % "
                        f"({100 * max(r['accuracy'] for r in rounds):.1f} %)")
            if p is None:
                dp, z, std, spent = "none", "-", "-", "-"
            else:
                dp, z, spent = f"epsilon {budget:g}", f"{p['noise_multiplier']:.2f}", f"{p['epsilon']:.3f}"
                std = f"{p['noise_multiplier'] * p['clip_norm'] / nodes:.4f}"
            answered = sorted({r["participants"] for r in rounds})
            answered = f"{answered[0]}" if len(answered) == 1 else f"{answered[0]}-{answered[-1]}"
            accuracy_rows.append(f"| {scenario}, {nodes} | {dp} | {clip(run)} | {z} | {std} | {spent} | {accuracy} | "
                                 f"{answered} | "
                                 f"{per_node(rounds, 'uplink_bytes'):,.0f} / "
                                 f"{per_node(rounds, 'downlink_bytes'):,.0f} | {wall:.0f} s |")
            print(accuracy_rows[-1], flush=True)
            if scenario not in attacked or (args.no_new_runs and not (out / "membership.json").exists()):
                attack_rows.append(f"| {scenario}, {nodes} | {dp} | not measured | | | | |")
                continue
            a = attack_of(out, args.reuse)
            g = a["global_model"]
            attack_rows.append(f"| {scenario}, {nodes} | {dp} | {g['auc_before_round_1']:.3f} -> {g['auc']:.3f} | "
                               f"{auc(a['device_update'])} | {auc(a['secure_aggregate'])} | "
                               f"{auc(a['released_update'])} | {a['seconds']:.0f} s |")
            print(attack_rows[-1], flush=True)
    lines = [SECTION, "", provenance(command), "",
             "### Accuracy", "", *accuracy_rows, "",
             "- Noise std on the mean: z * C / nodes per coordinate in real units (every node answers every round); "
             "C is the run's clip norm, taken from the host's data (docs/privacy.md, 'The clip norm from the host's "
             "data'; the same for a scenario at every epsilon: it depends on the plan, not on the budget).",
             "- Accounting: RDP (dp-accounting 0.6), each round a Gaussian mechanism for every node in it, no "
             "amplification by sampling claimed (docs/privacy.md).",
             "- The downlink grows under DP: the noise moves most of the global model's integers every round.", "",
             "### Membership inference (simulations/attack.py), on the same runs", "",
             "AUC of telling a device's training samples (members) from held-out samples of the same distribution "
             "(non-members, reweighted to the members' label and machine mix); 0.5 is chance. The update columns "
             "are the mean over every (device, round) with the lowest and highest in brackets.", "",
             *attack_rows, "",
             "- Global model: loss threshold (-loss under the model). Before round 1 it is the host's pretrained "
             "model, which never saw a device's sample: the attack's measured baseline on that data.",
             "- Updates: relative loss drop, log(loss before) - log(loss after), for the device's own samples "
             "against non-members. One device's DELTA is what the coordinator decrypts today; central DP adds "
             "its noise after that, so it does not protect against the coordinator. The round's sum is all that "
             "secure aggregation would leave the coordinator (measured here from the same DELTAs: the attacker "
             "applies their mean to the round's master); the released round is the global model before and "
             "after, as every device receives it (with the central noise under DP).",
             "- The attacker knows the model or update and the candidates with their labels; no shadow model. "
             "A stronger attack (per-sample calibration, shadow models) may do better: these AUCs bound what leaks "
             "from below, not from above."]
    write_section(SECTION, "\n".join(lines) + "\n")
    print("\n".join(lines))


def secagg_main(args) -> None:
    runs = Path(args.runs or tempfile.mkdtemp(prefix="bench_privacy_secagg_"))
    cache = os.environ.get("FEDTINY_CACHE") or tempfile.mkdtemp(prefix="fedtiny_cache_")
    scenarios = args.scenarios
    command = "python benchmarks/bench_privacy.py --secagg" + (
        f" --scenarios {scenarios}" if scenarios != ",".join(SCENARIOS) else "")
    rows = ["| scenario, nodes | DP | clip norm C | noise multiplier z (calibrated survivors m) | "
            "each node's noise std | "
            "noise std on the mean | epsilon spent (delta 1e-5) | accuracy before -> after 10 rounds (best; "
            "mean of the last 5) | "
            "survivors per round | uplink / downlink B per node and round | wall time |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    attack_rows = ["| scenario, nodes | DP | global model: before round 1 -> after the last | one device's DELTA | "
                   "the round's sum | what the coordinator holds | attack time |",
                   "|---|---|---:|---:|---:|---|---:|"]
    for scenario, budget, secagg in [(s, b, a) for s in scenarios.split(",") for b in args.budgets
                                     for a in (False, True)]:
        nodes = SCENARIOS[scenario]
        out = runs / run_name(scenario, budget, secagg)
        if missing(args, out):
            name = dp_name(budget, secagg)
            rows.append(f"| {scenario}, {nodes} | {name} | not run | | | | | | | | |")
            attack_rows.append(f"| {scenario}, {nodes} | {name} | not run | | | | |")
            continue
        wall = simulate(scenario, nodes, budget, out, cache, args.reuse, secagg=secagg)
        m = json.loads((out / "metrics.json").read_text())
        run, rounds = m["run"], m["rounds"]
        p = run.get("privacy")
        last = [r["accuracy"] for r in rounds[-5:]]
        accuracy = (f"{100 * run['initial_accuracy']:.1f} % -> {100 * rounds[-1]['accuracy']:.1f} % "
                    f"({100 * max(r['accuracy'] for r in rounds):.1f} %; {100 * sum(last) / len(last):.1f} %)")
        answered = sorted({r["participants"] for r in rounds})
        answered = f"{answered[0]}" if len(answered) == 1 else f"{answered[0]}-{answered[-1]}"
        if p is None:
            dp, z, device, std, spent = "secagg, no DP" if secagg else "none", "-", "-", "-", "-"
        elif not secagg:
            dp, z, device, spent = f"central, epsilon {budget:g}", f"{p['noise_multiplier']:.2f}", "-", \
                f"{p['epsilon']:.3f}"
            std = f"{p['noise_multiplier'] * p['clip_norm'] / nodes:.4f}"
        else:
            dp = f"secagg + distributed, epsilon {budget:g}"
            z = f"{p['noise_multiplier']:.2f} (m = {p['min_survivors']})"
            device = f"{p['device_noise_sigma']:.4f}"
            survivors = min(p["round_survivors"], default=nodes)
            std, spent = f"{p['device_noise_sigma'] / survivors ** 0.5:.4f}", f"{p['epsilon']:.3f}"
        rows.append(f"| {scenario}, {nodes} | {dp} | {clip(run)} | {z} | {device} | {std} | {spent} | {accuracy} | "
                    f"{answered} | "
                    f"{per_node(rounds, 'uplink_bytes'):,.0f} / {per_node(rounds, 'downlink_bytes'):,.0f} | "
                    f"{wall:.0f} s |")
        print(rows[-1], flush=True)
        if args.no_new_runs and not (out / "membership.json").exists():
            attack_rows.append(f"| {scenario}, {nodes} | {dp} | not measured | | | | |")
            continue
        a = attack_of(out, args.reuse)
        g = a["global_model"]
        holds = ("each round's unmasked sum (attacked: the real sums)" if secagg else
                 "every device's DELTA (the round's sum computed from them)")
        attack_rows.append(f"| {scenario}, {nodes} | {dp} | {g['auc_before_round_1']:.3f} -> {g['auc']:.3f} | "
                           f"{auc(a['device_update'])} | {auc(a['secure_aggregate'])} | {holds} | "
                           f"{a['seconds']:.0f} s |")
        print(attack_rows[-1], flush=True)
    lines = [SECTION_SECAGG, "", provenance(command), "", *rows, "",
             "- Each node clips to C (from the host's data under DP; 0.5 with secure aggregation alone) and adds "
             "discrete Gaussian integers of std z C / sqrt(m) (real units) "
             "before masking; m is the number of survivors the round's quorum expects (fedtiny.privacy."
             "calibrated_survivors: quorum 1 here, so all 20), and the coordinator unmasks no round with fewer, so "
             "the survivors' summed noise is at least the central mechanism's z C: with all 20 surviving, exactly "
             "the central rows' noise on the mean.",
             "- Central rows: no secure aggregation, the coordinator adds Gaussian noise z C / nodes to the mean "
             "(docs/privacy.md); the same code, machine and settings as the secagg rows beside them.",
             "- Accounting: each round rho = C^2 / (2 n sigma^2) (+ a tau term, zero here) for its n survivors "
             "(Kairouz, Liu, Steinke ICML'21), zCDP composed and converted by dp-accounting 0.6's RDP accountant.",
             "",
             "### Membership inference (simulations/attack.py) on the same runs", "",
             *attack_rows, "",
             "- The attack, its members and reweighted non-members are the first section's (AUC 0.5 is chance; the "
             "update columns are the mean over every (device, round), lowest and highest in brackets).",
             "- Under secure aggregation the coordinator never holds one device's DELTA ('-'): what it can attack "
             "is each round's unmasked sum of the survivors' deltas (with the devices' noise under distributed "
             "DP), which it turns into the next global version; that column is measured on the run's real sums "
             "for each round's survivors. In the central rows it is what secure aggregation would have left, "
             "computed from the same DELTAs."]
    write_section(SECTION_SECAGG, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
