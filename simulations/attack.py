"""Membership inference, measured on a run: what its models and updates reveal about whose samples trained them.

The attack is the loss-threshold attack (Yeom et al., CSF'18), in two forms:

    global model   score = -loss of a candidate sample under a model: a model fits the samples it trained on
                   better than others. Who can run it: anyone given the model (every device, `global.ftm`).
    update         score = log(loss before) - log(loss after) an update, the relative drop (the calibrated
                   attack of Sablayrolles et al., ICML'19, with the model before the update as the reference): an
                   update moves the model towards the samples it was trained on, and a member the model fitted
                   already cannot drop much in absolute terms (on an overfit update the absolute drop scored
                   0.81-0.88 where the relative one scored 0.93-0.99, tests/test_attack.py's plan). Who can run it:
                   whoever sees the update and the model it started from:
                     device update      one device's DELTA, as the coordinator decrypts it today (no secure
                                        aggregation); central DP does not hide it, the coordinator adds the noise
                     secure aggregate   the sum of the round's DELTAs, all that secure aggregation leaves
                                        visible to the coordinator (the cohort's mean update): it hides which
                                        device a sample came from, not whether the round trained on it
                     released update    the global model before and after the round, what every device gets
                                        (under central DP: with the coordinator's noise)

Members are a device's training samples (the node's own file in the run folder, less the part it holds out:
agent.heldout_split); non-members are the scenario's
held-out test samples, from the same distribution, which no model of the run trained on. A device's samples are
label-skewed (and an industrial node is one machine), so an update lowers the loss of every sample of its
labels and machine, member or not: non-members are reweighted to the members' mix of (group, label), so that
the attack cannot win by the label or the machine alone; members in a cell with no non-member are left out.
The attacker is assumed to know the model (or update), the loss and candidate samples with their labels; it
needs no shadow model and no threshold (AUC, sklearn's roc_auc_score, sweeps every threshold). AUC 0.5 is
chance: the attack learns nothing about membership; 1.0 tells every member from every non-member.

A run under secure aggregation (metrics.json's run.secure_aggregation) stores no individual DELTA: its device
attack is empty (0 attacks), and what the coordinator can attack is each round's unmasked sum, which it turns into
the next global version (the round's master + sum / m, requantized: under distributed DP the sum already holds the
devices' noise, and nothing is added after it). Its secure-aggregate attack is therefore measured on the run's
real sums, the global version before and after each round, for that round's survivors (the coordinator log's
secagg_round events): the same numbers as its released rounds, which are attacked for the same survivors.

The before-round-1 AUC of the global-model attack is the run's own control: that model (the host's pretrained
one) never saw a node's sample, so it measures the attack's baseline on the run's data (0.5 up to sampling).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np

ASSUMPTIONS = ("loss-threshold attack; the attacker knows the model or update it attacks and the candidate samples "
               "with their labels; members: a device's training samples; non-members: the scenario's held-out "
               "test samples, reweighted to the members' (group, label) mix; AUC 0.5 is chance")


def sample_losses(plan, state: dict[str, np.ndarray], x_int8: np.ndarray, y: np.ndarray, forward=None
                  ) -> np.ndarray:
    """Cross-entropy of each sample under the int8 model `plan.graph_with(state)`, on its dequantized logits.
    `forward(state, x_int8)` -> int8 outputs (fedtiny_device.cruntime.CPlanModel); default: the interpreter."""
    from fedtiny.interpreter import dequantize, run

    if plan.loss == "mse":
        raise ValueError("membership inference by cross-entropy needs a classification plan, not an MSE one")
    if forward is None:
        def forward(state, x):
            return run(plan.graph_with(state), x)
    graph = plan.graph
    logits = dequantize(graph, graph.outputs[0], forward(state, np.ascontiguousarray(x_int8))).reshape(len(y), -1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(y)), np.asarray(y, np.int64)]


def nonmember_weights(member_cells: np.ndarray, nonmember_cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(member weights, non-member weights): a cell is a (group, label) pair, one row per sample. Non-members are
    weighted so that their cells have the members' shares; members of a cell without non-members weigh 0."""
    member_cells, nonmember_cells = np.asarray(member_cells), np.asarray(nonmember_cells)
    m_keys, m_inverse, m_counts = np.unique(member_cells, axis=0, return_inverse=True, return_counts=True)
    n_keys, n_inverse, n_counts = np.unique(nonmember_cells, axis=0, return_inverse=True, return_counts=True)
    m_index = {tuple(k): i for i, k in enumerate(m_keys)}
    n_index = {tuple(k): i for i, k in enumerate(n_keys)}
    member_w = np.array([1.0 if tuple(k) in n_index else 0.0 for k in m_keys])[m_inverse.ravel()]
    kept = member_w.sum()
    share = np.array([m_counts[m_index[tuple(k)]] / kept if tuple(k) in m_index and kept else 0.0
                      for k in n_keys])
    nonmember_w = (share / n_counts)[n_inverse.ravel()] * len(nonmember_cells)
    return member_w, nonmember_w


