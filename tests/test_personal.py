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
