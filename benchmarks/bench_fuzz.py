"""The C node's decoders fuzzed on the host build: libFuzzer under AddressSanitizer and UBSan, 10^6 executions
per harness (the issue's bar), from the conformance transcripts' frames and the golden protocol fixtures.

Each harness is one of tests/fuzz/run_c_fuzz.py's (envelope open, chunk reassembly, TASK / ACK decode,
GLOBAL_UPDATE check and apply, the session's whole receive path); a harness whose C files are not in
device_runtime/c is listed as skipped. A finding is a crash, a sanitizer report or a harness's abort on a broken
promise of a header; its input is written to the findings folder printed below the table.

    python benchmarks/bench_fuzz.py [--runs N] [--sources DIR ...] [--no-write]
Prints Markdown and writes it into BENCHMARKS.md (unless --no-write); exits 1 if anything was found.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fuzz"))
import run_c_fuzz  # noqa: E402

from fedtiny_device.monocypher_sources import SourceError  # noqa: E402

from report import capture, provenance, write_section  # noqa: E402

SECTION = "## Fuzzing the C node's decoders: libFuzzer, ASan + UBSan (issue 12)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="executions per harness")
    parser.add_argument("--sources", type=Path, action="append", default=[],
                        help="a folder of C files that add to or replace device_runtime/c's (repeatable)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args()
    findings = Path(tempfile.mkdtemp(prefix="bench_fuzz_findings_"))
    with capture() as out:
        try:
            results = run_c_fuzz.fuzz(args.runs, extra_sources=args.sources, out=findings)
        except (SourceError, RuntimeError) as err:
            sys.exit(f"bench_fuzz: {err}")
        print(provenance(f"python benchmarks/bench_fuzz.py --runs {args.runs}") + "\n")
        print(run_c_fuzz.table(results))
        print(f"\nclang {run_c_fuzz.clang_version()}, {' '.join(run_c_fuzz.CFLAGS)} (Monocypher: "
              f"{' '.join(run_c_fuzz.VENDORED_CFLAGS)}, no coverage feedback); one process per harness, -seed=1. "
              "Edges: libFuzzer's final `cov:`. Findings go to " + str(findings) + ".")
    if not args.no_write:
        write_section(SECTION, f"{SECTION}\n\n{out.getvalue()}")
    sys.exit(1 if any(r.findings for r in results) else 0)


if __name__ == "__main__":
    main()
