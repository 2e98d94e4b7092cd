"""Membership inference (simulations/attack.py): chance on a model that never saw the members, clearly above
chance on an update that overfit a few samples; and the run-folder reader on a small coordinator state."""

import json
import sqlite3

import numpy as np
import pytest
import torch

from fedtiny.compiler import compile_plan
from fedtiny.datafile import make_dataset
from fedtiny.interpreter import quantize_input
from fedtiny.planfile import save_plan
from fedtiny.protocol.device import TrainJob
from fedtiny.protocol.update import state_delta
from fedtiny.quantize import quantize
from fedtiny.scheme import parse
from fedtiny.zoo import MLP
from fedtiny_device.agent import LocalTraining
from fedtiny_server.requantize import dequantize_state, tensor_specs
from fedtiny_server.state import StateStore, StoredReply
from fedtiny_sim.attack import (
    AttackError, membership_auc, membership_auc_of, model_auc, nonmember_weights, update_auc,
)
from fedtiny_sim.scenarios import Task

FEATURES, CLASSES = 32, 3


@pytest.fixture(scope="module")
def plan():
    torch.manual_seed(0)
    model = MLP(FEATURES, CLASSES, hidden=(16,)).eval()
    with torch.no_grad():  # logits calibrated to a wider int8 range: confident enough to memorize a few samples
        model.classifier.weight.mul_(4.0)
    x = np.random.default_rng(0).normal(size=(64, FEATURES)).astype(np.float32)
    graph = quantize(model, x)
    return compile_plan(graph, parse("full", graph), lr=0.1)


