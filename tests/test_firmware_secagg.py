"""A device's secure-aggregation and noise steps on the Cortex-M4 (device_runtime/c/firmware_secagg.c under QEMU
with the instruction-count plugin): the firmware's signed keys, an opened share and its noised, masked values are
the Python device's, byte for byte, for a round of degree 36 (a cohort of 50); the instructions of each step are
printed (BENCHMARKS and docs/security.md quote them). Then the whole node firmware built with secure aggregation
and noise (fedtiny_node.elf, `codegen --node --secagg`) in a real noised masked round over mosquitto beside a Python
and a C-session node agent, reset mid-round, the sum exact; and its RAM as device_memory counts it against the
linker. Skips without arm-none-eabi-gcc, QEMU, mosquitto or Monocypher's sources on a user's machine; fails in
CI."""

import re
import threading
import time

import numpy as np
import pytest
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


# --- the firmware node in a real secure-aggregation round ----------------------------------------------------

SIGMA_ROUND = 0.01  # the devices' noise (real units): distributed DP under secure aggregation


@pytest.fixture(scope="module")
def built_secagg_fleet(tmp_path_factory):
    """Three devices' keys (each with its peers.json), their samples, and n0's firmware built with secure
    aggregation and device noise (test_firmware_node.build_fleet)."""
    from test_firmware_node import build_fleet, require_firmware_tools
    from test_server_e2e import breast_cancer_task

    require_firmware_tools()
    require_monocypher()
    plan, shards, _ = breast_cancer_task(3)
    return build_fleet(tmp_path_factory.mktemp("fw-secagg"), plan, shards, secagg=True)


def expected_delta(plan, run: int, round_: int, identity: bytes, base: dict, trained: dict,
                   noised: bool = True) -> dict:
    """What a device sends masked in a round trained from `base` with nothing carried: its clipped delta, noised
    from its own stream and clamped to the round's bounds (update.uplink_delta, device.py's)."""
    from fedtiny.protocol.secagg import value_bounds
    from fedtiny.protocol.update import uplink_delta

    sigma = float(np.float32(SIGMA_ROUND))
    noise = NoiseStream(noise_key(identity), run, round_) if noised else None
    sent, _ = uplink_delta(plan, base, trained, None, keep=1.0, clip_norm=CLIP, noise_sigma=sigma if noised else 0.0,
                           noise=noise, noise_limits=value_bounds(plan, CLIP, sigma))
    return sent


