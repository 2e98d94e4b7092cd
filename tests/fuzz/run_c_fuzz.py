"""Coverage-guided fuzzing of the C node's decoders with libFuzzer under AddressSanitizer and UBSan (host build).

    python tests/fuzz/run_c_fuzz.py [--runs N] [--only NAME ...] [--sources DIR ...] [--out DIR] [--seed S]

Each harness (tests/fuzz/fuzz_*.c) is built with clang -fsanitize=fuzzer,address,undefined (UBSan reports
abort: -fno-sanitize-recover=all) against copies of the C files it needs, in the cruntime build cache
($FEDTINY_CACHE, keyed by the sources' bytes), and run for -runs=N executions from a seed corpus of the
conformance transcripts' frames (tests/conformance/) and the golden protocol fixtures (tests/fixtures/protocol/):
chunk frames, the envelopes they reassemble to, and the bodies inside those. A finding (crash, sanitizer
report, a harness's abort on a broken promise, a leak) stops libFuzzer, which writes the input to
OUT/<harness>-crash-*; this script then exits 1.

Harnesses (what each drives; the C files it needs):
    envelope            fedtiny_env_open on one downlink envelope; fedtiny_envelope.c, Monocypher
    chunk               the reassembler on a frame sequence, each frame also parsed alone; fedtiny_chunk.c
    wire_task           TASK body decode and its settings; fedtiny_wire.c
    wire_ack            ACK body decode, and encode back; fedtiny_wire.c
    wire_global_update  GLOBAL_UPDATE check and apply on the conformance plan; fedtiny_wire.c, fedtiny_node.h,
                        codegen.node_plan_source
    node                the whole session's receive on a message sequence; fedtiny_node.c (with its noise and
                        secure-aggregation steps) and all the above
    node_unsigned       the same with every signature valid and decryption a copy (fuzz_crypto_stub.c; never
                        a node's build), so that mutations reach what only the coordinator's key unlocks

C files, transcripts and fixtures come from the checkout fedtiny_device is imported from (device_runtime/c,
tests/conformance, tests/fixtures/protocol), so the Python spec that makes the seeds and the C under test agree;
each --sources DIR adds or replaces C files from DIR (to fuzz a branch's files before they are merged). A
harness whose files are missing is skipped and named. Monocypher comes from the pinned PyPI sdist
(fedtiny_device.monocypher_sources). Needs clang and libFuzzer's runtime (Debian: clang, libclang-rt-14-dev).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedtiny.protocol import chunking
from fedtiny.protocol.envelope import HEADER_SIZE, SIGNATURE_SIZE, Flags, Header, Identity, derive_key, nonce
from fedtiny.protocol.messages import MessageType
from fedtiny_device import codegen, cruntime

HERE = Path(__file__).resolve().parent
ROOT = codegen.runtime_dir().parent.parent  # the checkout fedtiny_device is imported from: its C, its transcripts
CONFORMANCE = ROOT / "tests" / "conformance"
FIXTURES = ROOT / "tests" / "fixtures" / "protocol"
MAX_LEN = 16384  # bytes per input: the largest seed (a GLOBAL_UPDATE sequence of the conformance plan) fits
CFLAGS = ["-g", "-O1", "-std=c99", "-Wall", "-Wextra", "-Werror", "-fsanitize=fuzzer,address,undefined",
          "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
# Monocypher (vetted, not ours to fuzz) keeps ASan and UBSan, so a short buffer the node hands it is still
# found, but gets no coverage feedback and -O2: its arithmetic is most of a signature check's time.
VENDORED_CFLAGS = ["-g", "-O2", "-std=c99", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
VENDORED = {"monocypher.c"}

ENVELOPE = ["fedtiny_envelope.c", "fedtiny_envelope.h", "fedtiny_profile.h", "monocypher.c", "monocypher.h"]
CHUNK = ["fedtiny_chunk.c", "fedtiny_chunk.h"]
WIRE = ["fedtiny_wire.c", "fedtiny_wire.h"]
SECAGG_HEADERS = ["fedtiny_node_secagg.h", "fedtiny_secagg.h"]  # fedtiny_node.h includes them
NODE = ["fedtiny_node.c", "fedtiny_node.h", "fedtiny_noise.c", "fedtiny_noise.h", "fedtiny_secagg.c",
        "fedtiny_node_secagg.c"] + SECAGG_HEADERS


# The "unsigned" builds: the envelope's signature check and decryption replaced by fuzz_crypto_stub.c.
UNSIGNED = ["-Dcrypto_eddsa_check=fuzz_eddsa_check", "-Dcrypto_aead_read=fuzz_aead_read"]


@dataclass(frozen=True)
class Harness:
    name: str
    files: list[str]  # C files the harness is built with (the .c ones are compiled)
    plan: bool = False  # needs fuzz_plan.c (codegen.node_plan_source of the conformance plan)
    unsigned: bool = False  # every signature verifies, decryption copies: seeds carry plaintext
    source: str = ""  # the harness file is fuzz_<source>.c (default: fuzz_<name>.c)

    @property
    def harness_file(self) -> str:
        return f"fuzz_{self.source or self.name}.c"


HARNESSES = [
    Harness("envelope", ENVELOPE),
    Harness("chunk", CHUNK),
    Harness("wire_task", WIRE),
    Harness("wire_ack", WIRE),
    Harness("wire_global_update", WIRE + ["fedtiny_node.h", "fedtiny_chunk.h", "fedtiny_envelope.h",
                                             "fedtiny_profile.h"] + SECAGG_HEADERS, plan=True),
    Harness("node", ENVELOPE + CHUNK + WIRE + NODE, plan=True),
    Harness("node_unsigned", ENVELOPE + CHUNK + WIRE + NODE, plan=True, unsigned=True, source="node"),
]


@dataclass
class Result:
    name: str
    runs: int = 0
    seconds: float = 0.0
    corpus: int = 0  # seed inputs
    coverage: int = 0  # libFuzzer's "cov:" (edges) at the end
    findings: list[str] = field(default_factory=list)
    skipped: str = ""
    log: str = ""


# ---- seeds ------------------------------------------------------------------------------------------------

def records(frames: list[tuple[int, bytes]]) -> bytes:
    """Several frames as one input (tests/fuzz/fuzz_records.h): tag u8 | length u16 | bytes."""
    return b"".join(bytes([tag]) + len(data).to_bytes(2, "little") + data for tag, data in frames)


def conformance() -> tuple[dict, list[list[dict]]]:
    spec = json.loads((CONFORMANCE / "fleet.json").read_text())
    transcripts = [[json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                   for path in sorted(CONFORMANCE.glob("*.jsonl"))]
    return spec, transcripts


def topic_tag(topic: str, spec: dict) -> int:
    """fuzz_node.c's topic selector: 0 this node's down, 1 bcast, 2 its up topic, 3 anything else."""
    fleet, device = spec["fleet"], spec["device"]
    return {f"fedtiny/{fleet}/down/{device}": 0, f"fedtiny/{fleet}/bcast": 1,
            f"fedtiny/{fleet}/up/{device}": 2}.get(topic, 3)


def body_of(envelope: bytes, spec: dict) -> tuple[int, bytes] | None:
    """(message type, plaintext body) of a downlink envelope to the conformance node, or None."""
    try:
        header = Header.unpack(envelope)
    except Exception:
        return None
    payload = envelope[HEADER_SIZE:len(envelope) - SIGNATURE_SIZE]
    if header.flags & Flags.ENCRYPTED:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        device = Identity.from_seed(spec["device_seed"].encode())
        coordinator = Identity.from_seed(spec["coordinator_seed"].encode()).public
        key = derive_key(device, coordinator, spec["fleet_id"], header.device_id, 1)
        try:
            payload = ChaCha20Poly1305(key).decrypt(nonce(header.round, header.seq, 1, header.run), payload,
                                                    envelope[:HEADER_SIZE])
        except Exception:
            return None
    return header.type, payload


def unsigned_envelope(envelope: bytes, spec: dict) -> bytes:
    """What the unsigned builds read as this envelope: the plaintext where the ciphertext was (tag kept)."""
    header = Header.unpack(envelope)
    opened = body_of(envelope, spec)
    if opened is None or not header.flags & Flags.ENCRYPTED:
        return envelope
    tag, signature = envelope[-SIGNATURE_SIZE - 16:-SIGNATURE_SIZE], envelope[-SIGNATURE_SIZE:]
    return envelope[:HEADER_SIZE] + opened[1] + tag + signature


def seeds() -> dict[str, list[bytes]]:
    """Per harness, its seed inputs."""
    spec, transcripts = conformance()
    out: dict[str, list[bytes]] = {h.name: [] for h in HARNESSES}
    fixtures = {p.stem: p.read_bytes() for p in sorted(FIXTURES.glob("*.bin"))}
    bodies = {MessageType.TASK: "wire_task", MessageType.ACK: "wire_ack",
              MessageType.GLOBAL_UPDATE: "wire_global_update"}
    for transcript in transcripts:
        sequence, unsigned = [], []  # (tag, frame) of every downlink the node received, in order (fuzz_node.c)
        everything, downlinks = chunking.Reassembler(), chunking.Reassembler()
        clock = 0.0
        for step in transcript:
            frames = [(topic_tag(t, spec), bytes.fromhex(h)) for t, h, _ in step.get("out", [])]
            if step["op"] == "receive":
                topic, frame = topic_tag(step["topic"], spec), bytes.fromhex(step["frame"])
                tag = topic | min(63, round(step["now"] - clock)) << 2  # seconds since the last message
                clock = step["now"]
                frames.append((topic, frame))
                sequence.append((tag, frame))
                try:
                    done = downlinks.accept(frame, 0.0, str(topic)).payload
                except Exception:
                    unsigned.append((tag, frame))  # a refused frame stays as it is
                else:
                    if done is not None:
                        split = chunking.split(unsigned_envelope(done, spec), chunking.parse_chunk(frame).transfer_id,
                                               spec["chunk_size"])
                        unsigned += [(tag if i == 0 else topic, f) for i, f in enumerate(split)]
            for topic, frame in frames:
                out["chunk"].append(records([(topic & 1, frame)]))
                try:
                    done = everything.accept(frame, 0.0, str(topic)).payload
                except Exception:
                    continue
                if done is None:
                    continue
                out["envelope"].append(done)
                opened = body_of(done, spec)
                target = bodies.get(opened[0]) if opened else None
                if target == "wire_global_update":  # selector: held version other / the body's own
                    out[target] += [b"\x00" + opened[1], b"\x01" + opened[1]]
                elif target is not None:
                    out[target].append(opened[1])
        out["node"].append(records(sequence))
        out["node_unsigned"].append(records(unsigned))
        out["chunk"].append(records([(tag & 1, frame) for tag, frame in sequence]))
    # The golden fixtures are another fleet's: they exercise the parsing before the keys matter.
    out["envelope"] += [fixtures[n] for n in ("task", "global_update", "ack_down") if n in fixtures]
    if "chunks_256" in fixtures:  # frames of 256 bytes back to back
        data = fixtures["chunks_256"]
        out["chunk"].append(records([(0, data[i:i + 256]) for i in range(0, len(data), 256)]))
    for name in ("delta_blob", "delta_blob_zlib"):
        if name in fixtures:
            out["wire_global_update"] += [b"\x00" + (0xFFFFFFFF).to_bytes(4, "little") + fixtures[name],
                                          b"\x01" + (7).to_bytes(4, "little") + fixtures[name]]
    return {name: [s for s in dict.fromkeys(found) if len(s) <= MAX_LEN] for name, found in out.items()}


# ---- build ------------------------------------------------------------------------------------------------

def available_sources(extra: list[Path]) -> dict[str, bytes]:
    """C files by name: device_runtime/c, then each --sources folder over it; Monocypher from the pinned sdist."""
    from fedtiny_device.monocypher_sources import monocypher_sources

    files = {p.name: p.read_bytes() for p in codegen.runtime_dir().glob("*.[ch]")}
    for folder in extra:
        files.update({p.name: p.read_bytes() for p in Path(folder).glob("*.[ch]")})
    return files | monocypher_sources()


def keys_header(spec: dict) -> str:
    identity = Identity.from_seed(spec["device_seed"].encode()).to_bytes()
    coordinator = Identity.from_seed(spec["coordinator_seed"].encode()).public.to_bytes()

    def array(name: str, data: bytes) -> str:
        return f"static const uint8_t {name}[{len(data)}] = {{{', '.join(f'0x{b:02x}' for b in data)}}};\n"

    return ("/* Written by tests/fuzz/run_c_fuzz.py: the conformance fleet's node (tests/conformance/fleet.json). */\n"
            "#include <stdint.h>\n"
            f"#define FUZZ_FLEET \"{spec['fleet']}\"\n#define FUZZ_DEVICE \"{spec['device']}\"\n"
            f"#define FUZZ_FLEET_ID {spec['fleet_id']}u\n#define FUZZ_DEVICE_ID {spec['device_id']}u\n"
            + array("fuzz_identity", identity) + array("fuzz_coordinator_public", coordinator))


def plan_source() -> str:
    from fedtiny.planfile import load_plan

    return codegen.node_plan_source(load_plan(CONFORMANCE / "plan.ftp"), "fuzz_plan")


def build(harness: Harness, sources: dict[str, bytes]) -> Path:
    """The harness binary, built by make in the cruntime build cache (keyed by every source's bytes)."""
    files = {name: sources[name] for name in harness.files}
    files[harness.harness_file] = (HERE / harness.harness_file).read_bytes()
    files["fuzz_records.h"] = (HERE / "fuzz_records.h").read_bytes()
    files["fuzz_keys.h"] = keys_header(conformance()[0])
    units = [harness.harness_file] + [n for n in harness.files if n.endswith(".c")]
    if harness.plan:
        files["fuzz_plan.c"] = plan_source()
        units.append("fuzz_plan.c")
    if harness.unsigned:
        files["fuzz_crypto_stub.c"] = (HERE / "fuzz_crypto_stub.c").read_bytes()
        units.append("fuzz_crypto_stub.c")
    headers = " ".join(n for n in files if n.endswith(".h"))
    target = f"fuzz_{harness.name}"
    objects = [u.removesuffix(".c") + ".o" for u in units]
    rules = [f"{target}: {' '.join(objects)}", f"\tclang {' '.join(CFLAGS)} -o $@ $^"]
    for unit, obj in zip(units, objects):
        flags = VENDORED_CFLAGS if unit in VENDORED else CFLAGS + ["-I."]
        if harness.unsigned and unit in ("fedtiny_envelope.c", "fuzz_crypto_stub.c"):
            flags = flags + UNSIGNED
        rules += [f"{obj}: {unit} {headers}", f"\tclang {' '.join(flags)} -c -o $@ $<"]
    files["Makefile"] = "\n".join(rules) + "\n"
    try:
        return cruntime.make_cached(files, target, target, None)
    except cruntime.BuildError as err:
        raise RuntimeError(f"building {target} failed: {err}") from None


def missing(harness: Harness, sources: dict[str, bytes]) -> str:
    absent = [n for n in harness.files if n not in sources]
    if absent:
        return "missing " + ", ".join(absent)
    if harness.plan and not hasattr(codegen, "node_plan_source"):
        return "missing codegen.node_plan_source"
    return ""


# ---- run --------------------------------------------------------------------------------------------------

def run(harness: Harness, binary: Path, corpus: list[bytes], runs: int, out: Path, seed: int, work: Path) -> Result:
    result = Result(harness.name, corpus=len(corpus))
    work.mkdir()
    for i, data in enumerate(corpus):
        (work / f"seed-{i:04d}").write_bytes(data)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"{harness.name}-"
    start = time.monotonic()
    proc = subprocess.run([str(binary), f"-runs={runs}", f"-max_len={MAX_LEN}", f"-seed={seed}",
                           "-print_final_stats=1", f"-artifact_prefix={prefix}", str(work)],
                          capture_output=True, text=True)
    result.seconds = time.monotonic() - start
    result.log = proc.stderr
    done = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
    result.runs = int(done.group(1)) if done else 0
    cov = re.findall(r"cov: (\d+)", proc.stderr)
    result.coverage = int(cov[-1]) if cov else 0
    result.findings = sorted(str(p) for p in out.glob(f"{harness.name}-*"))
    if proc.returncode != 0 and not result.findings:
        result.findings = [f"exit {proc.returncode} without an artifact: {proc.stderr[-2000:]}"]
    return result


def fuzz(runs: int, only: list[str] | None = None, extra_sources: list[Path] = (), out: Path | None = None,
         seed: int = 1) -> list[Result]:
    """Build and run every harness (or those named), each for `runs` executions."""
    sources = available_sources(list(extra_sources))
    corpora = seeds()
    out = out or Path(tempfile.mkdtemp(prefix="fedtiny-c-fuzz-"))
    results = []
    with tempfile.TemporaryDirectory(prefix="fedtiny-c-fuzz-corpus-") as tmp:
        for harness in HARNESSES:
            if only and harness.name not in only:
                continue
            reason = missing(harness, sources)
            if reason:
                results.append(Result(harness.name, skipped=reason))
                continue
            binary = build(harness, sources)
            results.append(run(harness, binary, corpora[harness.name], runs, out, seed, Path(tmp) / harness.name))
    return results


def clang_version() -> str:
    out = subprocess.run(["clang", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"clang version (\S+)", out)
    return m.group(1) if m else "unknown"


def table(results: list[Result]) -> str:
    lines = ["| harness | executions | seconds | executions/s | seeds | edges | findings |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.name} | skipped: {r.skipped} | | | | | |")
            continue
        rate = r.runs / r.seconds if r.seconds else 0.0
        lines.append(f"| {r.name} | {r.runs:,} | {r.seconds:.1f} | {rate:,.0f} | {r.corpus} | {r.coverage:,} | "
                     f"{', '.join(r.findings) or 'none'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="executions per harness")
    parser.add_argument("--only", nargs="*", help="harness names (default: all)")
    parser.add_argument("--sources", type=Path, action="append", default=[],
                        help="a folder of C files that add to or replace device_runtime/c's (repeatable)")
    parser.add_argument("--out", type=Path, help="where findings go (default: a new temporary folder)")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    args = parser.parse_args()
    if shutil.which("clang") is None:
        sys.exit("run_c_fuzz: clang is not installed (Debian: apt-get install clang libclang-rt-14-dev)")
    try:
        results = fuzz(args.runs, args.only, args.sources, args.out, args.seed)
    except RuntimeError as err:
        sys.exit(f"run_c_fuzz: {err}")
    print(table(results))
    sys.exit(1 if any(r.findings for r in results) else 0)


if __name__ == "__main__":
    main()