def membership_auc_of(member_scores: np.ndarray, nonmember_scores: np.ndarray,
                      member_weights: np.ndarray | None = None, nonmember_weights: np.ndarray | None = None
                      ) -> float:
    """ROC AUC of telling members (higher score) from non-members; NaN when either side is empty."""
    from sklearn.metrics import roc_auc_score

    member_scores, nonmember_scores = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    mw = np.ones(len(member_scores)) if member_weights is None else np.asarray(member_weights, float)
    nw = np.ones(len(nonmember_scores)) if nonmember_weights is None else np.asarray(nonmember_weights, float)
    if mw.sum() <= 0 or nw.sum() <= 0:
        return float("nan")
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    weights = np.r_[mw, nw]
    keep = weights > 0
    return float(roc_auc_score(labels[keep], np.r_[member_scores, nonmember_scores][keep],
                               sample_weight=weights[keep]))


def model_auc(plan, state, members: tuple, nonmembers: tuple, forward=None) -> float:
    """The global-model attack on `state`: members and nonmembers are (x_int8, y, cells)."""
    mw, nw = nonmember_weights(members[2], nonmembers[2])
    return membership_auc_of(-sample_losses(plan, state, members[0], members[1], forward),
                             -sample_losses(plan, state, nonmembers[0], nonmembers[1], forward), mw, nw)


def update_auc(plan, before, after, members: tuple, nonmembers: tuple, forward=None) -> float:
    """The update attack: how much, relatively, the update from `before` to `after` lowered each candidate's loss."""
    mw, nw = nonmember_weights(members[2], nonmembers[2])

    def drop(x, y):
        def log_loss(state):
            return np.log(np.maximum(sample_losses(plan, state, x, y, forward), 1e-12))

        return log_loss(before) - log_loss(after)

    return membership_auc_of(drop(*members[:2]), drop(*nonmembers[:2]), mw, nw)


# --- a run folder --------------------------------------------------------------------------------------------

class AttackError(ValueError):
    """A run folder the attack cannot read (missing files, or data that is not the run's)."""


def _summary(values: list[float]) -> dict:
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return {"auc": float("nan"), "auc_min": float("nan"), "auc_max": float("nan"), "attacks": 0}
    return {"auc": float(np.mean(finite)), "auc_min": float(min(finite)), "auc_max": float(max(finite)),
            "attacks": len(finite)}


def _read_store(path: Path) -> tuple[dict[int, tuple], list[tuple]]:
    """({version: (round, master, ints)}, [(round, device, base version, delta)]) from the coordinator's
    state.db, opened read-only."""
    from fedtiny_server.state import unpack_arrays

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        globals_ = {v: (r, unpack_arrays(m), unpack_arrays(i))
                    for v, r, m, i in db.execute("SELECT version, round, master, ints FROM globals")}
        replies = [(r, d, v, unpack_arrays(delta)) for r, d, v, delta in db.execute(
            "SELECT round, device, model_version, delta FROM replies ORDER BY round, device")]
    finally:
        db.close()
    return globals_, replies


def _secagg_survivors(run: Path) -> dict[int, list[str]]:
    """round -> the device names whose masked DELTAs are in its sum (the coordinator's secagg_round events)."""
    out: dict[int, list[str]] = {}
    log = run / "coordinator.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "secagg_round" and "survivors" in event:
                out[int(event["round"])] = list(event["survivors"])
    return out


def _forward(plan):
    if shutil.which("gcc") is None:
        return None
    from fedtiny_device.cruntime import CPlanModel

    return CPlanModel(plan)


