"""`fedtiny profile PLAN`: instructions of a training step on the Cortex-M4 under QEMU, by step kind and layer.

- the whole step's count is the training firmware's own count of the same step (same plan, samples, seed), up to
  the handful of instructions main spends between the marker and the call;
- the per-op counts add up to the whole step, plus at most the per-call overhead of invoking ops one by one;
- the printed report names every step kind and layer, instructions per MAC and the time at --clock;
- without qemu or the arm toolchain: one line and exit code 2.
"""

import shutil

import pytest
from click.testing import CliRunner

from fedtiny.cli import main
from fedtiny.compiler import compile_plan
from fedtiny.planfile import save_plan
from fedtiny.scheme import parse
from fedtiny_device import codegen, cruntime
from fedtiny_device.profile import profile

from test_ctrainer import make_case
from test_cruntime import need

INVOKE_OVERHEAD = 120  # instructions a single-op fedtiny_invoke adds (graph check of one op, dispatch), at most


@pytest.fixture(scope="module")
def plan():
    graph, _, _ = make_case("mobilenet")
    return compile_plan(graph, parse("sparse:4:-3@1/4", graph))


def test_profile_counts_add_up_to_the_training_firmware_step(plan, cache):
    need("arm-none-eabi-gcc", "qemu-system-arm", "make")
    result = profile(plan, steps=2, cache_dir=cache)
    train = cruntime.run_counted(cruntime.build_train_firmware(plan, steps=2, cache_dir=cache), cache_dir=cache)
    # the same step; only main's few instructions between the marker and the call differ
    assert abs(result.per_step - sum(train.each) / 2) <= 16
    assert result.per_step <= sum(result.per_op) <= result.per_step + INVOKE_OVERHEAD * len(plan.steps)
    assert sum(result.macs) == codegen.count_train_macs(plan)["total"]
    assert all(count > 0 for count in result.per_op)


def test_profile_command_prints_kinds_layers_and_time(plan, tmp_path):
    need("arm-none-eabi-gcc", "qemu-system-arm", "make")
    save_plan(plan, tmp_path / "p.ftp")
    out = CliRunner().invoke(main, ["profile", str(tmp_path / "p.ftp"), "--clock", "100"])
    assert out.exit_code == 0, out.output
    for text in ("whole step:", "instructions per MAC", "at 100 MHz", "by step kind:", "forward", "input gradients",
                 "weight updates", "bias updates", "by layer", "op  0 conv2d", "ms @100"):
        assert text in out.output, text


def test_profile_without_qemu_is_one_line_and_exit_2(plan, tmp_path, monkeypatch):
    save_plan(plan, tmp_path / "p.ftp")
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "qemu-system-arm" else real(tool))
    out = CliRunner().invoke(main, ["profile", str(tmp_path / "p.ftp")])
    assert out.exit_code == 2
    assert out.output.strip().splitlines() == ["Error: fedtiny profile needs qemu-system-arm (apt-get install "
                                               "gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm make)"]
    bad = CliRunner().invoke(main, ["profile", str(tmp_path / "p.ftp"), "--clock", "0"])
    assert bad.exit_code == 2 and "--clock 0: must be a positive number of MHz" in bad.output


def test_every_step_kind_has_a_named_group():
    from fedtiny.planfile import STEP_KINDS
    from fedtiny_device.profile import STEP_GROUPS

    assert set(STEP_KINDS) <= set(STEP_GROUPS), set(STEP_KINDS) - set(STEP_GROUPS)
