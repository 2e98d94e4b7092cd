"""Monocypher's C sources for the node, fetched from PyPI at build time, checked by hash, never committed.

Monocypher 4.0.3 (BSD-2-Clause or CC0-1.0, https://monocypher.org) ships as monocypher.c / monocypher.h inside the
source distribution of its Python binding, pymonocypher. The host signs and verifies through the wheel of the same
pymonocypher version (pyproject.toml pins it), so both ends run one library. The sdist does not hold the optional
monocypher-ed25519.c (SHA-512, Ed25519); protocol v2 does not need it (docs/protocol.md, "Why version 2").

    python -m fedtiny_device.monocypher_sources DIR    # writes DIR/monocypher.c, DIR/monocypher.h (the Makefile)

`pip download` fetches the sdist (pip itself checks the pinned SHA-256 before it runs anything from it) into
$FEDTINY_CACHE/sources (default ~/.cache/fedtiny/sources); the hash is checked again on every use of the cached
file. Without a reachable index, or with another hash, it fails with one line (SourceError).
"""

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PYMONOCYPHER_VERSION = "4.0.3.2"  # Monocypher 4.0.3; the same pin as pyproject.toml's pymonocypher
SDIST = f"pymonocypher-{PYMONOCYPHER_VERSION}.tar.gz"
SDIST_SHA256 = "02e9e5d7cd249742d23f90d1d396d5d5748d71bd157185f24c80b137cdaa8874"
FILES = ("monocypher.c", "monocypher.h")


class SourceError(RuntimeError):
    """The sources could not be fetched or did not match the pinned hash (one line, for the user)."""


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTINY_CACHE", Path.home() / ".cache" / "fedtiny")) / "sources"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sdist(cache: Path | None = None) -> Path:
    """The verified pymonocypher sdist in the cache, downloaded with pip if it is not there yet."""
    folder = cache or cache_dir()
    path = folder / SDIST
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            requirement = Path(tmp) / "requirements.txt"
            requirement.write_text(f"pymonocypher=={PYMONOCYPHER_VERSION} --hash=sha256:{SDIST_SHA256}\n")
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--require-hashes",
                 "--disable-pip-version-check", "-r", str(requirement), "-d", tmp],
                capture_output=True, text=True,
            )
            fetched = Path(tmp) / SDIST
            if proc.returncode != 0 or not fetched.exists():
                lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
                errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["no output"]
                raise SourceError(f"cannot fetch {SDIST} from the package index with pip: {errors[0]}")
            os.replace(fetched, path)
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        raise SourceError(f"{path} has SHA-256 {digest}, not the pinned {SDIST_SHA256}; delete it to fetch again")
    return path


def monocypher_sources(cache: Path | None = None) -> dict[str, bytes]:
    """monocypher.c and monocypher.h, by name, from the verified sdist."""
    with tarfile.open(sdist(cache), "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers()
                   if m.isfile() and Path(m.name).parent.name == f"pymonocypher-{PYMONOCYPHER_VERSION}"}
        missing = [name for name in FILES if name not in members]
        if missing:
            raise SourceError(f"{SDIST} holds no {', '.join(missing)}")
        return {name: tar.extractfile(members[name]).read() for name in FILES}


def write_sources(out_dir: Path, cache: Path | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in monocypher_sources(cache).items():
        (out_dir / name).write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedtiny_device.monocypher_sources DIR", file=sys.stderr)
        return 2
    try:
        write_sources(Path(args[0]))
    except SourceError as err:
        print(f"fedtiny: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
