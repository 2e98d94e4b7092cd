"""The C node's decoders under libFuzzer with ASan and UBSan (tests/fuzz/run_c_fuzz.py), a few thousand inputs
per harness from the conformance transcripts and golden fixtures: no crash, no sanitizer report, no broken
promise of a header (each harness aborts on one). benchmarks/bench_fuzz.py runs 10^6 inputs per harness.

A harness whose C files are not in device_runtime/c yet is skipped and named. Without clang and libFuzzer's
runtime (Debian: clang, libclang-rt-14-dev) or a package index for Monocypher these tests skip on a user's
machine and fail in CI.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IN_CI, require_tool

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import run_c_fuzz  # noqa: E402

from fedtiny_device.monocypher_sources import SourceError  # noqa: E402

RUNS = 2000


def missing_part(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def libfuzzer(tmp_path_factory):
    """clang that links libFuzzer with the sanitizers (a probe program)."""
    require_tool("clang")
    folder = tmp_path_factory.mktemp("libfuzzer_probe")
    (folder / "probe.c").write_text("#include <stddef.h>\n#include <stdint.h>\n"
                                    "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) "
                                    "{ (void)d; (void)n; return 0; }\n")
    proc = subprocess.run(["clang", "-fsanitize=fuzzer,address,undefined", "-o", "probe", "probe.c"], cwd=folder,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        missing_part(f"clang cannot link libFuzzer (Debian: libclang-rt-14-dev): {proc.stderr.strip()[-300:]}")


@pytest.mark.parametrize("name", [h.name for h in run_c_fuzz.HARNESSES])
def test_libfuzzer_finds_nothing(libfuzzer, name, tmp_path):
    try:
        (result,) = run_c_fuzz.fuzz(RUNS, [name], out=tmp_path / "findings")
    except SourceError as err:
        missing_part(str(err))
    if result.skipped:
        pytest.skip(f"{name}: {result.skipped}")
    assert not result.findings, f"{result.findings}\n{result.log[-4000:]}"
    assert result.runs == RUNS and result.coverage > 0, result.log[-2000:]
