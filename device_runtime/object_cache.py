"""Compiled objects shared between builds, by content (node_project.build's firmware objects).

A node's firmware compiles about thirty sources, and most of its compile time goes to sources that are the same
for every device of a fleet and every fleet of a plan: Monocypher, the kernels, the runtime, the session. Only
node_config.c (the device's identity) and samples.c (its data) are the device's own. So each object is kept under
a key of everything that goes into it, and a build of another device (or another run) copies the objects it finds
beside its sources, newer than they are, so that make links them as they are and compiles only the rest.

The key of `<stem><suffix>` (e.g. monocypher.fw.o, made from monocypher.c by the Makefile's pattern rule):
- the object's name (the suffix selects the Makefile rule, hence the flags),
- the Makefile's bytes (every flag and rule),
- the compiler's identity (its resolved path and `--version`),
- the source's bytes and those of every header it includes with `#include "..."`, transitively, by name (a name
  absent from the folder counts as absent, so adding it changes the key).
System headers (`#include <...>`) come with the compiler and are covered by its identity.

The cache lives in $FEDTINY_CACHE (default ~/.cache/fedtiny)/cruntime/objects/<key>/<object>. Sources that hold a
device's secret or data (`private`) are never cached there. As the builds beside it, the CACHE_OBJECTS most
recently used objects are kept (fedtiny.lru): a hit marks its object used, and a store evicts the rest.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from fedtiny import lru

CACHE_OBJECTS = 1000  # objects kept (10-200 KB each): a node firmware has about thirty, most shared by every build
_INCLUDE = re.compile(rb'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.M)


def objects_dir() -> Path:
    from .cruntime import cache_root

    return cache_root() / "objects"


@functools.cache
def compiler_identity(compiler: str) -> bytes:
    """The compiler's resolved path and `--version` output; empty when it is not installed (then nothing is cached
    and make reports the missing compiler)."""
    path = shutil.which(compiler)
    if path is None:
        return b""
    version = subprocess.run([path, "--version"], capture_output=True).stdout
    return os.path.realpath(path).encode() + b"\0" + version


def _bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


def included(files: dict[str, str | bytes], source: str) -> list[str]:
    """The names `source` includes with `#include "..."`, transitively, in first-seen order (without itself)."""
    seen: dict[str, None] = {}
    todo = [source]
    while todo:
        name = todo.pop()
        if name not in files:
            continue
        for match in _INCLUDE.finditer(_bytes(files[name])):
            header = match.group(1).decode()
            if header not in seen and header != source:
                seen[header] = None
                todo.append(header)
    return list(seen)


def object_key(files: dict[str, str | bytes], source: str, suffix: str, compiler: str) -> str | None:
    """The cache key of the object `suffix` makes from `source` (see the module's docstring), or None when it
    cannot be keyed (no Makefile or no compiler)."""
    identity = compiler_identity(compiler)
    if "Makefile" not in files or not identity:
        return None
    h = hashlib.sha256()

    def part(label: str, data: bytes) -> None:
        h.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    part("object", (Path(source).stem + suffix).encode())
    part("compiler", identity)
    part("Makefile", _bytes(files["Makefile"]))
    part(source, _bytes(files[source]))
    for header in sorted(included(files, source)):
        part(header, _bytes(files[header]) if header in files else b"\0absent")
    return h.hexdigest()


def cached_objects(files: dict[str, str | bytes], suffix: str, compiler: str, private: frozenset[str] = frozenset(),
                   cache: Path | None = None) -> tuple[dict[str, Path], dict[str, Path]]:
    """For every C source in `files` but the private ones, by object name: (objects found in the cache,
    cache paths where the missing objects belong)."""
    cache = cache or objects_dir()
    found, missing = {}, {}
    for source in sorted(files):
        if not source.endswith(".c") or source in private:
            continue
        key = object_key(files, source, suffix, compiler)
        if key is None:
            continue
        name = Path(source).stem + suffix
        path = cache / key[:32] / name  # under its own name: make_cached's `prebuilt` copies it by name
        if path.exists():
            lru.used(path)
            found[name] = path
        else:
            missing[name] = path
    return found, missing


def make_cached(files: dict[str, str | bytes], target: str, artifact: str, cache_dir: Path | None, *, suffix: str,
                compiler: str, private: frozenset[str] = frozenset()) -> Path:
    """cruntime.make_cached with the objects `suffix` (the target's pattern rule, compiled by `compiler`) taken
    from the object cache where it has them, and the ones make built put there."""
    from . import cruntime

    found, missing = cached_objects(files, suffix, compiler, private)
    built = cruntime.make_cached(files, target, artifact, cache_dir, prebuilt=tuple(found.values()))
    store(built.parent, missing)
    return built


def store(built_dir: Path, missing: dict[str, Path]) -> int:
    """Copy the objects make built in built_dir into the cache (atomically: another process may store the same
    key at once); objects make did not build (not part of the target) are skipped. Returns how many it stored."""
    stored = 0
    for name, path in missing.items():
        built = built_dir / name
        if not built.exists() or path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        os.close(fd)
        shutil.copyfile(built, tmp)
        os.replace(tmp, path)
        stored += 1
    if stored:
        root = next(iter(missing.values())).parent.parent
        lru.evict(((obj, [obj.parent]) for folder in root.iterdir() if folder.is_dir()
                   for obj in folder.iterdir() if not obj.name.startswith(".")), CACHE_OBJECTS)
    return stored
