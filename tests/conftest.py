"""Shared test helpers: system parts and optional extras that must exist in CI, and the independent ONNX Runtime
check."""

import importlib.util
import os
import shutil

import numpy as np
import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """The path of a system tool; skip without it on a user's machine, fail in CI where it must be installed."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed, and CI must have it (see .ci/run)")
        pytest.skip(f"{name} is not installed")
    return path


def require_module(name: str, extra: str) -> None:
    """Skip without an optional Python package on a user's machine; fail in CI, whose `.[dev]` installs `extra`."""
    if importlib.util.find_spec(name) is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed, and CI must have it (the `{extra}` extra, part of `dev`)")
        pytest.skip(f"{name} is not installed (pip install -e '.[{extra}]')")


@pytest.fixture(scope="session")
def flwr_cli(tmp_path_factory):
    """The python of an environment where the `flwr` command runs (tests/flower_deploy.py): skip when it cannot
    be made on a user's machine (no package index), fail in CI."""
    from flower_deploy import cli_environment

    try:
        return cli_environment(tmp_path_factory.mktemp("flwr-cli"))
    except RuntimeError as err:
        if IN_CI:
            pytest.fail(str(err))
        pytest.skip(str(err))


def onnxruntime_agreement(graph, x_int8) -> dict[str, tuple[float, int]]:
    """Per op: (fraction of int8 outputs identical to onnxruntime's, largest difference in LSB).

    Each op is exported alone and fed exactly the inputs our interpreter gave it, so a difference is a
    kernel difference, not one inherited from an earlier layer.
    """
    pytest.importorskip("onnxruntime")
    from fedtiny.onnx_export import run_onnxruntime, single_op_graph
    from fedtiny.interpreter import run

    values = run(graph, x_int8, keep=True)
    result = {}
    for op in graph.ops:
        if op.kind == "reshape":
            continue  # moves no values
        sub = single_op_graph(graph, op)
        theirs = run_onnxruntime(sub, {n: values[n] for n in sub.inputs}).astype(np.int64)
        diff = np.abs(values[op.outputs[0]].astype(np.int64) - theirs)
        if op.kind == "avgpool2d":
            # onnxruntime averages in float32, so an exact tie (a mean of x.5) lands on either side at random;
            # ours rounds ties to even. Compare where the exact mean is not a tie, and require that to be exact.
            diff = diff[~_avgpool_ties(graph, op, values[op.inputs[0]])]
        result[f"{op.kind} {op.outputs[0]} ({op.origin})"] = (float((diff == 0).mean()), int(diff.max()))
    return result


def _avgpool_ties(graph, op, x):
    from fedtiny.kernels import _windows

    zp = graph.tensors[op.inputs[0]].zero_point
    a = op.attrs
    sums = _windows(x.astype(np.int64) - zp, a["kernel"], a["stride"], a["padding"], 0).sum(axis=(3, 4))
    counts = _windows(np.ones((1,) + x.shape[1:3] + (1,), np.int64), a["kernel"], a["stride"], a["padding"], 0)
    counts = counts.sum(axis=(3, 4))
    return 2 * (sums % counts) == counts


def assert_agrees_with_onnxruntime(graph, x_int8, min_identical=0.99, max_lsb=1):
    bad = {k: v for k, v in onnxruntime_agreement(graph, x_int8).items() if v[0] < min_identical or v[1] > max_lsb}
    assert not bad, f"ops disagreeing with onnxruntime (identical fraction, max LSB): {bad}"
