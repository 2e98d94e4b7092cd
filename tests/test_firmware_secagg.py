"""A device's secure-aggregation and noise steps on the Cortex-M4 (device_runtime/c/firmware_secagg.c under QEMU
with the instruction-count plugin): the firmware's signed keys, an opened share and its noised, masked values are
the Python device's, byte for byte, for a round of degree 36 (a cohort of 50); the instructions of each step are
printed (BENCHMARKS and docs/security.md quote them). Skips without arm-none-eabi-gcc, QEMU or Monocypher's
sources on a user's machine; fails in CI."""

import numpy as np
from conftest import require_monocypher, require_tool
from test_secagg import clipped_delta

from fedtiny.protocol.noise import NoiseStream, add_noise, noise_key
from fedtiny.protocol.secagg import SecAggDevice
from fedtiny.protocol.update import row_scales

DEGREE, COHORT, CLIP, SIGMA = 36, 50, 0.5, 0.01


def test_the_m4_keys_shares_noise_and_masks_are_the_python_devices(mlp_last2_plan):
    require_tool("arm-none-eabi-gcc")
    require_tool("qemu-system-arm")
    require_tool("make")
    from fedtiny_device import cnode, csecagg

    require_monocypher()
    plan = mlp_last2_plan
    delta = clipped_delta(plan, 4)
    case = csecagg.secagg_case(plan, delta, DEGREE, COHORT, CLIP, SIGMA)
    library = cnode.CNodeLibrary(plan)  # the shared build cache: the same sources build once
    run = csecagg.run_secagg_firmware(csecagg.build_secagg_firmware(library, case.vectors))
    assert run.returncode == 0

    python = SecAggDevice(plan, case.identity, case.device_id, case.ctx, {}, CLIP, float(np.float32(SIGMA)))
    assert run.keys == python.keys().encode()
    assert run.opened == (5, case.shares)
    python.neighbours, python.cohort = case.neighbours, COHORT
    python.held = {v: None for v in case.neighbours}  # masked() uses the neighbours whose shares came: all of them
    noise = NoiseStream(noise_key(case.identity.to_bytes()), case.ctx.run, case.ctx.round)
    noised = add_noise(delta, row_scales(plan), float(np.float32(SIGMA)), noise, python.bounds)
    assert run.packed == python.masked(noised, 0, 0.0, 0.0).packed

    elements = sum(int(np.prod(plan.buffers[n].shape)) for n in plan.trainable_buffers())
    print(f"M4 instructions ({elements} trainable elements, degree {DEGREE}): {run.instructions}; "
          f"stack {run.stack}")
