"""The linker's view of a training firmware: what the C runtime of a plan takes in RAM and flash on the M4.

The training firmware (`make m4-train`) compiles each source to its own object, so its map
(fedtiny_train.map beside the ELF) names every input section's object. `runtime_sections` sums the sections of
the runtime's objects (the generated model.c, fedtiny_kernels.c, fedtiny_kernels_bwd_fast.c, fedtiny_runtime.c):
RAM is their .data and .bss (arena, scratch, exponent table, train state), flash their .text, .rodata and .data's
load image. The rest of that firmware (boot code, newlib's printf and semihosting, the samples) is the test
harness's, not the plan's. These are the figures fedtiny.device_memory's compile-time rules are held to
(tests/test_device_memory.py).
"""

import re
from pathlib import Path

RUNTIME_OBJECTS = ("model.train.o", "fedtiny_kernels.train.o", "fedtiny_kernels_fwd_fast.train.o",
                   "fedtiny_kernels_bwd_fast.train.o",
                   "fedtiny_runtime.train.o")
TRAIN_MAP = "fedtiny_train.map"


def runtime_sections(map_path: Path, objects: tuple[str, ...] = RUNTIME_OBJECTS) -> dict[str, int]:
    """{"ram": .data + .bss bytes, "flash": .text + .rodata + .data bytes, "code": .text bytes} of `objects`, as
    the linker placed them (sections it discarded are left out)."""
    text = Path(map_path).read_text()
    memory_map = text[text.index("Linker script and memory map"):]
    sums = dict(ram=0, flash=0, code=0)
    # an input section: " .kind.name  0xADDR  0xSIZE object" (a long name stands alone on the line before)
    for kind, size, obj in re.findall(r"^ \.(text|rodata|data|bss)(?:\.[\w.]+)?\s+0x[0-9a-f]+\s+0x([0-9a-f]+) (\S+)$",
                                      memory_map, re.M):
        if Path(obj).name not in objects:
            continue
        size = int(size, 16)
        if kind in ("data", "bss"):
            sums["ram"] += size
        if kind != "bss":
            sums["flash"] += size
        if kind == "text":
            sums["code"] += size
    return sums


def step_stack_bytes(stdout: str) -> int | None:
    """The peak stack of the training steps that firmware_train.c prints ("step stack N bytes"), or None."""
    m = re.search(r"^step stack (\d+) bytes$", stdout, re.M)
    return int(m[1]) if m else None
