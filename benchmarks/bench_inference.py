"""Inference benchmark of the zoo models on their tasks: accuracy, size, and speed of the reference interpreter.

    python benchmarks/bench_inference.py [--repeats 5] [--timed 200] [--no-write]

For each zoo model: float and int8 test accuracy, parameters, flash and inference SRAM bytes, samples/s of the
int8 reference interpreter (`run` on one sample at a time) against PyTorch float inference at batch 1, both
on one thread, and whole-network int8 agreement with onnxruntime (for information: per-op agreement is what the
tests require; whole-network differences include 1-LSB rounding ties carried through later layers).
Prints a Markdown table and writes it into BENCHMARKS.md under "## Inference: zoo models (issue 2)".
"""

import argparse
import statistics
import time

import numpy as np
import torch

from fedtiny import train, zoo
from fedtiny.inspect import flash_bytes, inference_arena
from fedtiny.quantize import quantize
from fedtiny.interpreter import predict, quantize_input, run
from fedtiny_sim import data

from report import provenance, single_thread, write_section

SECTION = "## Inference: zoo models (issue 2)"
CALIBRATION_SAMPLES = 256


def tasks():
    """name -> (train set, test set, epochs, description). sensor_cnn is tested on machines it never saw."""
    bearing_train = data.bearing_dataset(range(40), 50, seed=0)
    bearing_test = data.bearing_dataset(range(100, 112), 50, seed=0)
    digits_train, digits_test = data.train_test_split(data.load_digits(), 0.25, seed=0)
    bc_train, bc_test = data.standardize(*data.train_test_split(data.load_breast_cancer(), 0.25, seed=0))
    return {
        "sensor_cnn": (bearing_train, bearing_test, 20,
                       "bearing generator: train machines 0-39 x 50 windows/class, test 12 unseen machines"),
        "mobilenet": (digits_train, digits_test, 15, "sklearn digits 8x8, 75/25 stratified split"),
        "mlp": (bc_train, bc_test, 30, "breast cancer (30 features, standardised), 75/25 stratified split"),
    }


def samples_per_second(infer, samples, repeats: int) -> float:
    """Median over `repeats` of (samples / seconds) for calling `infer` on each sample alone."""
    infer(samples[0])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for s in samples:
            infer(s)
        times.append(time.perf_counter() - start)
    return len(samples) / statistics.median(times)


def onnxruntime_end_to_end(graph, x_int8) -> tuple[float, int, float]:
    """Whole network: (fraction of int8 outputs identical, largest difference in LSB, argmax agreement)."""
    from fedtiny.onnx_export import run_onnxruntime

    ours = run(graph, x_int8).astype(np.int64)
    theirs = run_onnxruntime(graph, {graph.inputs[0]: x_int8}).astype(np.int64)
    diff = np.abs(ours - theirs)
    same_class = (ours.reshape(len(ours), -1).argmax(1) == theirs.reshape(len(theirs), -1).argmax(1)).mean()
    return float((diff == 0).mean()), int(diff.max()), float(same_class)


def bench(name, train_set, test_set, epochs, repeats, timed):
    torch.manual_seed(0)
    model = zoo.build(name, train_set.X.shape[1:], len(train_set.classes))
    train.fit(model, train_set.X, train_set.y, epochs=epochs, seed=0)
    calibration = train_set.X[np.random.default_rng(0).permutation(len(train_set))[:CALIBRATION_SAMPLES]]
    graph = quantize(model, calibration, name=name, classes=train_set.classes)

    x, y = test_set.X, test_set.y
    row = dict(model=name, float_acc=train.accuracy(model, x, y), int8_acc=float((predict(graph, x) == y).mean()),
               params=sum(p.numel() for p in model.parameters()),
               int8_params=sum(int(np.prod(t.shape)) for t in graph.constants),
               flash=flash_bytes(graph), sram=inference_arena(graph).size, n_test=len(y))

    pick = np.random.default_rng(1).permutation(len(x))[:timed]
    q = quantize_input(graph, x[pick])
    int8_samples = [q[i:i + 1] for i in range(len(q))]
    float_samples = [torch.as_tensor(x[i:i + 1]) for i in pick]
    row["int8_sps"] = samples_per_second(lambda s: run(graph, s), int8_samples, repeats)
    model.eval()
    with torch.no_grad():
        row["torch_sps"] = samples_per_second(model, float_samples, repeats)
    row["ort_identical"], row["ort_max_lsb"], row["ort_same_class"] = onnxruntime_end_to_end(
        graph, quantize_input(graph, x))
    return row


def table(rows) -> str:
    lines = ["| model | test samples | float acc | int8 acc | parameters (PyTorch / int8 graph) | flash bytes "
             "| inference SRAM bytes | int8 interpreter samples/s | PyTorch float samples/s | interpreter / PyTorch "
             "| onnxruntime end-to-end: identical outputs, max LSB, same class |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['n_test']} | {100 * r['float_acc']:.1f} % | {100 * r['int8_acc']:.1f} % "
            f"| {r['params']:,} / {r['int8_params']:,} | {r['flash']:,} | {r['sram']:,} | {r['int8_sps']:,.0f} "
            f"| {r['torch_sps']:,.0f} | {r['int8_sps'] / r['torch_sps']:.2f}x "
            f"| {100 * r['ort_identical']:.2f} %, {r['ort_max_lsb']}, {100 * r['ort_same_class']:.1f} % |")
    return "\n".join(lines)


def section(rows, descriptions, args) -> str:
    tasks_text = "\n".join(f"- `{name}`: {text}" for name, text in descriptions.items())
    return f"""{SECTION}

{provenance(f"python benchmarks/bench_inference.py --repeats {args.repeats} --timed {args.timed}")}

Tasks (float training with Adam, calibration on {CALIBRATION_SAMPLES} training samples):
{tasks_text}

{table(rows)}

- Accuracies are on the test split: float is `train.accuracy` of the PyTorch model, int8 is `predict` of the
  reference interpreter.
- Parameters: PyTorch's count, and the int8 graph's constants after BatchNorm folding. Flash counts int8 weights,
  int32 biases and per-channel requantization parameters; SRAM is the planned activation arena for one inference.
- Speed: batch 1, one sample at a time, median of {args.repeats} passes over the timed samples; one thread on both
  sides (`torch.set_num_threads(1)`, numpy BLAS limited to 1 thread). The interpreter is the numpy reference
  written for exact integer semantics, not speed; device speed comes from the generated C, not from this number.
- onnxruntime: the whole int8 network exported as ONNX QDQ and run end to end on the test split, for information
  (the tests require per-op agreement on the same inputs).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the median is reported")
    parser.add_argument("--timed", type=int, default=200, help="test samples per timed pass")
    parser.add_argument("--no-write", action="store_true", help="only print, do not update BENCHMARKS.md")
    args = parser.parse_args()

    single_thread()
    rows, descriptions = [], {}
    for name, (train_set, test_set, epochs, text) in tasks().items():
        descriptions[name] = text
        rows.append(bench(name, train_set, test_set, epochs, args.repeats, args.timed))
        print(f"{name}: done", flush=True)
    print(table(rows))
    if not args.no_write:
        write_section(SECTION, section(rows, descriptions, args))
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
