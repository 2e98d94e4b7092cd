"""The node's persisted state in C (device_runtime/c/fedtiny_store.c) on a checked flash in RAM that loses power
(fedtiny_flash_ram.c), and on a host file through semihosting under QEMU (fedtiny_flash_semihost.c).

The power-cut tests cut a sequence of saves after every single programmed byte and at every erase (torn in
several shapes), power up again and load: the record is always the one saved before the cut or the one in
progress, whole and byte for byte, never a mix, never nothing once a save has completed, and the generation
never goes back (also for the node's own record layout, when a save writes a new personalised model). Every flash operation the store makes is checked against what flash with ECC allows (whole
aligned units, each programmed once per erase, bits only cleared). An independent Python reader of the record
layout (zlib's CRC-32) checks what is in the flash after every cut.
"""

import ctypes
import random
import re
import signal
import struct
import subprocess
import threading
import time
import zlib

import pytest
from conftest import require_tool

from fedtiny_device import codegen, cstore
from fedtiny_device.cstore import EMPTY, LOST, OK, STATUS, header_area

MAGIC = 0x54535446


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    require_tool("gcc")
    require_tool("make")
    return cstore.CStore(tmp_path_factory.mktemp("cstore_cache"))


def blob(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def parse_bank(image: bytes, bank: int, bank_size: int, unit: int):
    """(generation, segments) of the bank's record, read as the layout in fedtiny_store.h says, or None."""
    b = image[bank * bank_size:(bank + 1) * bank_size]
    magic, fmt, count, gen, plen, crc = struct.unpack_from("<IHHIII", b)
    if magic != MAGIC or fmt != 1 or count > cstore.MAX_SEGMENTS:
        return None
    lengths = struct.unpack_from(f"<{count}I", b, 20)
    area = header_area(count, unit)
    if sum(lengths) != plen or area + plen > bank_size:
        return None
    payload = b[area:area + plen]
    if zlib.crc32(payload + b[20:20 + 4 * count] + b[:16]) != crc:
        return None
    cuts = [sum(lengths[:i]) for i in range(count + 1)]
    return gen, [payload[cuts[i]:cuts[i + 1]] for i in range(count)]


def parse_newest(image: bytes, bank_size: int, bank_count: int, unit: int):
    """The valid record with the highest generation, or None."""
    records = [r for r in (parse_bank(image, b, bank_size, unit) for b in range(bank_count)) if r is not None]
    return max(records, key=lambda r: r[0], default=None)


# A sequence of saves of the shapes a node's state has: several segments, empty ones, lengths that are not
# multiples of the program unit, a unit spanning three segments, no segment at all, one filling the bank.
def save_sequence(rng: random.Random, bank_size: int, unit: int) -> list[list[bytes]]:
    full = bank_size - header_area(1, unit)
    return [[blob(rng, 37), b"", blob(rng, 300)], [blob(rng, 1), blob(rng, 3), blob(rng, 2), blob(rng, 250)],
            [blob(rng, full)], [], [blob(rng, 8 * unit), blob(rng, 5)], [blob(rng, 123)] * 3]


def test_crc32_is_zlibs(lib):
    rng = random.Random(1)
    for n in (0, 1, 3, 64, 1000):
        data = blob(rng, n)
        assert lib.crc32(data) == zlib.crc32(data)
        assert lib.crc32(data[n // 2:], lib.crc32(data[:n // 2])) == zlib.crc32(data)


@pytest.mark.parametrize("unit", [1, 4, 8, 64])
def test_saves_round_trip_and_rotate_banks(lib, unit):
    bank_size = 1024
    flash = cstore.RamFlash(lib, bank_size, 2, unit)
    store = flash.store()
    assert store.open() == EMPTY and store.load().status == EMPTY
    for generation, segments in enumerate(save_sequence(random.Random(unit), bank_size, unit), start=1):
        assert STATUS[store.save(segments)] == "ok"
        record = store.struct.newest
        assert (record.generation, record.bank) == (generation, (generation - 1) % 2)
        assert parse_newest(flash.image, bank_size, 2, unit) == (generation, segments)
        for i, s in enumerate(segments):  # where the record says each segment is, for use in place
            offset = record.segment_offset[i]
            assert flash.image[offset:offset + len(s)] == s
        again = flash.store()  # a power-up: find it from the flash alone
        assert again.open() == OK and again.load() == cstore.Loaded(OK, generation, segments)


def test_flash_ram_refuses_what_flash_cannot_do(lib):
    """The store is tested against a HAL that refuses what real flash refuses, so obeying it means something."""
    flash = cstore.RamFlash(lib, 256, 2, 8)
    program = ctypes_program(flash)
    assert program(0, b"\x0f" * 8) == 0
    assert program(0, b"\x0f" * 8) == -1, "a unit programmed twice"
    assert program(12, b"\x00" * 8) == -1, "misaligned"
    assert program(16, b"\x00" * 4) == -1, "part of a unit"
    assert program(504, b"\x00" * 16) == -1, "past the region"
    flash.memory[24] = 0x0F
    assert program(24, b"\xff" + b"\x00" * 7) == -1, "a bit from 0 to 1"
    assert flash.image[16:32] == b"\xff" * 8 + b"\x0f" + b"\xff" * 7, "a refused program changed nothing"
    for bad in [(256, 2, 3), (256, 2, 128), (256, 1, 8), (260, 2, 8), (32, 2, 8)]:
        with pytest.raises(ValueError):
            cstore.RamFlash(lib, *bad)


def ctypes_program(flash):
    """The RAM flash's program function, called directly."""
    fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_uint32)(
        flash.ram.flash.program)
    return lambda offset, data: fn(ctypes.addressof(flash.ram), offset, data, len(data))


def trace(lib, sequence, bank_size, bank_count, unit):
    """Bytes programmed and erases done by the end of each save, cut-free."""
    flash = cstore.RamFlash(lib, bank_size, bank_count, unit)
    store = flash.store()
    store.open()
    totals = []
    for segments in sequence:
        assert store.save(segments) == OK
        totals.append((flash.bytes_programmed, flash.erases))
    return totals


def save_with_cut(lib, sequence, cut: int, garble: bool, bank_size: int, bank_count: int, unit: int):
    """Save `sequence` on a fresh RAM flash whose power goes after `cut` programmed bytes (the last unit garbled
    or not): (the flash, each save's result, the index of the first save that failed)."""
    flash = cstore.RamFlash(lib, bank_size, bank_count, unit)
    store = flash.store()
    store.open()
    flash.cut(program_bytes=cut, garble=garble)
    results = [store.save(s) for s in sequence]
    return flash, results, next(i for i, r in enumerate(results) if r != OK)


def check_after_cut(lib, flash, sequence, failed, bank_count, unit):
    """Power up after a cut during save `failed` (every save before it completed): the record is save failed-1's
    or save failed's, whole; then the remaining saves work from that state and generations keep rising."""
    flash.revive()
    store = flash.store()
    status = store.open()
    loaded = store.load()
    assert parse_newest(flash.image, flash.bank_size, bank_count, unit) == (
        (loaded.generation, loaded.segments) if status == OK else None), "the C store and the layout disagree"
    if failed == 0:
        assert status in (EMPTY, LOST, OK)
        if status == OK:
            assert (loaded.generation, loaded.segments) == (1, sequence[0])
    else:
        assert status == OK, "nothing loaded after a save had completed"
        assert (loaded.generation, loaded.segments) in ((failed, sequence[failed - 1]),
                                                        (failed + 1, sequence[failed])), "not a whole record"
    generation = loaded.generation
    for segments in sequence[failed:]:
        assert store.save(segments) == OK
        assert store.struct.newest.generation == generation + 1
        generation += 1
    again = flash.store()
    assert again.open() == OK and again.load() == cstore.Loaded(OK, generation, sequence[-1])
    return status


@pytest.mark.parametrize("bank_count,unit", [(2, 8), (2, 1), (3, 16)])
def test_power_cut_after_every_programmed_byte(lib, bank_count, unit):
    bank_size = 1024
    sequence = save_sequence(random.Random(7), bank_size, unit)
    totals = [t[0] for t in trace(lib, sequence, bank_size, bank_count, unit)]
    first_payload = -(-sum(map(len, sequence[0])) // unit) * unit
    statuses = set()
    for cut in range(totals[-1]):
        for garble in (False, True):
            flash, results, failed = save_with_cut(lib, sequence, cut, garble, bank_size, bank_count, unit)
            assert results[failed] == -3 and failed == next(i for i, t in enumerate(totals) if t > cut)
            status = check_after_cut(lib, flash, sequence, failed, bank_count, unit)
            if failed == 0 and cut < first_payload:
                assert status == EMPTY, "a first save cut in its payload must leave the flash empty, not lost"
            statuses.add((failed, status))
    assert {f for f, _ in statuses} == set(range(len(sequence))), "a cut in every save"


@pytest.mark.parametrize("bank_count", [2, 3])
def test_power_cut_in_every_erase(lib, bank_count):
    bank_size, unit = 1024, 8
    sequence = save_sequence(random.Random(8), bank_size, unit)
    shapes = [(0, 0), (0, 1), (0, bank_size // 2), (bank_size // 2, bank_size), (0, bank_size), (100, 24)]
    for erase in range(len(sequence)):
        for erase_from, erase_length in shapes:
            flash = cstore.RamFlash(lib, bank_size, bank_count, unit)
            store = flash.store()
            store.open()
            flash.cut(erases=erase, erase_from=erase_from, erase_length=erase_length)
            results = [store.save(s) for s in sequence]
            assert results[erase] == -3 and all(r == OK for r in results[:erase])
            check_after_cut(lib, flash, sequence, erase, bank_count, unit)


def test_power_cuts_again_and_again(lib):
    """Many cuts in one flash's life, at random bytes and erases, each followed by a power-up: the loaded
    record is always the last completed save or the one cut, and the generation never goes back."""
    rng = random.Random(12)
    bank_size, unit = 2048, 8
    flash = cstore.RamFlash(lib, bank_size, 2, unit)
    completed = None  # (generation, segments) of the last save that returned OK
    seen = 0
    for _ in range(300):
        store = flash.store()
        status = store.open()
        loaded = store.load()
        if completed is None:
            assert status in (EMPTY, LOST, OK)
        else:
            assert status == OK
            assert (loaded.generation, loaded.segments) == completed or (
                loaded.generation == completed[0] + 1 and loaded.segments == in_progress)
        assert loaded.generation >= seen
        seen = loaded.generation
        if status == OK:
            completed = (loaded.generation, loaded.segments)
        if rng.random() < 0.5:
            flash.cut(program_bytes=rng.randrange(2 * bank_size), garble=rng.random() < 0.5)
        else:
            flash.cut(erases=rng.randrange(3), erase_from=rng.randrange(bank_size),
                      erase_length=rng.randrange(bank_size))
        while True:
            in_progress = [blob(rng, rng.randrange(400)) for _ in range(rng.randrange(1, 5))]
            if store.save(in_progress) != OK:
                break
            completed = (store.struct.newest.generation, in_progress)
        flash.revive()
    assert seen > 50


def test_a_damaged_record_is_ignored(lib):
    bank_size, unit = 1024, 8
    rng = random.Random(3)
    older, newer = [blob(rng, 100), blob(rng, 45)], [blob(rng, 200), b"", blob(rng, 9)]
    flash = cstore.RamFlash(lib, bank_size, 2, unit)
    store = flash.store()
    store.open()
    assert store.save(older) == OK and store.save(newer) == OK
    covered = list(range(20 + 4 * len(newer))) + list(
        range(header_area(len(newer), unit), header_area(len(newer), unit) + sum(map(len, newer))))
    for i in covered:  # every byte the newer record's CRC covers, one bit each
        flash.flip(bank_size + i, i % 8)
        damaged = flash.store()
        assert damaged.open() == OK and damaged.load() == cstore.Loaded(OK, 1, older), f"flip at {i}"
        flash.flip(bank_size + i, i % 8)
    flash.flip(50, 3)  # the older one damaged instead: the newer is still whole
    assert flash.store().open() == OK and flash.store().load().status == -8  # a store is not open before open()
    fresh = flash.store()
    assert fresh.open() == OK and fresh.load() == cstore.Loaded(OK, 2, newer)
    flash.flip(bank_size + 100, 0)  # both damaged: no state, and the node must know it lost one
    lost = flash.store()
    assert lost.open() == LOST and lost.load().status == LOST
    assert lost.save(older) == OK and lost.load() == cstore.Loaded(OK, 1, older)


def test_load_checks_the_bytes_it_hands_out(lib):
    flash = cstore.RamFlash(lib, 1024, 2, 8)
    store = flash.store()
    store.open()
    segments = [b"model" * 20, b"carry" * 10, b"upload" * 30]
    assert store.save(segments) == OK
    assert store.load([100, 50, 180]).segments == segments
    assert store.load([100, None, 180]).segments == [segments[0], b"", segments[2]], "skip one, use it in place"
    assert STATUS[store.load([100, 50]).status] == "layout"
    assert STATUS[store.load([100, 49, 180]).status] == "buffer"
    flash.flip(8 + 24 + 3, 1)  # after open: the flash changed under the store
    assert STATUS[store.load().status] == "verify"


def test_limits(lib):
    bank_size, unit = 1024, 8
    flash = cstore.RamFlash(lib, bank_size, 2, unit)
    store = flash.store()
    assert STATUS[store.save([b"x"])] == "not-open"
    store.open()
    for count in (0, 1, 8):
        assert store.capacity(count) == bank_size - header_area(count, unit)
    assert store.save([b"a" * store.capacity(2), b""]) == OK
    before = flash.image
    assert STATUS[store.save([b"a" * store.capacity(2), b"b"])] == "too-large"
    assert STATUS[store.save([b""] * 9)] == "argument"
    assert flash.image == before, "a refused save changes nothing"
    store.struct.newest.generation = 0xFFFFFFFF
    assert STATUS[store.save([b"x"])] == "generation"


def test_compiles_for_the_m4(tmp_path):
    """Strict warnings on the Cortex-M4, and its size there (a budget this test keeps)."""
    cc = require_tool("arm-none-eabi-gcc")
    src = codegen.runtime_dir() / "fedtiny_store.c"
    sizes = {}
    for opt in ("-O2", "-Os"):
        obj = tmp_path / f"store{opt}.o"
        subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-mcpu=cortex-m4", "-mthumb",
                        "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", opt, "-ffunction-sections", "-c", str(src),
                        "-o", str(obj)], check=True, capture_output=True, text=True)
        out = subprocess.run(["arm-none-eabi-size", str(obj)], check=True, capture_output=True, text=True).stdout
        text, data, bss = map(int, out.splitlines()[1].split()[:3])
        sizes[opt] = text + data
        assert bss == 0, "the store keeps no state of its own"
    print(f"fedtiny_store.c on the M4: {sizes['-O2']} B flash at -O2, {sizes['-Os']} B at -Os")
    assert sizes["-O2"] < 4096


# ---- under QEMU: the flash is a host file, and killing QEMU is the power cut ---------------------------------

QEMU_BANK, QEMU_UNIT, QEMU_SAVES = 16 * 1024, 8, 300  # firmware_store_test.c


def firmware_content(generation: int) -> list[bytes]:
    """Record G's segments as firmware_store_test.c makes them (xorshift32 seeded by G)."""
    mask, state = 0xFFFFFFFF, (generation * 2654435761 + 1) & 0xFFFFFFFF

    def draw() -> int:
        nonlocal state
        state ^= (state << 13) & mask
        state ^= state >> 17
        state ^= (state << 5) & mask
        return state

    segments = []
    for most in (4000, 700, 11000):
        n = draw() % (most + 1)
        segments.append(bytes(draw() & 0xFF for _ in range(n)))
    return segments


def run_firmware(elf, cwd, kill_after: float | None) -> tuple[list[str], int]:
    """Start QEMU, and kill it (SIGKILL: no chance to finish anything) kill_after seconds after its first line."""
    with open(cwd / "qemu.stderr", "w") as stderr:
        proc = subprocess.Popen(["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-semihosting", "-kernel",
                                 str(elf)], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
        watchdog = threading.Timer(120, proc.kill)  # a firmware that hangs fails the test instead of blocking it
        watchdog.start()
        try:
            first = proc.stdout.readline()
            if kill_after is not None:
                time.sleep(kill_after)
                proc.send_signal(signal.SIGKILL)
            rest = proc.stdout.read()  # through the same buffer readline filled
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    lines = (first + rest).split("\n")
    return lines[:-1], proc.returncode  # the last piece is empty or a line cut by the kill


def test_store_survives_qemu_killed_at_random_points(tmp_path):
    require_tool("make")
    require_tool("arm-none-eabi-gcc")
    require_tool("qemu-system-arm")
    elf = cstore.build_store_test_firmware(tmp_path / "cache")
    image = tmp_path / "fedtiny_flash.bin"
    rng = random.Random(21)
    saved, torn = 0, 0  # the last generation the firmware said it saved; kills that cut a save in the middle
    for run in range(13):
        last = run == 12
        lines, code = run_firmware(elf, tmp_path, None if last else rng.uniform(0.0, 0.3))
        assert lines, f"no output (exit {code})"
        if run == 0:
            assert lines[0] == "empty"
            start = 0
        else:
            m = re.fullmatch(r"loaded (\d+)", lines[0])
            assert m, lines[0]
            start = int(m.group(1))
            assert saved <= start <= saved + 1, "the record after a kill is the last saved or the one in progress"
        saves = [int(line.split()[1]) for line in lines[1:] if line.startswith("saved ")]
        assert saves == list(range(start + 1, start + 1 + len(saves))), lines[:5]
        saved = saves[-1] if saves else start
        flash = image.read_bytes()
        assert len(flash) == 2 * QEMU_BANK
        newest = parse_newest(flash, QEMU_BANK, 2, QEMU_UNIT)
        assert newest is not None and newest[0] in (saved, saved + 1)
        assert newest[1] == firmware_content(newest[0]), "the newest record is whole, in Python's reading too"
        older = [parse_bank(flash, b, QEMU_BANK, QEMU_UNIT) for b in range(2)]
        torn += not any(r is not None and r[0] == newest[0] - 1 for r in older)
        if last:
            assert code == 0 and lines[-1] == "done" and len(saves) == QEMU_SAVES
    print(f"QEMU killed 12 times, {torn} of them inside a save")
    assert torn >= 1, "no kill landed inside a save: the test did not test"


def node_record(state_struct: bytes, model: bytes, personal: bytes) -> list[bytes]:
    """The six segments firmware_node.c's persist writes: plan hash, state numbers, global model, carry, upload,
    personalised model."""
    return [b"H" * 32, state_struct, model, b"\x00" * 40, b"U" * 100, personal]


def test_a_power_cut_while_saving_a_new_personalised_model_leaves_the_old_or_the_new(lib):
    """Records of the node's layout: none yet, a first personalised model, a second one (each save changes only
    the state numbers and the personalised segment). A cut after every programmed byte of the sequence (and torn
    garbage), then a load: the record before the cut or the one in progress, whole, never a mix."""
    rng = random.Random(5)
    model = bytes(rng.getrandbits(8) for _ in range(120))
    sequence = [node_record(b"\x01" * 64, model, b""),
                node_record(b"\x02" * 64, model, bytes(rng.getrandbits(8) for _ in range(120))),
                node_record(b"\x03" * 64, model, bytes(rng.getrandbits(8) for _ in range(120)))]
    bank_size, bank_count, unit = 1024, 2, 8
    totals = [t[0] for t in trace(lib, sequence, bank_size, bank_count, unit)]
    for cut in range(totals[0], totals[-1]):  # every byte of the saves that write a personalised model
        for garble in (False, True):
            flash, _, failed = save_with_cut(lib, sequence, cut, garble, bank_size, bank_count, unit)
            assert failed >= 1
            check_after_cut(lib, flash, sequence, failed, bank_count, unit)