def test_a_firmware_node_in_a_noised_secure_aggregation_round_sums_exactly(built_secagg_fleet, tmp_path):
    """The M4 firmware (QEMU, n0) in one masked round with device noise beside a Python node agent (n1) and a node
    agent running the C node's session (n2), over mosquitto through the real coordinator. The modem loses the
    firmware's masked DELTA after its first chunks and QEMU is killed (a power cut); started again, the node
    restores its round from flash, sends the persisted masked DELTA again and answers the unmasking with the shares
    it holds (in a cohort of 3 the round fails without them). Every stage runs, no downlink is refused, and the
    coordinator's one outcome is the sum of all three devices' noised, clipped deltas exactly, each computed here
    in Python from the device's trained model (the firmware's read from its flash image) and its own noise stream:
    the firmware's noise and masks are the Python device's, bit for bit."""
    from fedtiny_device import node_project
    from fedtiny_device.cruntime import unpack_state
    from fedtiny_server.grid import RoundPolicy
    from fedtiny_server.rounds import Coordinator, CoordinatorConfig
    from fedtiny_server.state import StateStore
    from test_cstore import parse_newest
    from fedtiny.transport.faults import FaultyTransport
    from test_firmware_node import Fleet, delta_chunks, losing

    require_tool("mosquitto")
    lost, drop = losing(delta_chunks(1, 3))
    fleet = Fleet(tmp_path, built_secagg_fleet, dict(transport_wrapper=lambda t: FaultyTransport(t, drop=drop)),
                  secagg=True, c_sessions=("n2",))
    outcomes = []
    take = fleet.link.secagg_outcomes
    fleet.link.secagg_outcomes = lambda: outcomes.extend(taken := take()) or taken  # what the round sums
    try:
        plan = fleet.plan
        coordinator = Coordinator(fleet.link, plan, StateStore(tmp_path / "state.db"), CoordinatorConfig(
            rounds=1, policy=RoundPolicy(quorum=1.0, deadline=120.0, poll=0.05),
            train_config={"clip_norm": CLIP, "noise_sigma": SIGMA_ROUND}, secagg=True))
        done = {}
        rounds = threading.Thread(target=lambda: done.setdefault("history", coordinator.run()), daemon=True)
        rounds.start()
        deadline = time.monotonic() + 120
        while lost["dropped"] == 0:  # the modem has lost part of the masked DELTA: kill the board now
            assert time.monotonic() < deadline and rounds.is_alive(), fleet.node.qemu.console()[-3000:]
            time.sleep(0.01)
        fleet.node.qemu.kill()
        lost["on"] = False
        fleet.node.qemu.start()
        rounds.join(180)
        assert "history" in done, "the round did not finish"
    finally:
        fleet.close()
    history = done["history"]
    console = fleet.node.qemu.console()
    assert [r.replies for r in history] == [3], console[-3000:]  # the three survivors
    assert "refused a downlink" not in console, console[-3000:]
    # the masked DELTA was sealed before the kill (its chunks' loss triggered it; the kill may cut the console lines
    # saying so, whether the relay came before the training ended or after): the restarted node resent it from its
    # record and did not train round 1 again
    assert not re.search(r"^node: round 1 trained", fleet.node.qemu.console(2), re.M), console
    assert re.search(r"^node: restored secure-aggregation round 1$", fleet.node.qemu.console(2), re.M), console
    # the masked round ran on the node's 8 KB stack (fedtiny_node.ld), painted at start: its deepest, with room left
    peak = max(int(m) for m in re.findall(r"^node: stack peak (\d+) B below main$", console, re.M))
    assert peak <= 8192 - 512, peak
    print(f"\nthe firmware's stack peak in a masked round: {peak:,} B of 8,192")
    (outcome,) = [o for o in outcomes if o.round == 1]
    assert outcome.failure == "" and len(outcome.result.survivors) == 3 and not outcome.result.dropped

    base = plan.initial_state()
    run_number = fleet.agents["n1"].session.state.run
    bank = node_project.bank_bytes(node_project.buffer_sizes(plan, 256, secagg=True))
    records, segments = parse_newest((fleet.node.qemu.workdir / node_project.FLASH_FILE).read_bytes(), bank, 2, 8)
    # the round (10 KB) is written when it changes, not with every record (a store's generation counts its saves):
    # begun, peers answered, relay taken, masked, revealed
    round_saves, (record,) = parse_newest((fleet.node.qemu.workdir / node_project.ROUND_FLASH_FILE).read_bytes(),
                                          node_project.ROUND_BANK_BYTES, 2, 8)
    assert len(segments) == 6 and len(record) == node_project.NODE_SECAGG_RECORD_BYTES
    assert round_saves <= 5 < records, (round_saves, records)
    print(f"\nthe firmware's flash saves in the run: {records} records of its state, {round_saves} of its round")
    trained = {"n0": unpack_state(plan, segments[5])}  # the firmware's personalised model: its trained state
    trained |= {name: agent.session.state.personal for name, agent in fleet.agents.items()}
    keys = fleet.run / "fleet" / "devices"
    expected = {name: expected_delta(plan, run_number, 1, (keys / name / "identity.key").read_bytes(), base, model)
                for name, model in trained.items()}
    for name in plan.trainable_buffers():
        total = sum(e[name].astype(np.int64) for e in expected.values())
        assert np.array_equal(outcome.result.total[name], total), name
    # the noise is there: without it the firmware's delta would differ
    plain = expected_delta(plan, run_number, 1, (keys / "n0" / "identity.key").read_bytes(), base, trained["n0"],
                           noised=False)
    assert any(not np.array_equal(plain[n], expected["n0"][n]) for n in plan.trainable_buffers())
    assert all(a.session.state.upload is None and a.session.state.trained_round == 1 for a in fleet.agents.values())


