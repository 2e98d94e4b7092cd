"""simulations/personal.py's fleet numbers: the mean and worst tenth over the devices that report one; the
personalised model's copy in the plan's memory report, where the budget holds it."""

import dataclasses

import pytest

from fedtiny.device_memory import describe
from fedtiny.protocol.device import keeps_personal_model

from fedtiny_sim.personal import fleet_summary, local_steps


def test_worst_tenth_is_the_mean_of_the_lowest_tenth_and_devices_without_a_heldout_part_are_left_out():
    values = [0.5, 0.9, None, 1.0, 0.8, 0.7, 0.95, 0.6, 0.85, 0.75, 0.65, 0.55, None]
    s = fleet_summary(values)
    assert s["devices"] == 11
    assert s["mean"] == pytest.approx(sum(v for v in values if v is not None) / 11)
    assert s["worst_tenth"] == pytest.approx((0.5 + 0.55) / 2)  # ceil(1.1) = 2 devices
    assert fleet_summary([0.4])["worst_tenth"] == 0.4  # at least one device
    assert fleet_summary([None, None]) == dict(mean=None, worst_tenth=None, devices=0)
    assert fleet_summary([]) == dict(mean=None, worst_tenth=None, devices=0)


def test_a_rounds_local_steps_leave_the_heldout_part_out():
    assert local_steps({"local_steps": 0, "epochs": 2}, 50) == 2 * 40
    assert local_steps({"local_steps": 0, "epochs": 1}, 9) == 9  # too few samples: nothing held out
    assert local_steps({"local_steps": 7, "epochs": 3}, 50) == 7


def test_the_memory_report_counts_the_copy_where_the_budget_holds_it(mlp_last2_plan):
    report = mlp_last2_plan.memory_report()
    state_bytes = sum(-(-mlp_last2_plan.buffers[b].nbytes // 4) * 4 for b in mlp_last2_plan.trainable_buffers())
    assert report["personal_model_bytes"] == state_bytes > 0
    ram = report["device_ram_bytes"]
    tight = dataclasses.replace(mlp_last2_plan, budget=ram + state_bytes - 1 + 1024, reserve=1024)
    assert tight.memory_report()["device_ram_bytes"] == ram  # the same step: only the copy no longer fits
    assert tight.memory_report()["personal_model_bytes"] == 0 and not keeps_personal_model(tight)
    assert any("no personalised model" in line for line in describe(tight))
    roomy = dataclasses.replace(mlp_last2_plan, budget=ram + state_bytes + 1024, reserve=1024)
    assert roomy.memory_report()["personal_model_bytes"] == state_bytes and keeps_personal_model(roomy)
    assert any(f"personalised model kept between rounds: {state_bytes:,} B" in line for line in describe(roomy))


def test_alone_trains_round_by_round_from_the_pretrained_model_and_scores_each_round(mlp_last2_plan, tmp_path):
    """train_alone's curve: one entry per round (the device's round trained from where its previous one ended, with
    the run's epochs), None for a node too small to hold samples out; a round's figure is the trained model's on
    the node's held-out part, so it differs from the untrained model's where the lr moves the weights."""
    import numpy as np

    from fedtiny.interpreter import quantize_input
    from fedtiny.planfile import save_plan
    from fedtiny.protocol.device import TrainJob
    from fedtiny_device.agent import LocalTraining

    from fedtiny_sim.personal import round_summaries, train_alone

    plan = dataclasses.replace(mlp_last2_plan)
    save_plan(plan, tmp_path / "plan.ftp")
    (tmp_path / "nodes").mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("node000", 15), ("node001", 6)):
        x = quantize_input(plan.graph, rng.normal(size=(n, 6)).astype(np.float32))
        np.savez(tmp_path / "nodes" / f"{name}.npz", x=x, y=rng.integers(0, 3, n), seed=7 + n)
    config = dict(rounds=2, epochs=1, local_steps=0, trainer="python", workers=1)
    curves = train_alone(tmp_path, config)
    assert curves["node001"] == [None, None]  # 6 samples: nothing held out
    assert len(curves["node000"]) == 2 and all(0.0 <= a <= 1.0 for a in curves["node000"])
    # the same rounds by hand: round r from round r-1's state
    samples = np.load(tmp_path / "nodes" / "node000.npz")
    training = LocalTraining(plan, samples["x"], samples["y"], int(samples["seed"]))
    state, expected = plan.initial_state(), []
    for r in (1, 2):
        result = training.run(TrainJob(r, 0, 1, 0, state))
        state = result.state
        expected.append(result.personal_accuracy)
    assert curves["node000"] == expected
    assert not all(np.array_equal(state[k], plan.initial_state()[k]) for k in state)  # it did train
    assert [s["devices"] for s in round_summaries(curves)] == [1, 1]


def test_federation_gains_are_personalised_minus_alone_and_minus_global_after_the_last_round():
    from fedtiny_sim.report_data import federation_gains, federation_rows

    devices = {"a": dict(heldout_before=0.5), "b": dict(heldout_before=0.7)}
    rounds = [dict(round=1, global_heldout=0.6, global_heldout_worst_tenth=0.5, personal_accuracy=0.8,
                   personal_worst_tenth=0.7, alone_accuracy=0.75, alone_worst_tenth=0.55),
              dict(round=2, global_heldout=0.65, global_heldout_worst_tenth=0.5, personal_accuracy=0.9,
                   personal_worst_tenth=0.8, alone_accuracy=0.7, alone_worst_tenth=0.6)]
    rows = federation_rows(devices, rounds)
    assert [r[0] for r in rows] == [0, 1, 2]
    assert rows[0][1] == rows[0][2] == rows[0][3] and rows[0][1]["mean"] == pytest.approx(0.6)  # all start there
    gains = dict(federation_gains(rows))
    assert gains["gain from federation (personalised - alone)"] == pytest.approx(dict(mean=0.2, worst_tenth=0.2))
    assert gains["gain from personalisation (personalised - global)"] == pytest.approx(dict(mean=0.25,
                                                                                         worst_tenth=0.3))
    assert federation_rows(devices, [dict(round=1, accuracy=0.5)]) == []  # nothing measured on the devices' parts
