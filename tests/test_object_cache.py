"""The shared object cache (fedtiny_device.object_cache) that node firmware builds take their objects from: an
object is reused only when nothing that goes into it changed (its source, a header it includes at any depth, the
Makefile's flags, the compiler), and a private source's object is never kept. A tiny host project stands in for
the firmware: the same make_cached, pattern rule and prebuilt copies, in a fraction of a second per build
(tests/test_firmware_node.py builds a second device's real firmware from the cache)."""

import subprocess

import pytest

from conftest import require_tool
from fedtiny_device import object_cache

MAKEFILE = """CC = gcc
CFLAGS = -O1
prog: a.o c.o secret.o
\t$(CC) -o $@ $^
%.o: %.c
\t@echo compiled $<
\t$(CC) $(CFLAGS) -c -o $@ $<
"""

BASE = {
    "Makefile": MAKEFILE,
    "a.h": '#include "b.h"\nint a(void);\n',
    "b.h": "#define B 2\n",
    "a.c": '#include "a.h"\nint a(void) { return B * 10; }\n',
    "c.c": "int c(void) { return 3; }\n",
    "secret.c": '#include <stdio.h>\nint a(void);\nint c(void);\nstatic const int secret = 5;\n'
                'int main(void) { printf("%d\\n", a() + c() + secret); return 0; }\n',
}


@pytest.fixture
def build(tmp_path, monkeypatch):
    """Build a variant of BASE; returns (the sources make compiled, the program's output)."""
    require_tool("gcc")
    require_tool("make")
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path / "cache"))

    def run(**changes):
        files = BASE | changes
        prog = object_cache.make_cached(files, "prog", "prog", tmp_path / "builds", suffix=".o", compiler="gcc",
                                         private=frozenset({"secret.c"}))
        log = (prog.parent / "build.log").read_text()
        compiled = {line.split()[1] for line in log.splitlines() if line.startswith("compiled ")}
        return compiled, int(subprocess.run([str(prog)], capture_output=True, text=True, check=True).stdout)

    return run


def test_a_build_reuses_every_object_whose_inputs_are_unchanged_and_never_keeps_a_private_one(build, tmp_path):
    assert build() == ({"a.c", "c.c", "secret.c"}, 28)
    kept = sorted(p.name for p in (tmp_path / "cache" / "cruntime" / "objects").rglob("*.o"))
    assert kept == ["a.o", "c.o"]  # secret.o stays in its build folder
    # another "device": only its private source compiles, and the program links with the cached objects
    assert build(**{"secret.c": BASE["secret.c"].replace("= 5", "= 6")}) == ({"secret.c"}, 29)


@pytest.mark.parametrize("change, recompiled, output", [
    ({"a.c": BASE["a.c"].replace("B * 10", "B * 11")}, {"a.c"}, 30),
    ({"b.h": "#define B 4\n"}, {"a.c"}, 48),  # a header a.c includes through a.h
    ({"c.c": "int c(void) { return 7; }\n"}, {"c.c"}, 32),
    ({"Makefile": MAKEFILE.replace("-O1", "-O2")}, {"a.c", "c.c"}, 28),  # a flag
], ids=["source", "included-header", "other-source", "flag"])
def test_an_object_is_rebuilt_when_anything_that_goes_into_it_changed(build, change, recompiled, output):
    build()
    assert build(**change) == (recompiled | {"secret.c"}, output)


def test_another_compiler_rebuilds_every_object(build, monkeypatch):
    build()
    monkeypatch.setattr(object_cache, "compiler_identity", lambda compiler: b"/usr/bin/gcc\0gcc 99.1")
    assert build(**{"secret.c": BASE["secret.c"] + "\n"})[0] == {"a.c", "c.c", "secret.c"}


def test_the_object_cache_keeps_the_most_recently_used_objects(build, tmp_path, monkeypatch):
    """Past CACHE_OBJECTS the least recently used objects go (fedtiny.lru, as the builds beside them), and an object
    a build takes from the cache counts as used."""
    import os

    build()  # a.o and c.o cached
    objects = tmp_path / "cache" / "cruntime" / "objects"
    for path in objects.rglob("*.o"):
        os.utime(path, (1000, 1000))
    (c_o,), (old_a,) = objects.rglob("c.o"), objects.rglob("a.o")
    os.utime(c_o, (500, 500))  # the oldest
    monkeypatch.setattr(object_cache, "CACHE_OBJECTS", 2)
    # a.c changes: c.o is taken from the cache (used now), the new a.o is stored, and the old a.o goes
    assert build(**{"a.c": BASE["a.c"].replace("B * 10", "B * 11")}) == ({"a.c", "secret.c"}, 30)
    assert sorted(p.name for p in objects.rglob("*.o")) == ["a.o", "c.o"]
    assert c_o.exists() and not old_a.exists() and not old_a.parent.exists()