def test_device_memory_counts_the_noise_and_secure_aggregation_ram_as_the_linker_does(built_secagg_fleet, tmp_path):
    """The firmware of the round above (n0, built with secure aggregation and noise) against the same device's plain
    firmware: its values buffer and round state are device_memory.privacy_ram_bytes' byte for byte, and all the RAM
    it adds by the linker (those, and the larger reassembly and upload buffers of node_project.buffer_sizes with
    secagg) is device_memory's and buffer_sizes' count within 5 %."""
    from fedtiny import device_memory
    from fedtiny.protocol.envelope import HEADER_SIZE, SIGNATURE_SIZE, TAG_SIZE
    from fedtiny_device import node_project
    from fedtiny_device.cruntime import memory_usage
    from test_firmware_node import FLEET_OPTIONS
    from test_server_e2e import breast_cancer_task

    plan, _, _ = breast_cancer_task(3)
    (elf,) = (built_secagg_fleet / "firmware").glob("*/fedtiny_node.elf")
    parts = node_project.ram_by_part(elf.with_name("fedtiny_node.map"))
    privacy = device_memory.privacy_ram_bytes(plan, noise=True, secagg=True)
    assert parts["noise values"] == privacy["noise_values_bytes"] > 0
    assert parts["secure aggregation"] == privacy["secagg_state_bytes"] > 0
    # what the firmware persists of it: all but the stage reply buffer (the sealed SECAGG_SHARES to 64 neighbours)
    stage = HEADER_SIZE + 4 + 80 * 64 + TAG_SIZE + SIGNATURE_SIZE
    assert node_project.NODE_SECAGG_RECORD_BYTES == privacy["secagg_state_bytes"] - stage
    samples = np.load(built_secagg_fleet / "nodes" / "n0.npz")
    project = node_project.files(plan, node_project.device_folder(built_secagg_fleet / "fleet", "n0"), "n0",
                                 samples["x"], samples["y"], int(samples["seed"]), **FLEET_OPTIONS)
    plain = memory_usage(node_project.build(project, cache_dir=tmp_path / "firmware"))["ram"]
    added = memory_usage(elf)["ram"] - plain
    before, after = (node_project.buffer_sizes(plan, FLEET_OPTIONS["chunk_size"], s) for s in (False, True))
    grown = sum(after[k] - before[k] for k in ("reassembly", "bitmap"))
    if after["upload"] > plan.arena_size:  # the sealed upload has a buffer of its own (else it borrows the arena)
        grown += after["upload"] - before["upload"]
    counted = sum(privacy.values()) + grown
    assert abs(counted - added) <= 0.05 * added, (counted, added, parts)
    print(f"\nRAM added by noise and secure aggregation: {added:,} B by the linker, {counted:,} B counted; {parts}")


def test_a_firmware_that_does_not_fit_the_m4_is_one_line(tmp_path, monkeypatch):
    """`simulate --qemu-nodes` whose node firmware the linker refuses (a large plan with secure aggregation's RAM):
    FirmwareFleet.build says so in one line (simulate's ConfigError: exit 2), not with the linker's log."""
    from fedtiny.protocol.keys import provision_fleet
    from fedtiny_device import node_project
    from fedtiny_device.cruntime import BuildError
    from fedtiny_sim.firmware_nodes import FirmwareFleet
    from fedtiny_sim.simulate import ConfigError
    from test_firmware_node import FLEET
    from test_server_e2e import breast_cancer_task

    plan, shards, _ = breast_cancer_task(3)
    provision_fleet(tmp_path / "fleet", FLEET, ["n0", "n1", "n2"])
    (tmp_path / "nodes").mkdir()
    np.savez(tmp_path / "nodes" / "n0.npz", x=shards[0][0], y=shards[0][1], seed=1)

    def overflowing(project, cache_dir=None):
        assert "#define FEDTINY_NODE_CFG_SECAGG 1" in project["node_config.h"]
        raise BuildError("make m4-node failed:\n... region `RAM' overflowed by 40960 bytes\ncollect2: error: ...")

    monkeypatch.setattr(node_project, "build", overflowing)
    with pytest.raises(ConfigError, match=r"with secure aggregation and device noise does not fit .* RAM overflowed"):
        FirmwareFleet(tmp_path, plan, ["n0"], "", chunk_size=256, secagg=True).build("n0")
