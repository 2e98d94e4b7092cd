"""The fast forward pieces of issue 15 against the reference, exactly, on the host and on the Cortex-M4 (QEMU):

- fedtiny_multiply_by_quantized_multiplier_i32 (fedtiny_arith.h, one SMLAL per output) = the reference
  multiply-shift on the edges of the int32 range (every power of two and its neighbours, the small values whose
  roundings tie), every shift from -31 to 31 and multipliers of either sign, then on pseudo-random inputs;
- the forward kernels on random shapes (tests/test_fast_kernels.py's harness holds whole random conv chains).
"""

import numpy as np
import pytest

from fedtiny_device import codegen, cruntime

from test_cruntime import cache, need  # noqa: F401 (cache: its session fixture, builds shared)

REQUANT_CHECK = rb"""/* Every pair (edge x, multiplier) at every shift, then random triples: fast == reference. */
#include <stdint.h>
#include <stdio.h>

#include "fedtiny_arith.h"

static uint32_t state = 12345u;
static uint32_t next(void)
{
    state = state * 1664525u + 1013904223u;
    return state ^ (state >> 15);
}

static uint32_t checked, mismatches;

static void check(int32_t x, int32_t m, int32_t shift)
{
    const int32_t want = fedtiny_multiply_by_quantized_multiplier((int64_t)x, m, shift);
    const int32_t got = fedtiny_multiply_by_quantized_multiplier_i32(x, m, shift);
    checked++;
    if (got != want && mismatches++ < 10) {
        printf("mismatch x %ld m %ld shift %ld: %ld != %ld\n", (long)x, (long)m, (long)shift, (long)got,
               (long)want);
    }
}

int main(void)
{
    static int32_t xs[600];
    static const int32_t ms[] = {1073741824, 1073741825, 2147483647, 1518500250, 1, 0, -1, -1073741824,
                                 -2147483647, 1431655765, 2147418112, 1073774592};
    uint32_t nx = 0, i, j, k;
    int32_t v, shift;
    for (k = 0; k < 31; k++) { /* +-2^k and their neighbours */
        const int32_t p = (int32_t)((uint32_t)1 << k);
        xs[nx++] = p; xs[nx++] = p - 1; xs[nx++] = p + 1; xs[nx++] = -p; xs[nx++] = -p - 1; xs[nx++] = 1 - p;
    }
    xs[nx++] = INT32_MIN; xs[nx++] = INT32_MIN + 1; xs[nx++] = INT32_MAX; xs[nx++] = INT32_MAX - 1;
    for (v = -200; v <= 200; v++) { /* every rounding tie of the small values */
        xs[nx++] = v;
    }
    for (i = 0; i < nx; i++) {
        for (j = 0; j < sizeof ms / sizeof ms[0]; j++) {
            for (shift = -31; shift <= 31; shift++) {
                check(xs[i], ms[j], shift);
            }
        }
    }
    for (i = 0; i < 200000u; i++) {
        const int32_t x = (int32_t)(next() >> (next() & 31u)) * ((next() & 1u) ? 1 : -1);
        int32_t m = (int32_t)next();
        if (m == INT32_MIN) {
            m = INT32_MAX;
        }
        check(x, (i & 1u) ? m : (int32_t)(0x40000000u | (next() >> 2)), (int32_t)(next() % 63u) - 31);
    }
    printf("checked %lu mismatches %lu\n", (unsigned long)checked, (unsigned long)mismatches);
    return mismatches != 0;
}
"""

REQUANT_MAKEFILE = b"""WARN = -std=c99 -Wall -Wextra -Werror
host: requant_check
requant_check: requant_check.c fedtiny_arith.h
\tgcc $(WARN) -O2 -o $@ requant_check.c
m4: requant_check.elf
requant_check.elf: requant_check.c fedtiny_arith.h fedtiny_boot.c fedtiny_boot.h fedtiny_m4.ld
\tarm-none-eabi-gcc $(WARN) -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -O2 --specs=nano.specs \\
\t\t--specs=rdimon.specs -nostartfiles -Wl,-T,fedtiny_m4.ld -o $@ requant_check.c fedtiny_boot.c
"""


def _requant_files() -> dict:
    rt = codegen.runtime_dir()
    files = {name: (rt / name).read_bytes() for name in ("fedtiny_arith.h", "fedtiny_boot.c", "fedtiny_boot.h",
                                                          "fedtiny_m4.ld")}
    return files | {"requant_check.c": REQUANT_CHECK, "Makefile": REQUANT_MAKEFILE}


def _checked(stdout: str) -> int:
    last = stdout.strip().splitlines()[-1].split()
    assert last[0] == "checked" and last[2:] == ["mismatches", "0"], stdout
    return int(last[1])


def test_fast_requantization_is_the_reference_on_the_host(cache):
    need("gcc", "make")
    import subprocess
    exe = cruntime.make_cached(_requant_files(), "host", "requant_check", cache)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _checked(run.stdout) > 600_000


def test_fast_requantization_is_the_reference_on_the_m4(cache):
    need("arm-none-eabi-gcc", "qemu-system-arm", "make")
    elf = cruntime.make_cached(_requant_files(), "m4", "requant_check.elf", cache)
    run = cruntime.run_qemu(elf, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _checked(run.stdout) > 600_000
