"""`fedtiny import MODEL.tflite`: a model made by tools nobody here wrote (a Keras 1D model converted by the TFLite
converter with full integer quantization, tests/fixtures/make_tflite_fixture.py) is read into fedtiny's graph and

- agrees with the original runtime (LiteRT, ai-edge-litert) on real data (sklearn's 1,797 digits): its builtin
  integer kernels, reference and optimized, give the same int8 logits on at least 99 % of the values and none
  more than 1 step apart; XNNPACK, LiteRT's default delegate, requantizes in float, so there the predicted class
  must be the same on every sample;
- compiles and trains bit for bit in C (CTrainer == the Python Trainer after 100 steps, as tests/test_ctrainer.py);
- bad input is one line and exit code 2: an op fedtiny cannot run (named with its index), a file that is no
  TFLite model.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import require_module
from fedtiny.compiler import compile_plan
from fedtiny.interpreter import quantize_input, run
from fedtiny.modelfile import load_model
from fedtiny.scheme import parse
from test_user_input import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
TFLITE = FIXTURES / "digits_rows_int8.tflite"
# CONCATENATION of two branches, a MUL gate broadcast over the length, a MUL of two maps (make_tflite_fixture.py blocks)
TFLITE_BLOCKS = FIXTURES / "digits_rows_blocks_int8.tflite"
sys.path.insert(0, str(FIXTURES))
from make_tflite_fixture import digits_rows  # noqa: E402  (the data the fixture was trained on)


@pytest.fixture(scope="module")
def imported():
    require_module("tflite", "import")
    from fedtiny.importer import import_model

    return import_model(TFLITE)


@pytest.fixture(scope="module")
def digits(imported):
    """(int8 samples (N, 1, 8, 8) in the model's input quantization, labels): Keras' (N, length, channels) is
    fedtiny's PyTorch-layout (N, channels, length)."""
    graph, _ = imported
    x, y = digits_rows()
    return quantize_input(graph, x.transpose(0, 2, 1)), y


def litert_int8(tensors: list[str], x, resolver: str, path: Path = TFLITE) -> list[np.ndarray]:
    """LiteRT's int8 values of the named fedtiny tensors (the importer names activations t<TFLite tensor index>),
    each (N, values) in LiteRT's (and fedtiny's) channels-last order."""
    require_module("ai_edge_litert", "dev")
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=getattr(OpResolverType, resolver),
                              experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    out = [[] for _ in tensors]
    for sample in x:
        interpreter.set_tensor(inp["index"], sample.reshape(inp["shape"]))
        interpreter.invoke()
        for values, name in zip(out, tensors):
            values.append(interpreter.get_tensor(int(name.removeprefix("t"))).reshape(-1).copy())
    return [np.array(values) for values in out]


def litert_logits(graph, x, resolver: str, path: Path = TFLITE) -> np.ndarray:
    """LiteRT's int8 values of the tensor fedtiny's output stands for (the logits before the dropped SOFTMAX)."""
    return litert_int8([graph.outputs[0]], x, resolver, path)[0]


def test_import_reads_the_converter_s_ops_and_drops_only_the_final_softmax(imported):
    graph, notes = imported
    assert [op.kind for op in graph.ops] == ["conv2d", "maxpool2d", "conv2d", "conv2d", "add", "conv2d", "conv2d"]
    assert graph.ops[2].attrs["groups"] == 16  # DEPTHWISE_CONV_2D
    assert [op.attrs["activation"] for op in graph.ops if op.kind in ("conv2d", "add")] == \
        ["relu", "relu", "none", "relu", "none", "none"]  # Keras' ReLUs fused by the converter
    assert graph.meta["input_shape"] == [8, 8] and graph.tensors[graph.outputs[0]].shape == (1, 1, 10)
    assert any("SOFTMAX" in n for n in notes)


@pytest.mark.parametrize("resolver", ["BUILTIN_REF", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"])
def test_imported_model_gives_litert_s_int8_logits(imported, digits, resolver):
    graph, _ = imported
    x, y = digits
    ours = run(graph, x).reshape(len(x), -1).astype(np.int64)
    theirs = litert_logits(graph, x, resolver).astype(np.int64)
    apart = np.abs(ours - theirs)
    assert (apart == 0).mean() >= 0.99, f"only {100 * (apart == 0).mean():.2f} % of the int8 logits are identical"
    assert apart.max() <= 1, f"{int((apart > 1).sum())} logits more than 1 step apart"
    assert (ours.argmax(axis=1) == y).mean() > 0.9  # the model is a real one: it reads digits


def test_imported_model_predicts_litert_s_classes_with_xnnpack(imported, digits):
    graph, _ = imported
    x, _ = digits
    ours = run(graph, x).reshape(len(x), -1)
    theirs = litert_logits(graph, x, "AUTO")  # XNNPACK: float requantization
    assert (ours.argmax(axis=1) == theirs.argmax(axis=1)).all()


@pytest.fixture(scope="module")
def blocks_imported():
    require_module("tflite", "import")
    from fedtiny.importer import import_model

    graph, _ = import_model(TFLITE_BLOCKS)
    x, y = digits_rows()
    return graph, quantize_input(graph, x.transpose(0, 2, 1)), y


def test_tflite_blocks_import_concatenation_and_mul(blocks_imported):
    graph, x, y = blocks_imported
    kinds = [op.kind for op in graph.ops]
    assert (kinds.count("cat"), kinds.count("mul")) == (1, 2), kinds
    gate = next(op for op in graph.ops if op.kind == "mul")
    assert graph.tensors[gate.inputs[1]].shape == (1, 1, 16)  # the gate broadcasts over the length
    ours = run(graph, x).reshape(len(x), -1)
    theirs = litert_logits(graph, x, "BUILTIN_REF", TFLITE_BLOCKS)
    assert (ours.argmax(axis=1) == theirs.argmax(axis=1)).all() and (ours.argmax(axis=1) == y).mean() > 0.9


@pytest.mark.parametrize("resolver", ["BUILTIN_REF", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"])
def test_tflite_blocks_ops_agree_with_litert_op_by_op(blocks_imported, resolver):
    """Each op on LiteRT's own int8 inputs (end to end, LiteRT's optimized kernels are up to 3 steps away on a
    logit: a one-step difference in a conv's output is multiplied by the MUL after it)."""
    from fedtiny.interpreter import FORWARD

    graph, x, _ = blocks_imported
    activations = [n for n in graph.tensors if n.startswith("t") and not graph.tensors[n].is_constant]
    theirs = dict(zip(activations, litert_int8(activations, x, resolver, TFLITE_BLOCKS)), input=x.reshape(len(x), -1))
    for op in graph.ops:
        args = [graph.tensors[n].data if graph.tensors[n].is_constant else
                theirs[n].reshape((len(x), *graph.tensors[n].shape)) for n in op.inputs]
        ours = FORWARD[op.kind](graph, op, *args).reshape(len(x), -1).astype(np.int64)
        apart = np.abs(ours - theirs[op.outputs[0]].astype(np.int64))
        assert (apart == 0).mean() >= 0.99, f"{op.origin}: {100 * (apart == 0).mean():.2f} % identical"
        assert apart.max() <= 1, f"{op.origin}: {int((apart > 1).sum())} values more than 1 step apart"


def test_tflite_blocks_trains_bit_exactly_in_c_through_cat_and_mul(blocks_imported, cache):
    from test_ctrainer import assert_same_state, python_reference
    from test_cruntime import need

    from fedtiny_device import cruntime

    need("gcc", "make")
    graph, x, y = blocks_imported
    plan = compile_plan(graph, parse("full", graph))
    expected = python_reference(plan, x[:100], y[:100], seed=3)
    trainer = cruntime.CTrainer(plan, seed=3, cache_dir=cache)
    for xi, yi in zip(x[:100], y[:100]):
        trainer.step(xi, int(yi))
    assert_same_state(trainer.trainable_state(), expected.trainable_state(), "imported tflite blocks full")


@pytest.mark.parametrize("scheme", ["last:2", "full"])
def test_imported_model_trains_bit_exactly_in_c(imported, digits, scheme, cache):
    from test_ctrainer import assert_same_state, python_reference
    from test_cruntime import need

    from fedtiny_device import cruntime
    from fedtiny_device.trainer import Trainer

    need("gcc", "make")
    graph, _ = imported
    x, y = digits
    plan = compile_plan(graph, parse(scheme, graph))
    expected = python_reference(plan, x[:100], y[:100], seed=3)
    trainer = cruntime.CTrainer(plan, seed=3, cache_dir=cache)
    for xi, yi in zip(x[:100], y[:100]):
        trainer.step(xi, int(yi))
    assert_same_state(trainer.trainable_state(), expected.trainable_state(), f"imported {scheme}")
    assert trainer.rng_counter == expected.rng_counter
    assert any(not np.array_equal(v, Trainer(plan, 3).trainable_state()[k])
               for k, v in trainer.trainable_state().items()), "100 steps changed nothing"


def test_cli_import_writes_a_model_that_compiles(tmp_path):
    require_module("tflite", "import")
    result = run_cli("import", TFLITE, "-o", tmp_path / "digits.ftm")
    assert result.exit_code == 0, result.output
    assert "FULLY_CONNECTED" in result.stdout and "dropped the final SOFTMAX" in result.stderr
    graph = load_model(tmp_path / "digits.ftm")
    assert graph.meta["source"] == "tflite" and len(graph.ops) == 7
    result = run_cli("compile", tmp_path / "digits.ftm", "--scheme", "last:2")
    assert result.exit_code == 0, result.output
    assert "plan: scheme last:2" in result.stdout


def _with_opcode(data: bytes, old: int, new: int) -> bytes:
    """The model with every operator code `old` (a builtin) rewritten to `new`, in place in the flatbuffer."""
    import tflite

    patched = bytearray(data)
    model = tflite.Model.GetRootAsModel(data, 0)
    for j in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(j)
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) == old:
            for field, size in ((4, 1), (10, 4)):  # deprecated_builtin_code int8, builtin_code int32
                offset = code._tab.Offset(field)
                assert offset, "the converter writes both opcode fields"
                patched[code._tab.Pos + offset: code._tab.Pos + offset + size] = new.to_bytes(size, "little")
    assert patched != bytearray(data)
    return bytes(patched)


def test_unsupported_op_is_one_line_naming_it_and_exit_2(tmp_path):
    require_module("tflite", "import")
    bad = tmp_path / "logistic.tflite"
    bad.write_bytes(_with_opcode(TFLITE.read_bytes(), old=17, new=14))  # MAX_POOL_2D -> LOGISTIC
    result = run_cli("import", bad, "-o", tmp_path / "x.ftm")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TFLite op 4 (LOGISTIC): not supported" in lines[0], result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "x.ftm").exists()


@pytest.mark.parametrize("content", [b"", b"not a flatbuffer at all", b"\x10\x00\x00\x00TFL3" + b"\xff" * 40])
def test_a_file_that_is_no_tflite_model_is_one_line_exit_2(tmp_path, content):
    require_module("tflite", "import")
    bad = tmp_path / "broken.tflite"
    bad.write_bytes(content)
    result = run_cli("import", bad, "-o", tmp_path / "x.ftm")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "broken.tflite" in result.stderr


@pytest.fixture(scope="module")
def imported_files(tmp_path_factory, imported):
    """The imported model as a .ftm and the digits as a user's .npz in PyTorch layout (N, channels, length)."""
    from fedtiny.modelfile import save_model

    folder = tmp_path_factory.mktemp("imported")
    save_model(imported[0], folder / "digits.ftm")
    x, y = digits_rows()
    np.savez(folder / "digits_rows.npz", X=x.transpose(0, 2, 1), y=y)
    return folder


def test_imported_model_trains_in_simulate(imported_files, tmp_path):
    """A .ftm model skips pretraining and quantization: the run starts from the imported weights."""
    from fedtiny_sim.simulate import SimulationConfig, simulate

    result = simulate(SimulationConfig(nodes=3, rounds=2, data=str(imported_files / "digits_rows.npz"), scheme="last:2",
                                       model=str(imported_files / "digits.ftm"), out=str(tmp_path / "run"), seed=1))
    assert result["initial_accuracy"] > 0.9  # the Keras model's own accuracy, not a freshly trained one's
    assert len(result["rounds"]) == 2 and result["rounds"][-1]["accuracy"] > 0.9
    assert (tmp_path / "run" / "global.ftm").exists()


@pytest.mark.parametrize("x_shape, classes, problem", [((100, 8, 6), 10, "takes samples of shape (8, 8)"),
                                                       ((100, 8, 8), 4, "gives 10 logits, the data has 4 classes")])
def test_simulate_refuses_data_that_does_not_fit_the_model_file(imported_files, tmp_path, x_shape, classes, problem):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "other.npz", X=rng.normal(size=x_shape), y=np.arange(x_shape[0]) % classes)
    result = run_cli("simulate", "--model", imported_files / "digits.ftm", "--data", tmp_path / "other.npz",
                     "--nodes", 2, "--rounds", 1, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert problem in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()


# --- ONNX: a PyTorch model exported by torch.onnx and quantized to QDQ int8 by onnxruntime's quantize_static ------
# (tests/fixtures/make_onnx_fixture.py). onnxruntime runs the QDQ graph as it is written (DequantizeLinear, the op
# in float, QuantizeLinear) at its basic optimization level: that is the graph's definition, and fedtiny's fixed-point
# requantization differs from it by a rounding now and then, so each op is checked on onnxruntime's own int8 inputs
# and the whole model by its predicted classes. (With its extended optimizations, onnxruntime 1.32 fuses the QDQ
# pairs into int8 kernels whose results differ from that definition by up to 22 steps on this machine's CPU.)

ONNX = FIXTURES / "digits_rows_qdq.onnx"
ONNX_BLOCKS = FIXTURES / "digits_rows_blocks_qdq.onnx"  # Concat, a broadcast Mul gate, Mul of two maps, Sigmoid
ONNX_UINT8 = FIXTURES / "digits_rows_qdq_uint8.onnx"  # the first model with uint8 activations (QUInt8)
# The first two models in quantize_static's QOperator format (QLinearConv, QGemm, QLinearAdd, QLinearConcat, ...):
# onnxruntime runs these int8 kernels themselves, and the file's quantization parameters are those ops' inputs
ONNX_QOP = FIXTURES / "digits_rows_qop.onnx"
ONNX_QOP_BLOCKS = FIXTURES / "digits_rows_blocks_qop.onnx"
ONNX_QOP_UINT8 = FIXTURES / "digits_rows_qop_uint8.onnx"


@pytest.fixture(scope="module")
def onnx_imported():
    require_module("onnx", "dev")
    from fedtiny.importer import import_model

    return import_model(ONNX)[0]


@pytest.fixture(scope="module", params=[ONNX, ONNX_BLOCKS, ONNX_UINT8, ONNX_QOP, ONNX_QOP_BLOCKS, ONNX_QOP_UINT8],
                ids=["residual", "blocks", "uint8", "qop", "qop_blocks", "qop_uint8"])
def onnx_case(request):
    """(file, imported graph) of each quantize_static fixture."""
    require_module("onnx", "dev")
    from fedtiny.importer import import_model

    return request.param, import_model(request.param)[0]


@pytest.fixture(scope="module")
def onnx_digits():
    from make_onnx_fixture import digits_rows_torch

    return digits_rows_torch()


def onnxruntime_int8(tensors: list[str], x: np.ndarray, path: Path = ONNX) -> list[np.ndarray]:
    """onnxruntime's int8 values of the named QuantizeLinear outputs, per sample, in fedtiny's (N, H, W, C)."""
    require_module("onnxruntime", "dev")
    import onnx
    import onnxruntime as ort

    model = onnx.load(path)
    # quantize_static quantizes every activation to one type (QInt8 or QUInt8) and the weights to int8: a uint8
    # initializer (a zero point) means uint8 activations (onnxruntime refuses a wrongly typed output)
    uint8 = any(t.data_type == onnx.TensorProto.UINT8 for t in model.graph.initializer)
    for name in tensors:
        kind = onnx.TensorProto.UINT8 if uint8 else onnx.TensorProto.INT8
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, kind, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    per_sample = [session.run(tensors, {"x": sample[None]}) for sample in x]
    out = []
    for k in range(len(tensors)):
        a = np.concatenate([r[k] for r in per_sample])
        if a.dtype == np.uint8:  # a QUInt8 model's values: as the int8 ones fedtiny imports (u - 128)
            a = (a.astype(np.int16) - 128).astype(np.int8)
        out.append(a.transpose(0, 2, 1)[:, None] if a.ndim == 3 else
                   a.transpose(0, 2, 3, 1) if a.ndim == 4 else a[:, None, None, :])
    return out


def onnx_tensor_of(graph, path: Path = ONNX) -> dict[str, str]:
    """fedtiny's tensor -> the int8 ONNX tensor it stands for (the importer names them n<ONNX node index>): the
    QuantizeLinear output after the node in a QDQ model, the node's own output in a QOperator one."""
    import onnx

    nodes = list(onnx.load(path).graph.node)
    names = {"input": next(n.output[0] for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] == "x")}
    for name in graph.tensors:
        if name.startswith("n") and name[1:].isdigit():
            produced = nodes[int(name[1:])].output[0]
            names[name] = next((n.output[0] for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] == produced),
                               produced)
    return names


def test_onnx_import_reads_quantize_static_s_qdq_graph(onnx_imported):
    graph = onnx_imported
    assert [op.kind for op in graph.ops] == ["conv2d", "maxpool2d", "conv2d", "conv2d", "add", "conv2d", "conv2d"]
    assert graph.ops[2].attrs["groups"] == 16 and graph.meta["input_shape"] == [8, 8]
    # quantize_static drops a ReLU after a conv or an add, and starts the output's range at 0 instead
    assert [op.attrs["activation"] for op in graph.ops if op.kind in ("conv2d", "add")] == \
        ["relu", "relu", "none", "relu", "none", "none"]


def test_onnx_blocks_import_concat_mul_and_sigmoid():
    require_module("onnx", "dev")
    from fedtiny.importer import import_model

    graph = import_model(ONNX_BLOCKS)[0]
    kinds = [op.kind for op in graph.ops]
    assert (kinds.count("cat"), kinds.count("mul"), kinds.count("lut")) == (1, 2, 2), kinds
    gate = next(op for op in graph.ops if op.kind == "mul")
    assert graph.tensors[gate.inputs[1]].shape == (1, 1, 16)  # the gate broadcasts over the length


def test_onnx_ops_agree_with_onnxruntime_op_by_op(onnx_case, onnx_digits):
    from fedtiny.interpreter import FORWARD

    path, graph = onnx_case
    x, _ = onnx_digits
    names = onnx_tensor_of(graph, path)
    activations = [n for n in graph.tensors if not graph.tensors[n].is_constant]
    theirs = dict(zip(activations, onnxruntime_int8([names[n] for n in activations], x, path)))
    for op in graph.ops:
        args = [graph.tensors[n].data if graph.tensors[n].is_constant else theirs[n] for n in op.inputs]
        ours = FORWARD[op.kind](graph, op, *args).reshape(len(x), -1).astype(np.int64)
        apart = np.abs(ours - theirs[op.outputs[0]].reshape(len(x), -1).astype(np.int64))
        assert (apart == 0).mean() >= 0.99, f"{op.origin}: {100 * (apart == 0).mean():.2f} % identical"
        assert apart.max() <= 1, f"{op.origin}: {int((apart > 1).sum())} values more than 1 step apart"


def test_onnx_model_predicts_onnxruntime_s_classes(onnx_case, onnx_digits):
    path, graph = onnx_case
    x, y = onnx_digits
    ours = run(graph, quantize_input(graph, x)).reshape(len(x), -1)
    (theirs,) = onnxruntime_int8([onnx_tensor_of(graph, path)[graph.outputs[0]]], x, path)
    theirs = theirs.reshape(len(x), -1).astype(np.int64)
    same = ours.argmax(axis=1) == theirs.argmax(axis=1)
    # a one-step rounding may only turn a near tie: where onnxruntime's top logit leads by more than one step, the
    # class is the same (the QOperator uint8 model's 7-bit weights leave 3 of 1797 digits one step from a tie)
    top2 = np.sort(theirs, axis=1)[:, -2:]
    assert same[top2[:, 1] - top2[:, 0] > 1].all() and same.mean() >= 0.995, f"{int((~same).sum())} classes differ"
    assert (ours.argmax(axis=1) == y).mean() > 0.9


def test_onnx_imported_model_trains_bit_exactly_in_c(onnx_case, onnx_digits, cache):
    from test_ctrainer import assert_same_state, python_reference
    from test_cruntime import need

    from fedtiny_device import cruntime

    need("gcc", "make")
    path, graph = onnx_case
    x, y = onnx_digits
    xq = quantize_input(graph, x[:100])
    full = path in (ONNX_BLOCKS, ONNX_QOP_BLOCKS)  # full: through cat, mul
    plan = compile_plan(graph, parse("full" if full else "last:2", graph))
    expected = python_reference(plan, xq, y[:100], seed=5)
    trainer = cruntime.CTrainer(plan, seed=5, cache_dir=cache)
    for xi, yi in zip(xq, y[:100]):
        trainer.step(xi, int(yi))
    assert_same_state(trainer.trainable_state(), expected.trainable_state(), "imported onnx last:2")


def test_onnx_unsupported_node_is_one_line_naming_it_and_exit_2(tmp_path):
    require_module("onnx", "dev")
    import onnx

    model = onnx.load(ONNX)
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    pool.op_type = "LpPool"
    onnx.save(model, tmp_path / "lppool.onnx")
    result = run_cli("import", tmp_path / "lppool.onnx", "-o", tmp_path / "x.ftm")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "(LpPool" in lines[0] and "not supported" in lines[0], result.stderr


def test_a_model_file_gets_the_samples_as_its_file_says(imported):
    """(N, F) data of a run is standardized with the run's statistics; a .ftm model pretrained elsewhere gets the
    raw samples (an imported model records none) or the standardization its file records."""
    from dataclasses import replace

    from fedtiny.datafile import Dataset
    from fedtiny_sim.scenarios import Task, fed_as_model_file

    rng = np.random.default_rng(0)
    raw = rng.normal(5.0, 3.0, (30, 4)).astype(np.float32)
    mean, std = raw.mean(axis=0), raw.std(axis=0)

    def dataset(x):
        return Dataset(x, np.arange(len(x)) % 2, np.zeros(len(x), np.int64), ("a", "b"), "d")

    task = Task("t", "m.ftm", dataset((raw[:10] - mean) / std), [dataset((raw[10:20] - mean) / std)],
                dataset((raw[20:] - mean) / std), (mean, std))
    graph = replace(imported[0], meta=dict(imported[0].meta))
    fed = fed_as_model_file(task, graph)
    np.testing.assert_allclose(fed.nodes[0].X, raw[10:20], rtol=1e-5)
    assert fed.standardization is None
    graph.meta["input_standardization"] = {"mean": [1.0] * 4, "std": [2.0] * 4}
    fed = fed_as_model_file(task, graph)
    np.testing.assert_allclose(fed.test.X, (raw[20:] - 1.0) / 2.0, rtol=1e-5)


def test_onnx_final_softmax_is_dropped_with_a_note(tmp_path):
    require_module("onnx", "dev")
    import onnx

    from fedtiny.importer import import_model

    model = onnx.load(ONNX)
    logits = model.graph.output[0]
    model.graph.node.append(onnx.helper.make_node("Softmax", [logits.name], ["probabilities"], axis=1))
    model.graph.output.remove(logits)
    model.graph.output.append(onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [1, 10]))
    onnx.save(model, tmp_path / "softmax.onnx")
    graph, notes = import_model(tmp_path / "softmax.onnx")
    assert graph.tensors[graph.outputs[0]].shape == (1, 1, 10) and graph.ops[-1].origin.endswith("Gemm")
    assert any("dropped the final Softmax" in n for n in notes)


def test_cli_imports_a_qoperator_onnx_model_that_compiles(tmp_path):
    require_module("onnx", "dev")
    result = run_cli("import", ONNX_QOP, "-o", tmp_path / "qop.ftm")
    assert result.exit_code == 0, result.output
    graph = load_model(tmp_path / "qop.ftm")
    assert graph.meta["source"] == "onnx" and [op.origin.split()[-1] for op in graph.ops] == \
        ["QLinearConv", "MaxPool", "QLinearConv", "QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"]
    result = run_cli("compile", tmp_path / "qop.ftm", "--scheme", "last:2")
    assert result.exit_code == 0, result.output
    assert "plan: scheme last:2" in result.stdout


def test_onnx_unsupported_qoperator_node_is_one_line_naming_it_and_exit_2(tmp_path):
    require_module("onnx", "dev")
    import onnx

    model = onnx.load(ONNX_QOP_BLOCKS)
    index, sigmoid = next((i, n) for i, n in enumerate(model.graph.node) if n.op_type == "QLinearSigmoid")
    sigmoid.op_type = "QLinearLeakyRelu"
    onnx.save(model, tmp_path / "leaky.onnx")
    result = run_cli("import", tmp_path / "leaky.onnx", "-o", tmp_path / "x.ftm")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"ONNX node {index} (QLinearLeakyRelu" in lines[0] and "not supported" in lines[0], \
        result.stderr
    assert not (tmp_path / "x.ftm").exists()


def test_onnx_qlinearmatmul_of_a_vector_by_a_constant_agrees_with_onnxruntime(tmp_path):
    """QLinearMatMul (quantize_static writes it for a MatMul by a weight) is imported as a bias-free Gemm; on a
    small graph made here, fedtiny's int8 outputs are onnxruntime's QLinearMatMul kernel's."""
    require_module("onnx", "dev")
    require_module("onnxruntime", "dev")
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from fedtiny.importer import import_model

    rng = np.random.default_rng(0)
    constants = dict(x_scale=np.float32(0.0625), x_zp=np.int8(3), b=rng.integers(-127, 128, (16, 10), dtype=np.int8),
                     b_scale=np.float32(0.01), b_zp=np.int8(0), y_scale=np.float32(0.5), y_zp=np.int8(-5))
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
         helper.make_node("QLinearMatMul", ["xq", "x_scale", "x_zp", "b", "b_scale", "b_zp", "y_scale", "y_zp"],
                          ["yq"], name="fc"),
         helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zp"], ["y"])],
        "matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "matmul.onnx")
    imported, _ = import_model(tmp_path / "matmul.onnx")
    assert [op.kind for op in imported.ops] == ["conv2d"] and imported.ops[0].origin == "onnx node 1 QLinearMatMul"
    q = rng.integers(-128, 128, (300, 16)).astype(np.int8)
    x = ((q.astype(np.float32) - 3) * np.float32(0.0625))  # exactly on the input's grid: both sides quantize to q
    model.graph.output.append(helper.make_tensor_value_info("yq", TensorProto.INT8, [1, 10]))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = np.concatenate([session.run(["yq"], {"x": sample[None]})[0] for sample in x]).astype(np.int64)
    ours = run(imported, quantize_input(imported, x)).reshape(len(x), -1).astype(np.int64)
    apart = np.abs(ours - theirs)
    assert (apart == 0).mean() >= 0.99 and apart.max() <= 1, f"{100 * (apart == 0).mean():.2f} %, {apart.max()}"
    assert len(np.unique(theirs)) > 20  # not all saturated


def test_onnx_qlinearaveragepool_onto_another_grid_agrees_with_onnxruntime(tmp_path):
    """quantize_static's QOperator gives an average pool its own output scale (QDQ keeps the input's): imported as
    a depthwise conv with equal weights, it gives onnxruntime's QLinearAveragePool's int8 outputs."""
    require_module("onnx", "dev")
    require_module("onnxruntime", "dev")
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from fedtiny.importer import import_model

    # a calibrated-looking output scale: with s_x / (3 s_y) a simple fraction (0.05: 5/12) one sum in 12 lands on a
    # half step, which onnxruntime rounds to even and fedtiny, as TFLite, away from zero (one step apart)
    constants = dict(x_scale=np.float32(0.0625), x_zp=np.int8(3), y_scale=np.float32(0.0537), y_zp=np.int8(-7))
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
         helper.make_node("QLinearAveragePool", ["xq", "x_scale", "x_zp", "y_scale", "y_zp"], ["yq"], name="pool",
                          domain="com.microsoft", kernel_shape=[3], strides=[2]),
         helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zp"], ["y"])],
        "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "pool.onnx")
    imported, _ = import_model(tmp_path / "pool.onnx")
    assert [op.kind for op in imported.ops] == ["conv2d"] and imported.ops[0].attrs["groups"] == 4
    q = np.random.default_rng(1).integers(-128, 128, (300, 4, 9)).astype(np.int8)
    x = (q.astype(np.float32) - 3) * np.float32(0.0625)  # on the input's grid: both sides quantize to q
    model.graph.output.append(helper.make_tensor_value_info("yq", TensorProto.INT8, [1, 4, 4]))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = np.concatenate([session.run(["yq"], {"x": sample[None]})[0] for sample in x])
    ours = run(imported, quantize_input(imported, x)).reshape(len(x), 4, 4).transpose(0, 2, 1)  # (L, C) -> (C, L)
    apart = np.abs(ours.astype(np.int64) - theirs.astype(np.int64))
    assert (apart == 0).mean() >= 0.99 and apart.max() <= 1, f"{100 * (apart == 0).mean():.2f} %, {apart.max()}"
    assert len(np.unique(theirs)) > 50  # not all saturated
