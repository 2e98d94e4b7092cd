"""Model files: a round trip changes nothing; anything else (truncated, corrupted, foreign, newer, wrong kind,
structurally invalid) is a FileFormatError that says what is wrong, and `fedtiny inspect` reports it in one line.
"""

import copy
import hashlib
import io
import re
import struct
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fedtiny import fileformat
from fedtiny.cli import main
from fedtiny.fileformat import FileFormatError
from fedtiny.modelfile import KIND, _header, from_bytes, load_model, save_model, to_bytes
from fedtiny.quantize import quantize
from fedtiny.interpreter import quantize_input, run

FIXED = struct.Struct("<4sH4sII")  # magic, version, kind, header length, blob length (see fedtiny.fileformat)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 2, 6, 6)).astype(np.float32)
    return quantize(Net().eval(), x, name="net", classes=["a", "b", "c"])


@pytest.fixture(scope="module")
def data(graph):
    return to_bytes(graph)


@pytest.fixture(scope="module")
def x(graph):
    return quantize_input(graph, np.random.default_rng(1).normal(size=(32, 2, 6, 6)).astype(np.float32))


def _resign(body: bytes) -> bytes:
    """A file whose checksum is valid again after the body was edited."""
    return body + hashlib.sha256(body).digest()


def _rewrite_fixed(data: bytes, **fields) -> bytes:
    values = dict(zip(("magic", "version", "kind", "head_len", "blob_len"), FIXED.unpack_from(data)))
    values.update(fields)
    body = FIXED.pack(*values.values()) + data[FIXED.size:-32]
    return _resign(body)


# ---------------------------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------------------------

def test_save_load_round_trip_gives_identical_outputs(graph, x, tmp_path):
    path = tmp_path / "net.ftm"
    save_model(graph, path)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, no leftover
    loaded = load_model(path)
    assert loaded.inputs == graph.inputs and loaded.outputs == graph.outputs and loaded.meta == graph.meta
    assert [(o.kind, o.inputs, o.outputs, o.attrs, o.origin) for o in loaded.ops] == \
        [(o.kind, o.inputs, o.outputs, o.attrs, o.origin) for o in graph.ops]
    for name, t in graph.tensors.items():
        u = loaded.tensors[name]
        assert (u.shape, u.dtype, u.zero_point) == (t.shape, t.dtype, t.zero_point)
        np.testing.assert_array_equal(u.scale, t.scale)
        if t.is_constant:
            assert u.data.dtype == t.data.dtype
            np.testing.assert_array_equal(u.data, t.data)
    for name, v in run(graph, x, keep=True).items():
        np.testing.assert_array_equal(run(loaded, x, keep=True)[name], v, err_msg=name)
    assert to_bytes(loaded) == to_bytes(graph)  # byte-identical when written again


def test_bytes_round_trip(graph, data, x):
    np.testing.assert_array_equal(run(from_bytes(data), x), run(graph, x))


# ---------------------------------------------------------------------------------------------------------------
# Damaged files
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["empty", "in magic", "end of fixed header", "in header", "in blob",
                                   "in checksum", "last byte missing"])
def test_truncated_file_is_refused(data, where):
    _, _, _, head_len, blob_len = FIXED.unpack_from(data)
    cut = {"empty": 0, "in magic": 2, "end of fixed header": FIXED.size, "in header": FIXED.size + head_len // 2,
           "in blob": FIXED.size + head_len + blob_len // 2, "in checksum": len(data) - 16,
           "last byte missing": len(data) - 1}[where]
    with pytest.raises(FileFormatError, match="truncated"):
        from_bytes(data[:cut])


def test_every_flipped_byte_is_refused(data):
    """No single damaged byte anywhere loads, and nothing but FileFormatError ever escapes."""
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0xFF
        with pytest.raises(FileFormatError):
            from_bytes(bytes(damaged))



def _flip(data, offset):
    damaged = bytearray(data)
    damaged[offset] ^= 0xFF
    return bytes(damaged)


def _grow_field(data, offset):
    (value,) = struct.unpack_from("<I", data, offset)
    return data[:offset] + struct.pack("<I", value + 1) + data[offset + 4:]


def _shrink_field(data, offset):
    (value,) = struct.unpack_from("<I", data, offset)
    return data[:offset] + struct.pack("<I", value - 1) + data[offset + 4:]


