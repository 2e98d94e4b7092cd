"""The node's crypto on a Cortex-M4: executed instructions per operation, peak stack, flash and RAM.

The crypto firmware (device_runtime/c/firmware_crypto.c: the node's envelope on Monocypher 4.0.3 from the pinned
PyPI sdist, arm-none-eabi-gcc -O2) runs each operation once between the instruction-count markers under QEMU
(mps2-an386, our TCG plugin, exact counts): deriving the node's keys, X25519, EdDSA sign and verify of a 32-byte
message, sealing a 1 KiB DELTA body (encrypt + sign) and opening a 1 KiB GLOBAL_UPDATE the Python coordinator
sealed (verify + decrypt). The host checks both results (the coordinator opens the M4's DELTA, the M4's
plaintext digest matches). Flash: the kept sections of fedtiny_envelope.o and monocypher.o in the linker map;
the whole firmware from `arm-none-eabi-size`.

    python benchmarks/bench_node_crypto.py [--no-write]
Prints Markdown and writes it into BENCHMARKS.md.
"""

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

from fedtiny_device import cenvelope, cruntime
from fedtiny_device.cruntime import fnv1a
from fedtiny_device.monocypher_sources import SourceError

from report import capture, provenance, write_section

SECTION = "## Node crypto: the envelope on a Cortex-M4 (QEMU), Monocypher 4.0.3 (issue 12)"
CLOCK_HZ = 64e6
LABELS = {
    "keys": "node keys at start-up (EdDSA key pair + X25519 + 2 key derivations)",
    "x25519": "X25519 (crypto_x25519)",
    "sign": "EdDSA-BLAKE2b sign, 32 B (crypto_eddsa_sign)",
    "verify": "EdDSA-BLAKE2b verify, 32 B (crypto_eddsa_check)",
    "seal": "seal a 1 KiB DELTA (ChaCha20-Poly1305 + sign)",
    "open": "open a 1 KiB GLOBAL_UPDATE (verify + ChaCha20-Poly1305)",
}


def measure(cache: Path) -> dict:
    case = cenvelope.crypto_case(1024)
    elf = cenvelope.build_crypto_firmware(case.vectors, cache)
    run = cenvelope.run_crypto_firmware(elf, cache_dir=cache)
    body = case.downlink_body.encode()
    sealed_by_python = case.device.seal(case.uplink_body, round=case.round, model_version=0, seq=case.seq,
                                        run=case.run)
    if run.returncode != 0 or run.uplink != sealed_by_python or case.coordinator.open(run.uplink) is None \
            or (run.downlink_status, run.downlink_body_len, run.downlink_fnv) != ("ok", len(body), fnv1a(body)):
        sys.exit(f"bench_node_crypto: the M4 results do not match the Python envelope (returncode {run.returncode})")
    map_path = elf.parent / cenvelope.CRYPTO_MAP
    return dict(run=run, usage=cruntime.memory_usage(elf),
                crypto=cenvelope.crypto_footprint(map_path),
                envelope=cenvelope.crypto_footprint(map_path, ("fedtiny_envelope.m4.o",)),
                monocypher=cenvelope.crypto_footprint(map_path, ("monocypher.m4.o",)),
                uplink_bytes=len(run.uplink), downlink_bytes=len(case.downlink),
                vector_bytes=64 + 64 + len(case.uplink_body.encode()) + len(case.downlink))


def report(m: dict) -> str:
    run = m["run"]
    lines = ["| operation | M4 instructions | ms @ 64 MHz, 1 insn/cycle | peak stack B |", "|---|---:|---:|---:|"]
    for op, label in LABELS.items():
        insns = run.instructions[op]
        lines.append(f"| {label} | {insns:,} | {1e3 * insns / CLOCK_HZ:.1f} | {run.stack[op]:,} |")
    usage = m["usage"]
    node_bytes, replay_bytes = ctypes.sizeof(cenvelope.Node), ctypes.sizeof(cenvelope.Replay)
    lines += [
        "",
        f"- Flash of the crypto (kept sections in the linker map, -O2, --gc-sections): {m['crypto']['flash']:,} B "
        f"(Monocypher {m['monocypher']['flash']:,} B, fedtiny_envelope.c {m['envelope']['flash']:,} B); static RAM "
        f"of its own {m['crypto']['ram']} B. The node keeps its keys ({node_bytes} B, fedtiny_env_node) and the "
        f"downlink replay window ({replay_bytes} B, fedtiny_env_replay) where it likes; the largest peak stack is "
        f"{max(run.stack.values()):,} B.",
        f"- Whole benchmark firmware (arm-none-eabi-size): flash {usage['flash']:,} B, RAM {usage['ram']:,} B "
        f"(.data + .bss {usage['.data'] + usage['.bss']:,} B: two envelope buffers for bodies up to 2 KiB, the keys, "
        f"the replay window; heap {usage['.heap']:,} B, stack {usage['.stack']:,} B). Besides the crypto, its flash "
        f"holds the test vectors ({m['vector_bytes']:,} B), newlib-nano printf and semihosting.",
        f"- Envelopes: the sealed DELTA is {m['uplink_bytes']:,} B, the GLOBAL_UPDATE {m['downlink_bytes']:,} B "
        "(1,024 B body + 32 B header + 16 B tag + 64 B signature). The Python coordinator opened the M4's DELTA, "
        "which is byte-identical to what the Python envelope seals for the same keys, nonce and body; the M4's "
        "decrypted GLOBAL_UPDATE matched the plaintext.",
        "- Executed instructions (QEMU 7.2 mps2-an386, our TCG plugin between the markers around each operation), "
        "not cycles: a real M4 needs roughly 1.1-1.5x more plus flash wait states. Peak stack: the firmware paints "
        "the stack before each operation and finds the deepest byte it touched.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args()
    with capture() as out:
        try:
            m = measure(Path(tempfile.mkdtemp(prefix="bench_node_crypto_")))
        except (SourceError, cruntime.BuildError) as err:
            sys.exit(f"bench_node_crypto: {err}")
        print(provenance("python benchmarks/bench_node_crypto.py") + "\n")
        print(report(m))
    if not args.no_write:
        write_section(SECTION, f"{SECTION}\n\n{out.getvalue()}")


if __name__ == "__main__":
    main()