def membership_auc(run_dir: str | Path, task=None) -> dict:
    """The three attacks on a `fedtiny simulate` run folder (plan.ftp, state.db, nodes/, metrics.json): AUCs
    (mean, min, max over devices and rounds for the update attacks) and what they assume. `task`: the run's
    scenario task (simulations.scenarios.load_task), reloaded from metrics.json's scenario, nodes and seed when
    not given (a run on a --data file must pass it). Raises AttackError for a folder it cannot use."""
    from fedtiny.interpreter import quantize_input
    from fedtiny.planfile import load_plan
    from fedtiny.protocol.update import zero_delta
    from fedtiny_device.agent import heldout_split
    from fedtiny_server.requantize import dequantize_state, rebuild, requantize_state, tensor_specs

    run = Path(run_dir)
    for name in ("plan.ftp", "state.db", "metrics.json", "nodes"):
        if not (run / name).exists():
            raise AttackError(f"{run}: no {name}; membership inference needs a finished `fedtiny simulate` run")
    summary = json.loads((run / "metrics.json").read_text())["run"]
    if task is None:
        from .scenarios import SCENARIOS, load_task

        if summary["scenario"] not in SCENARIOS:
            raise AttackError(f"{run}: a run on a data file ({summary['scenario']}); pass its task")
        task = load_task(summary["scenario"], summary["nodes"], summary["seed"])
    plan = load_plan(run / "plan.ftp")
    forward = _forward(plan)
    nodes = {}
    for i, ds in enumerate(task.nodes):
        path = run / "nodes" / f"node{i:03d}.npz"
        if not path.exists():
            raise AttackError(f"{run}: no {path.name} for node {i} of the task")
        with np.load(path) as f:
            x, y, seed = f["x"], f["y"], int(f["seed"])
        if not np.array_equal(y, ds.y):
            raise AttackError(f"{run}: {path.name} does not hold the task's node {i} (another scenario or seed?)")
        # members are what the device trained on: not the part it holds out for its personalised accuracy
        train, _ = heldout_split(seed, len(y))
        nodes[path.stem] = (x[train], y[train], np.c_[ds.group, ds.y][train])
    test = task.test
    heldout = (quantize_input(plan.graph, test.X), test.y, np.c_[test.group, test.y])

    def nonmembers_of(device: str) -> tuple:
        """The held-out samples of the device's groups (its machine), or all when none is of them."""
        same = np.isin(heldout[2][:, 0], np.unique(nodes[device][2][:, 0]))
        return tuple(a[same] for a in heldout) if same.any() else heldout

    specs = tensor_specs(plan)
    globals_, replies = _read_store(run / "state.db")
    last = max(globals_)
    pooled = tuple(np.concatenate([n[k] for n in nodes.values()]) for k in range(3))
    result = {"assumptions": ASSUMPTIONS, "baseline_auc": 0.5,
              "members": int(len(pooled[1])), "nonmembers": int(len(heldout[1])),
              "global_model": {"auc": model_auc(plan, globals_[last][2], pooled, heldout, forward),
                               "auc_before_round_1": model_auc(plan, globals_[0][2], pooled, heldout, forward),
                               "version": last}}
    device_aucs, aggregate_aucs, released_aucs = [], [], []  # one AUC per (device, round)
    by_round: dict[int, list] = {}
    for rnd, device, version, delta in replies:
        by_round.setdefault(rnd, []).append((device, version, delta))
        if device in nodes and version in globals_:
            _, master, before = globals_[version]
            # the device's model as the coordinator rebuilds it: its float master + the DELTA (which carries
            # changes held back from earlier rounds too), requantized
            after = requantize_state(specs, rebuild(specs, master, delta))
            device_aucs.append(update_auc(plan, before, after, nodes[device], nonmembers_of(device), forward))
    zero = zero_delta(plan)  # a DELTA may leave out buffers that did not change
    secagg = bool(summary.get("secure_aggregation"))
    survivors = _secagg_survivors(run) if secagg else {}
    for rnd, cohort in sorted(by_round.items()):
        versions = {v for _, v, _ in cohort}
        if len(versions) != 1 or versions.pop() not in globals_:
            continue  # a semi-asynchronous round: replies from several versions have no one sum to attack
        _, master, before = globals_[cohort[0][1]]
        # what secure aggregation reveals: the sum of the cohort's DELTAs; the attacker applies its mean
        total = {n: sum(dequantize_state(specs, {**zero, **d})[n] for _, _, d in cohort) for n in specs}
        summed = requantize_state(specs, {n: master[n] + total[n] / len(cohort) for n in specs})
        aggregate_aucs += [update_auc(plan, before, summed, nodes[device], nonmembers_of(device), forward)
                           for device, _, _ in cohort if device in nodes]
    # the released rounds: each global version against the one before; the cohort is the round's replies, or
    # under secure aggregation its survivors (every node if the log does not name them)
    for version, (rnd, _, after) in sorted(globals_.items()):
        if version == 0 or version - 1 not in globals_:
            continue
        cohort = [device for device, _, _ in by_round.get(rnd, [])] or survivors.get(rnd) or list(nodes)
        released_aucs += [update_auc(plan, globals_[version - 1][2], after, nodes[device], nonmembers_of(device),
                                     forward) for device in cohort if device in nodes]
    if secagg:  # the coordinator's attack is on the round's sum, which made the released version
        aggregate_aucs = list(released_aucs)
    result["device_update"] = _summary(device_aucs)
    result["secure_aggregate"] = _summary(aggregate_aucs)
    result["secure_aggregation"] = secagg  # True: secure_aggregate measured on the run's real unmasked sums
    result["released_update"] = _summary(released_aucs)
    privacy = summary.get("privacy")
    result["privacy"] = None if not privacy else {k: privacy.get(k) for k in (
        "epsilon", "delta", "noise_multiplier", "clip_norm")}
    return result