DAMAGE = [
    pytest.param(lambda d: _flip(d, 4), id="version byte"),
    pytest.param(lambda d: _flip(d, 7), id="kind byte"),
    pytest.param(lambda d: _grow_field(d, 10), id="header length grown"),
    pytest.param(lambda d: _shrink_field(d, 10), id="header length shrunk"),
    pytest.param(lambda d: _grow_field(d, 14), id="blob length grown"),
    pytest.param(lambda d: _shrink_field(d, 14), id="blob length shrunk"),
    pytest.param(lambda d: _flip(d, FIXED.size + 1), id="header first bytes"),
    pytest.param(lambda d: _flip(d, FIXED.size + FIXED.unpack_from(d)[3] // 2), id="header middle"),
    pytest.param(lambda d: _flip(d, len(d) - 40), id="blob"),
    pytest.param(lambda d: _flip(d, len(d) - 32), id="checksum first byte"),
    pytest.param(lambda d: _flip(d, len(d) - 1), id="checksum last byte"),
]


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_file_says_it_is_corrupted_or_truncated(data, damage):
    with pytest.raises(FileFormatError) as err:
        from_bytes(damage(data))
    assert re.search(r"corrupt|truncat", str(err.value)), str(err.value)


def test_damaged_magic_is_not_a_fedtiny_file(data):
    with pytest.raises(FileFormatError, match="not a fedtiny file"):
        from_bytes(_flip(data, 0))


def test_bytes_after_the_checksum_are_refused(data):
    with pytest.raises(FileFormatError, match="unexpected bytes"):
        from_bytes(data + b"\0")


def _zip_bytes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.txt", "not a model")
    return buf.getvalue()


@pytest.mark.parametrize("foreign", [
    pytest.param(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + bytes(64), id="png"),
    pytest.param(_zip_bytes(), id="zip"),
    pytest.param(b"name,label\n" * 10, id="csv text"),
    pytest.param(b"\x7fELF" + bytes(60), id="elf"),
])
def test_foreign_file_is_refused(foreign, tmp_path):
    path = tmp_path / "foreign.bin"
    path.write_bytes(foreign)
    with pytest.raises(FileFormatError, match="not a fedtiny file") as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_missing_file_is_a_file_format_error(tmp_path):
    with pytest.raises(FileFormatError, match="cannot read"):
        load_model(tmp_path / "absent.ftm")


def test_newer_format_version_asks_for_an_upgrade(data):
    newer = _rewrite_fixed(data, version=fileformat.FORMAT_VERSION + 1)
    with pytest.raises(FileFormatError, match=r"version 2 is newer.*upgrade"):
        from_bytes(newer)


def test_version_zero_is_invalid(data):
    with pytest.raises(FileFormatError, match="invalid format version 0"):
        from_bytes(_rewrite_fixed(data, version=0))


def test_wrong_kind_is_refused(data):
    assert KIND == b"MODL"
    with pytest.raises(FileFormatError, match="'PLAN'.*'MODL'"):
        from_bytes(_rewrite_fixed(data, kind=b"PLAN"))


# ---------------------------------------------------------------------------------------------------------------
# Valid container, invalid model: always FileFormatError
# ---------------------------------------------------------------------------------------------------------------

def _constant(header, suffix):
    return next(t for t in header["tensors"] if t["name"].endswith(suffix))


def _set(path, value):
    def edit(header, arrays):
        target = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _weight_shape(header, arrays):
    _constant(header, ".weight")["shape"][1] += 1


def _weight_array(header, arrays):
    name = _constant(header, ".weight")["name"]
    arrays[name] = arrays[name][:, :-1]


def _missing_array(header, arrays):
    del arrays[_constant(header, ".bias")["name"]]


def _tensor_written_twice(header, arrays):
    header["ops"][1]["outputs"] = list(header["ops"][0]["outputs"])


def _ops_out_of_order(header, arrays):
    header["ops"][0], header["ops"][1] = header["ops"][1], header["ops"][0]


INVALID = {
    "op reads an undefined tensor": _set(["ops", 1, "inputs"], ["nowhere"]),
    "unknown op kind": _set(["ops", 0, "kind"], "softmax"),
    "weight shape in header does not fit": _weight_shape,
    "weight array does not match its header shape": _weight_array,
    "constant without its array": _missing_array,
    "tensor written twice": _tensor_written_twice,
    "ops out of order": _ops_out_of_order,
    "op without attribute": lambda h, a: h["ops"][0]["attrs"].pop("multiplier"),
    "wrong arity": _set(["ops", 1, "inputs"], []),
    "groups 0": _set(["ops", 0, "attrs", "groups"], 0),
    "groups not a number": _set(["ops", 0, "attrs", "groups"], "two"),
    "padding too short": _set(["ops", 0, "attrs", "padding"], [1]),
    "unknown tensor dtype": _set(["tensors", 0, "dtype"], "int4"),
    "shape not numbers": _set(["tensors", 0, "shape"], "abc"),
    "two inputs": lambda h, a: h["inputs"].append(h["outputs"][0]),
    "output has no tensor": _set(["outputs"], ["ghost"]),
    "no ops key": lambda h, a: h.pop("ops"),
    "ops not a list": _set(["ops"], None),
    "tensors not a list of objects": _set(["tensors"], {"a": 1}),
    "meta not an object": _set(["meta"], 5),
    "attrs not an object": _set(["ops", 0, "attrs"], [1]),
}

# Invalid models that once escaped as other exceptions or loaded without complaint.
INVALID_GAPS = {
    "stride 0 (ZeroDivisionError in ir.output_shape)": _set(["ops", 0, "attrs", "stride"], [0, 1]),
    "activation of rank 2 (IndexError in ir._check_shapes)": _set(["tensors", 0, "shape"], [6, 12]),
    "weight array float64 though declared int8 (loads)": lambda h, a: a.update(
        {k: v.astype(np.float64) for k, v in a.items() if k.endswith(".weight")}),
    "zero point 1000 (loads)": _set(["tensors", 0, "zero_point"], 1000),
    "empty scale (loads)": _set(["tensors", 0, "scale"], []),
}


def _edited(graph, edit):
    header = copy.deepcopy(_header(graph))
    arrays = {t.name: t.data for t in graph.constants}
    edit(header, arrays)
    return fileformat.dumps(KIND, header, arrays)  # a valid container: checksum and lengths are right


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_graph_with_valid_checksum_is_a_file_format_error(graph, case):
    with pytest.raises(FileFormatError, match="invalid model"):
        from_bytes(_edited(graph, INVALID[case]))


@pytest.mark.parametrize("case", list(INVALID_GAPS), ids=list(INVALID_GAPS))
def test_invalid_graph_gaps(graph, case):
    with pytest.raises(FileFormatError, match="invalid model"):
        from_bytes(_edited(graph, INVALID_GAPS[case]))


def test_malformed_header_json_is_a_file_format_error(data):
    _, _, _, head_len, blob_len = FIXED.unpack_from(data)
    body = FIXED.pack(b"FTNY", 1, b"MODL", 5, blob_len) + b"{oops" + data[FIXED.size + head_len:-32]
    with pytest.raises(FileFormatError, match="malformed header"):
        from_bytes(_resign(body))


def test_array_outside_the_blob_is_a_file_format_error(graph):
    header = _header(graph)
    arrays = {t.name: t.data for t in graph.constants}
    data = fileformat.dumps(KIND, header, arrays)
    _, _, _, head_len, blob_len = FIXED.unpack_from(data)
    head = data[FIXED.size:FIXED.size + head_len].replace(b'"offset":0', b'"offset":999999', 1)
    body = FIXED.pack(b"FTNY", 1, b"MODL", len(head), blob_len) + head + data[FIXED.size + head_len:-32]
    with pytest.raises(FileFormatError, match="outside the blob"):
        from_bytes(_resign(body))


# ---------------------------------------------------------------------------------------------------------------
# fedtiny inspect
# ---------------------------------------------------------------------------------------------------------------

def test_inspect_prints_ops_shapes_flash_and_sram(graph, tmp_path):
    path = tmp_path / "net.ftm"
    save_model(graph, path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    for op in graph.ops:
        assert op.kind in out and op.origin in out
    assert "(6, 6, 4)" in out and "(3, 3, 4)" in out and "(1, 1, 36)" in out and "(1, 1, 3)" in out
    assert re.search(r"^flash .*: \d+ bytes$", out, re.M)
    assert re.search(r"^SRAM .*: \d+ bytes$", out, re.M)
    assert re.search(r"^parameters: \d+$", out, re.M)


@pytest.mark.parametrize("content", [
    pytest.param(lambda d: d[: len(d) // 2], id="truncated"),
    pytest.param(lambda d: _flip(d, len(d) // 2), id="flipped byte"),
    pytest.param(lambda d: b"\x89PNG\r\n\x1a\n" + bytes(32), id="png"),
    pytest.param(lambda d: _rewrite_fixed(d, kind=b"PLAN"), id="plan"),
])
def test_inspect_on_a_bad_file_exits_with_a_one_line_error(data, tmp_path, content):
    path = tmp_path / "bad.ftm"
    path.write_bytes(content(data))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2  # bad input
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an exception escaping the command
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(path) in lines[0], result.output


def test_container_arrays_keep_their_dtype_in_either_byte_order_and_refuse_others():
    arrays = {f"{name}{order}": np.arange(-3, 4).astype(np.dtype(name).newbyteorder(order))
              for name in ("int8", "uint8", "int16", "int32", "int64", "float32", "float64") for order in "<>"}
    arrays = {k: v if not k.startswith("uint8") else np.arange(7, dtype=np.uint8) for k, v in arrays.items()}
    header, back = fileformat.loads(fileformat.dumps(b"TEST", {}, arrays), b"TEST")
    for name, values in arrays.items():
        assert back[name].dtype.name == values.dtype.name and back[name].dtype.isnative
        np.testing.assert_array_equal(back[name], values)
    for other in (np.float16, np.bool_, np.uint16, np.complex64):
        with pytest.raises(ValueError, match="unsupported dtype"):
            fileformat.dumps(b"TEST", {}, {"x": np.zeros(2, other)})
