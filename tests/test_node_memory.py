"""The whole node fits the microcontroller (issue #12): the node firmware (firmware_node.c: protocol, crypto,
message buffers, persisted state, training arena, C scratch, stack, heap), built for the default model's
hand-picked sparse plan (the default before `--scheme auto`) and for `full` (what auto chooses for the default run),
takes at most 256 KB of RAM and 1 MB of flash by the linker; and in a simulation a firmware node of `full` gives
the global model that Python agents give."""

from dataclasses import replace

import numpy as np
import pytest
from conftest import require_tool

from fedtiny.interpreter import quantize_input
from fedtiny.protocol.keys import provision_fleet
from fedtiny.scheme import REFERENCE_SPARSE
from fedtiny_device import node_project
from fedtiny_device.cruntime import memory_usage
from fedtiny_sim.scenarios import pretrained
from fedtiny_sim.simulate import SimulationConfig, check_inputs, simulate, training_plan

RAM, FLASH = 256 * 1024, 1024 * 1024  # fedtiny_m4.ld's regions
# the simulations below (a generous deadline: QEMU trains `full` for several seconds a round on a busy machine,
# and a firmware node that missed a round would change the global model)
# fixed, the scheme too (no search): the firmware is what is tested
CONFIG = SimulationConfig(nodes=3, rounds=2, deadline=300.0, lr=0.01, epochs=2, scheme=REFERENCE_SPARSE["sensor_cnn"])


@pytest.fixture(scope="module")
def default_model():
    """The simulation's checked configuration (the default reserve filled in), its task and its pretrained int8
    model (cached across runs by fedtiny_sim.scenarios)."""
    config = replace(CONFIG)
    task = check_inputs(config)
    return config, task, pretrained(task, config.seed)[1]


def assert_fits(elf, plan) -> None:
    """fedtiny_node.elf (linked, so within the regions) fits, and its map accounts for every byte of RAM."""
    usage = memory_usage(elf)
    parts = node_project.ram_by_part(elf.with_name("fedtiny_node.map"))
    assert sum(parts.values()) == usage["ram"], parts
    assert usage["ram"] <= RAM, f"{usage['ram']:,} B of RAM: {parts}"
    assert usage["flash"] <= FLASH, f"{usage['flash']:,} B of flash"
    # the sealed upload and the trained state borrow the training arena and the kernels' scratch
    assert parts["own upload and trained state"] == 0, parts
    assert parts["arena"] == plan.arena_size
    # the personalised model kept between rounds: the memory report's count, in RAM
    assert parts["personalised model"] == plan.memory_report()["personal_model_bytes"] > 0, parts
    print(f"RAM {usage['ram']:,} B, flash {usage['flash']:,} B, {parts}")


def test_the_sparse_plans_node_firmware_fits_256_kb_of_ram_and_1_mb_of_flash(default_model, tmp_path):
    """(`full` on the default model: test_a_firmware_node_of_full_..., on the firmware its simulation built.)"""
    require_tool("arm-none-eabi-gcc")
    require_tool("make")
    config, task, graph = default_model
    plan = training_plan(config, graph)
    provision_fleet(tmp_path / "fleet", "sim", ["node000"])
    samples = task.nodes[0]  # node000's share, in flash as in the simulation
    project = node_project.files(plan, node_project.device_folder(tmp_path / "fleet", "node000"), "node000",
                                 quantize_input(graph, samples.X), samples.y, 0)
    assert_fits(node_project.build(project, cache_dir=tmp_path / "firmware"), plan)  # a link past the regions fails


def _final_global(run):
    from fedtiny_server.state import StateStore

    store = StateStore(run / "state.db")
    try:
        return store.load()
    finally:
        store.close()


def test_a_firmware_node_of_full_fits_and_gives_the_python_agents_global_model(default_model, tmp_path):
    for tool in ("qemu-system-arm", "arm-none-eabi-gcc", "gcc", "make"):
        require_tool(tool)
    config = replace(CONFIG, scheme="full")
    firmware_run = simulate(replace(config, qemu_nodes=1, out=str(tmp_path / "qemu1")))
    simulate(replace(config, qemu_nodes=0, out=str(tmp_path / "qemu0")))
    node = firmware_run["firmware"]["node000"]
    assert node["rounds_sent"] == 2 and node["refused"] == [], node
    assert node["ram_bytes"] <= RAM and node["flash_bytes"] <= FLASH
    with_firmware, python_only = _final_global(tmp_path / "qemu1"), _final_global(tmp_path / "qemu0")
    assert with_firmware.model_version == python_only.model_version == 2
    for field in ("ints", "master"):
        a, b = getattr(with_firmware, field), getattr(python_only, field)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), field
    _, _, graph = default_model
    (elf,) = (tmp_path / "qemu1" / "firmware").glob("*/fedtiny_node.elf")  # the firmware node000 ran
    assert_fits(elf, training_plan(replace(default_model[0], scheme="full"), graph))