def samples(plan, n, seed, groups=1):
    """n samples with random labels (nothing to generalize, everything to memorize), as (x_int8, y, cells)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, n)
    group = rng.integers(0, groups, n)
    return quantize_input(plan.graph, x), y, np.c_[group, y], x


def train(plan, members, epochs, seed=1):
    local = LocalTraining(plan, members[0], members[1], seed=seed)
    return local.run(TrainJob(round=1, model_version=0, epochs=epochs, steps=0, base=plan.initial_state())).state


def test_auc_is_chance_on_a_model_that_never_saw_the_members(plan):
    members, nonmembers = samples(plan, 150, 1)[:3], samples(plan, 150, 2)[:3]
    auc = model_auc(plan, plan.initial_state(), members, nonmembers)
    assert abs(auc - 0.5) < 0.12, auc  # the standard error of an AUC of 150 against 150 is about 0.033


def test_auc_is_high_on_an_update_that_overfit_few_samples(plan):
    members, nonmembers = samples(plan, 8, 1)[:3], samples(plan, 150, 2)[:3]
    after = train(plan, members, epochs=20)
    assert update_auc(plan, plan.initial_state(), after, members, nonmembers) > 0.9
    assert model_auc(plan, after, members, nonmembers) > 0.9  # the trained model alone gives them away too
    # the same update attacked on samples it never saw: chance again
    assert abs(update_auc(plan, plan.initial_state(), after, samples(plan, 150, 3)[:3], nonmembers) - 0.5) < 0.12


def test_nonmembers_are_reweighted_to_the_members_labels():
    # members all of label 1; a score that is just "label == 1" must not tell them apart from non-members
    member_cells = np.array([[0, 1]] * 10)
    nonmember_cells = np.array([[0, 0]] * 50 + [[0, 1]] * 5 + [[0, 2]] * 45)
    mw, nw = nonmember_weights(member_cells, nonmember_cells)
    scores_by_label = np.array([0.0, 1.0, 0.0])
    assert membership_auc_of(scores_by_label[member_cells[:, 1]], scores_by_label[nonmember_cells[:, 1]]) > 0.9
    assert membership_auc_of(scores_by_label[member_cells[:, 1]], scores_by_label[nonmember_cells[:, 1]],
                             mw, nw) == pytest.approx(0.5)
    # a cell without any non-member leaves its members out
    mw, _ = nonmember_weights(np.array([[0, 1], [3, 1]]), nonmember_cells)
    assert mw.tolist() == [1.0, 0.0]


def test_membership_auc_reads_a_run_folder(plan, tmp_path):
    """A coordinator state with two devices' round-1 replies: the overfit device's update is found, the secure
    aggregate and the released model are attacked per device, and the data is checked against the task."""
    devices = [samples(plan, 8, 10 + i) for i in range(2)]
    test = samples(plan, 200, 20)
    base = plan.initial_state()
    deltas = [state_delta(train(plan, d[:3], epochs=20, seed=i), base) for i, d in enumerate(devices)]
    specs = tensor_specs(plan)
    master = dequantize_state(specs, base)
    mean = {n: master[n] + sum(dequantize_state(specs, d)[n] for d in deltas) / 2 for n in specs}
    store = StateStore(tmp_path / "state.db")
    store.initialize(master, base)
    for i, delta in enumerate(deltas):
        store.accept_reply(StoredReply(1, f"node{i:03d}", 0, 8, {}, delta, 100))
    store.commit_round(1, 1, mean, {n: specs[n].requantize(mean[n]) for n in specs}, None, {})
    store.close()
    save_plan(plan, tmp_path / "plan.ftp")
    (tmp_path / "nodes").mkdir()
    for i, d in enumerate(devices):
        np.savez(tmp_path / "nodes" / f"node{i:03d}.npz", x=d[0], y=d[1], seed=i)
    (tmp_path / "metrics.json").write_text(json.dumps({"run": {"scenario": "synthetic", "nodes": 2, "seed": 0}}))

    def dataset(s):
        return make_dataset(s[3], s[1], s[2][:, 0], [str(c) for c in range(CLASSES)], "synthetic")

    task = Task("synthetic", "mlp", dataset(test), [dataset(d) for d in devices], dataset(test))
    with pytest.raises(AttackError, match="pass its task"):
        membership_auc(tmp_path)
    result = membership_auc(tmp_path, task)
    assert result["members"] == 16 and result["nonmembers"] == 200
    assert result["device_update"]["attacks"] == 2 and result["device_update"]["auc_min"] > 0.9
    assert result["secure_aggregate"]["attacks"] == 2 and result["released_update"]["attacks"] == 2
    # two devices' mean update still carries each one's members, less clearly than its own DELTA
    assert 0.5 < result["secure_aggregate"]["auc"] <= result["device_update"]["auc"] + 0.05
    assert abs(result["global_model"]["auc_before_round_1"] - 0.5) < 0.2
    assert result["privacy"] is None
    # a run under secure aggregation stores no individual DELTA; the coordinator attacks each round's unmasked sum,
    # which made the released version, for the round's survivors (here node001 only: node000 dropped)
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("DELETE FROM replies")
    hidden = membership_auc(tmp_path, task)
    assert hidden["device_update"]["attacks"] == 0 and hidden["secure_aggregate"]["attacks"] == 0
    assert hidden["released_update"] == result["released_update"] and not hidden["secure_aggregation"]
    (tmp_path / "metrics.json").write_text(json.dumps({"run": {"scenario": "synthetic", "nodes": 2, "seed": 0,
                                                               "secure_aggregation": True}}))
    (tmp_path / "coordinator.jsonl").write_text(json.dumps({"event": "secagg_round", "round": 1,
                                                            "survivors": ["node001"], "dropped": ["node000"]}) + "\n")
    masked = membership_auc(tmp_path, task)
    assert masked["secure_aggregation"] and masked["device_update"]["attacks"] == 0
    assert masked["secure_aggregate"] == masked["released_update"] and masked["secure_aggregate"]["attacks"] == 1
    assert masked["secure_aggregate"]["auc"] == pytest.approx(result["secure_aggregate"]["auc_max"]) or \
        masked["secure_aggregate"]["auc"] == pytest.approx(result["secure_aggregate"]["auc_min"])
    task.nodes[1] = dataset(samples(plan, 8, 99))
    with pytest.raises(AttackError, match="node001.npz does not hold"):
        membership_auc(tmp_path, task)
