"""A round's training on the device (device_runtime/c/fedtiny_train_job.c) == LocalTraining.run, bit for bit.

- the pieces Python and C share: the bounded draw, the order key, the permutation and the cross-entropy loss,
  the Python function against its C twin on many inputs (the loss on every input), the loss against math.log;
- the host build of the job (ctypes) against LocalTraining with the C trainer and with the Python Trainer on the
  default sensor_cnn plan, `full`, MSE plans and the conformance plan, several seeds, rounds, epochs and steps:
  the trained state, num_examples, loss, accuracy and random counter;
- the poll callback abandons the job; bad input is refused; no samples;
- the Cortex-M4 firmware (firmware_train_job.c under QEMU) gives the same bits, loss and accuracy included.

Tests that need gcc / arm-none-eabi-gcc / qemu-system-arm skip when a tool is missing, unless CI=true.
"""

import ctypes
import math
import struct
from collections import Counter
from itertools import permutations

import numpy as np
import pytest

from fedtiny.arith import (MASK64, cross_entropy_loss, cross_entropy_loss_q24, mean_loss, order_key,
                           splitmix64, splitmix64_one, uniform_below)
from fedtiny.compiler import compile_plan
from fedtiny.planfile import load_plan
from fedtiny.protocol.device import TrainJob
from fedtiny.scheme import REFERENCE_SPARSE, parse
from fedtiny_device import codegen, cruntime
from fedtiny_device.agent import (SPLIT_ROUND, LocalTraining, heldout_count, heldout_split, training_order,
                                  training_permutation)
from fedtiny_device.trainer import Trainer

from pathlib import Path

from test_cruntime import need
from test_ctrainer import make_case, make_mse_case

CONFORMANCE_PLAN = Path(__file__).parent / "conformance" / "plan.ftp"


# ---- the shared pieces, Python against C ----------------------------------------------------------------------

ARITH_WRAPPERS = b"""#include <stdint.h>
#include "fedtiny_arith.h"
uint32_t t_uniform_below(uint64_t *counter, uint32_t bound) { return fedtiny_uniform_below(counter, bound); }
uint64_t t_order_key(uint64_t seed, uint64_t round, uint64_t epoch) { return fedtiny_order_key(seed, round, epoch); }
void t_loss_q24(const int32_t *q, uint32_t n, uint32_t *out)
{
    uint32_t i;
    for (i = 0; i < n; i++) {
        out[i] = fedtiny_cross_entropy_loss_q24(q[i]);
    }
}
"""


@pytest.fixture(scope="module")
def arith_c(cache):
    need("gcc", "make")
    files = {"fedtiny_arith.h": (codegen.runtime_dir() / "fedtiny_arith.h").read_bytes(), "wrappers.c": ARITH_WRAPPERS,
             "Makefile": b"libarith.so: wrappers.c fedtiny_arith.h\n"
                         b"\tgcc -std=c99 -Wall -Wextra -Werror -ffp-contract=off -O2 -shared -fPIC -o $@ wrappers.c\n"}
    lib = ctypes.CDLL(str(cruntime.make_cached(files, "libarith.so", "libarith.so", cache)))
    lib.t_uniform_below.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_uint32]
    lib.t_uniform_below.restype = ctypes.c_uint32
    lib.t_order_key.argtypes = [ctypes.c_uint64] * 3
    lib.t_order_key.restype = ctypes.c_uint64
    lib.t_loss_q24.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p]
    lib.t_loss_q24.restype = None
    return lib


def test_one_draw_is_splitmix64s_next_output():
    assert [splitmix64_one(c) for c in (0, 5, MASK64)] == [int(v) for v in (splitmix64(0, 1)[0], splitmix64(5, 1)[0],
                                                                           splitmix64(MASK64, 1)[0])]


def test_bounded_draws_match_c_and_reject_as_lemire(arith_c):
    """Bounds from 1 to 2^32 - 1; near 2^31 + 1 half of all draws are rejected, so the rejection path runs."""
    rng = np.random.default_rng(1)
    bounds = [1, 2, 3, 7, 100, 65535, 2**31 + 1, 2**31 + 3, 3 * 2**30 + 7, 2**32 - 1]
    bounds += [int(b) for b in rng.integers(1, 2**32, 300)]
    rejected = 0
    for k, bound in enumerate(bounds):
        counter = int(rng.integers(0, 2**63)) * 2 + k % 2
        value, after = uniform_below(counter, bound)
        c = ctypes.c_uint64(counter)
        assert arith_c.t_uniform_below(ctypes.byref(c), bound) == value, bound
        assert c.value == after and 0 <= value < bound
        rejected += (after - counter) % 2**64 - 1
        # Lemire's rule, from the draws themselves: every draw before the one used had its low product < 2^32 mod b
        draws = [splitmix64_one((counter + i) % 2**64) >> 32 for i in range((after - counter) % 2**64)]
        assert all((d * bound) % 2**32 < 2**32 % bound for d in draws[:-1])
        assert (draws[-1] * bound) % 2**32 >= 2**32 % bound and (draws[-1] * bound) >> 32 == value
    assert rejected > 0, "no draw was rejected: the test would not see a wrong rejection rule"
    with pytest.raises(ValueError):
        uniform_below(0, 0)


def test_order_keys_match_c(arith_c):
    rng = np.random.default_rng(2)
    cases = [(0, 0, 0), (MASK64, 2**32 - 1, 7), (7, 1, 0), (7, 1, 1), (7, 2, 0)]
    cases += [tuple(int(v) for v in rng.integers(0, 2**63, 3)) for _ in range(200)]
    keys = [order_key(*c) for c in cases]
    assert [arith_c.t_order_key(*c) for c in cases] == keys
    assert len(set(keys)) == len(keys)
    assert order_key(-1, 0, 0) == order_key(MASK64, 0, 0)  # inputs are taken mod 2^64


def test_cross_entropy_loss_matches_c_on_every_input(arith_c):
    q = np.arange(-3, 32772, dtype=np.int32)  # every Q15 probability, and clamped ones on both sides
    out = np.zeros(len(q), dtype=np.uint32)
    arith_c.t_loss_q24(q.ctypes.data, len(q), out.ctypes.data)
    assert out.tolist() == [cross_entropy_loss_q24(int(v)) for v in q]


def test_cross_entropy_loss_is_within_2e_7_of_math_log():
    errors = [abs(cross_entropy_loss(q) + math.log(q / 32768)) for q in range(1, 32769)]
    assert max(errors) < 2e-7
    assert cross_entropy_loss(32768) == 0.0 and cross_entropy_loss(0) == cross_entropy_loss(1)
    assert cross_entropy_loss(40000) == 0.0
    assert all(cross_entropy_loss(q) > cross_entropy_loss(q + 1) for q in range(1, 32768, 97))


def test_mean_loss_is_the_sequential_sum():
    losses = [1.0] + [1e-16] * 200  # in order, each 1e-16 is lost against 1.0; pairwise, they add up first
    total = 0.0
    for v in losses:
        total += v
    assert mean_loss(losses) == total / len(losses)
    assert mean_loss(losses) != float(np.mean(losses))  # numpy's pairwise sum would give other bits
    assert mean_loss([]) == 0.0


# ---- the job library ----------------------------------------------------------------------------------------

POLL, CJob, CResult, pack_state, unpack_state = (cruntime.POLL, cruntime.CJob, cruntime.CJobResult,
                                                   cruntime.pack_state, cruntime.unpack_state)
OK, ABANDONED, BAD_INPUT = 0, 1, 2


class JobLibrary:
    """libfedtiny_train_job.so of one plan: run(...) -> (status, TrainResult-like fields, state)."""

    def __init__(self, plan, cache):
        need("gcc", "make")
        self.plan = plan
        path = cruntime.make_cached(cruntime.plan_sources(plan, with_samples=False), "host-train-job",
                                    "libfedtiny_train_job.so", cache, prebuilt=cruntime.build_host_kernels(cache))
        self.lib = ctypes.CDLL(str(path))
        self.lib.fedtiny_train_job_run.argtypes = [ctypes.POINTER(CJob), ctypes.c_void_p, ctypes.POINTER(CResult)]
        self.lib.fedtiny_train_job_run.restype = ctypes.c_int
        self.lib.fedtiny_training_permutation.argtypes = [ctypes.c_uint64] * 3 + [ctypes.c_uint32, ctypes.c_void_p]
        self.lib.fedtiny_training_permutation.restype = None

    def run(self, seed, job: TrainJob, x, y, rng_counter, poll=None, base: bytes | None = None, evaluation=None):
        x = np.ascontiguousarray(x, dtype=np.int8)
        x_eval, y_eval = evaluation if evaluation is not None else (x[:0], y[:0])
        x_eval = np.ascontiguousarray(x_eval, dtype=np.int8)
        y_eval = np.ascontiguousarray(y_eval, dtype=np.int32)
        mse = self.plan.loss == "mse"
        y = np.ascontiguousarray(y, dtype=np.int8 if mse else np.int32)
        base = pack_state(self.plan, job.base) if base is None else base
        base_buf = ctypes.create_string_buffer(base, len(base))
        out = ctypes.create_string_buffer(b"\xa5" * len(base), len(base))
        order = np.zeros(max(1, len(x)), dtype=np.uint16)
        callback = POLL(poll) if poll is not None else POLL()
        cjob = CJob(seed & MASK64, job.round, job.epochs, job.steps, rng_counter, ctypes.addressof(base_buf),
                    x.ctypes.data, None if mse else y.ctypes.data, y.ctypes.data if mse else None, len(x),
                    order.ctypes.data, callback, None, x_eval.ctypes.data, y_eval.ctypes.data, len(y_eval))
        result = CResult()
        status = self.lib.fedtiny_train_job_run(ctypes.byref(cjob), ctypes.addressof(out), ctypes.byref(result))
        return status, result, out.raw

    def permutation(self, seed, round_, epoch, n):
        out = np.zeros(max(1, n), dtype=np.uint16)
        self.lib.fedtiny_training_permutation(seed & MASK64, round_ & MASK64, epoch & MASK64, n, out.ctypes.data)
        return out[:n].tolist()


# ---- plans ----------------------------------------------------------------------------------------------------
SAMPLES = 24


def sensor_default():
    graph, x, y = make_case("sensor_cnn")
    return compile_plan(graph, parse(REFERENCE_SPARSE["sensor_cnn"], graph)), x[:SAMPLES], y[:SAMPLES]


def sensor_full():
    graph, x, y = make_case("sensor_cnn")
    return compile_plan(graph, parse("full", graph)), x[:SAMPLES], y[:SAMPLES]


def mlp_mse():
    graph, x, t = make_mse_case("mlp")
    return compile_plan(graph, parse("full", graph), loss="mse"), x[:SAMPLES], t[:SAMPLES]


def sensor_mse():
    graph, x, t = make_mse_case("sensor_cnn")
    return compile_plan(graph, parse(REFERENCE_SPARSE["sensor_cnn"], graph), loss="mse"), x[:SAMPLES], t[:SAMPLES]


def conformance():
    plan = load_plan(CONFORMANCE_PLAN)
    rng = np.random.default_rng(4)
    shape = plan.graph.tensors[plan.graph.inputs[0]].shape
    return plan, rng.integers(-128, 128, (SAMPLES,) + tuple(shape)).astype(np.int8), rng.integers(0, 3, SAMPLES)


PLANS = {"sensor_cnn default": sensor_default, "sensor_cnn full": sensor_full, "mlp mse full": mlp_mse,
         "sensor_cnn mse sparse": sensor_mse, "conformance": conformance}
_PLANS = {}


def case(name):
    if name not in _PLANS:
        _PLANS[name] = PLANS[name]()
    return _PLANS[name]


# (seed, round, epochs, steps): whole epochs, steps inside one epoch, across epochs, a 64-bit seed, the last round
JOBS = [(7, 1, 1, 0), (123456, 9, 2, 0), (5, 4, 0, 17), (99, 2, 3, 2 * SAMPLES + 5), (2**40 + 3, 2**32 - 2, 1, 0)]


def assert_same_result(status, c, c_state, expected, plan, what):
    assert status == OK, what
    for name in plan.trainable_buffers():
        assert np.array_equal(c_state[name], expected.state[name]), f"{what}: {name} differs"
    got = (c.num_examples, c.loss, c.accuracy, c.personal_accuracy, c.rng_counter)
    personal = -1.0 if expected.personal_accuracy is None else expected.personal_accuracy
    assert got == (expected.num_examples, expected.loss, expected.accuracy, personal, expected.rng_counter), what


@pytest.mark.parametrize("name", list(PLANS))
def test_job_equals_local_training_with_either_trainer(name, cache):
    plan, x, y = case(name)
    lib = JobLibrary(plan, cache)
    for seed, round_, epochs, steps in JOBS:
        ct = LocalTraining(plan, x, y, seed, cruntime.CTrainer)
        py = LocalTraining(plan, x, y, seed)
        base, counter = plan.initial_state(), ct.rng_counter
        for r in (round_, round_ + 1):  # a second round from the first one's state and counter, as a node does
            job = TrainJob(r, 0, epochs, steps, base)
            status, c, raw = lib.run(seed, job, x, y, counter)
            expected = ct.run(job)
            what = f"{name} seed {seed} round {r} epochs {epochs} steps {steps}"
            assert_same_result(status, c, unpack_state(plan, raw), expected, plan, what)
            reference = py.run(job)
            assert_same_result(status, c, unpack_state(plan, raw), reference, plan, what + " (Python Trainer)")
            assert raw == pack_state(plan, expected.state)  # padding bytes are zero
            assert c.steps_done == len(training_order(seed, r, len(x) - heldout_count(len(x)), epochs, steps))
            assert c.rng_counter == counter + c.steps_done * codegen.draws_per_step(plan)  # a fixed number per step
            base, counter = expected.state, expected.rng_counter
        assert any(not np.array_equal(base[k], v) for k, v in plan.initial_state().items()), f"{name}: no change"
    if plan.loss == "mse":
        assert expected.accuracy == 0.0 and expected.loss > 0 and expected.personal_accuracy is None
    else:
        assert 0.0 < expected.accuracy <= 1.0 and expected.loss > 0 and 0.0 <= expected.personal_accuracy <= 1.0


def test_permutations_match_c_and_steps_walk_consecutive_epochs(cache):
    plan, _, _ = case("conformance")
    lib = JobLibrary(plan, cache)
    rng = np.random.default_rng(6)
    for n in (0, 1, 2, 3, 7, 100, 1000, 65535):
        for _ in range(3 if n < 65535 else 1):
            seed, round_, epoch = (int(v) for v in rng.integers(0, 2**62, 3))
            order = training_permutation(seed, round_, epoch, n)
            assert lib.permutation(seed, round_, epoch, n) == order
            assert sorted(order) == list(range(n))
    n = 10
    epochs = [training_permutation(3, 8, e, n) for e in range(3)]
    assert training_order(3, 8, n, steps=2 * n + 4).tolist() == epochs[0] + epochs[1] + epochs[2][:4]
    assert training_order(3, 8, n, epochs=2).tolist() == epochs[0] + epochs[1]
    assert epochs[0] != epochs[1] and training_permutation(3, 9, 0, n) != epochs[0]
    assert training_order(3, 8, 0, steps=5).tolist() == []


def test_heldout_split_is_the_c_jobs_and_covers_every_sample_once(cache):
    """A fifth held out from 10 samples on, by the permutation under SPLIT_ROUND (the C job's split); below 10
    nothing is held out and the train part is the samples in order (the job of a device without a split)."""
    plan, _, _ = case("conformance")
    lib = JobLibrary(plan, cache)
    for n in (0, 1, 9, 10, 11, 24, 501):
        train, held = heldout_split(17, n)
        assert len(held) == heldout_count(n) == (n // 5 if n >= 10 else 0)
        assert sorted(train.tolist() + held.tolist()) == list(range(n))
        if len(held):
            assert (held.tolist() + train.tolist()) == lib.permutation(17, SPLIT_ROUND, 0, n)
        else:
            assert train.tolist() == list(range(n))
    assert heldout_split(17, 24)[1].tolist() != heldout_split(18, 24)[1].tolist()  # each device's own
    assert all(heldout_split(17, 24)[1].tolist() == heldout_split(17, 24)[1].tolist() for _ in range(2))


def test_a_node_too_small_for_a_heldout_part_trains_on_all_and_reports_none(cache):
    plan, x, y = case("conformance")
    lib = JobLibrary(plan, cache)
    x, y = x[:9], y[:9]
    job = TrainJob(1, 0, 2, 0, plan.initial_state())
    training = LocalTraining(plan, x, y, 5)
    status, c, raw = lib.run(5, job, x, y, training.rng_counter)
    expected = training.run(job)
    assert_same_result(status, c, unpack_state(plan, raw), expected, plan, "9 samples")
    assert expected.personal_accuracy is None and c.personal_accuracy == -1.0 and c.num_examples == 9


def test_the_personal_accuracy_is_the_trained_models_on_the_heldout_part():
    """Independent of the job's own pass: the interpreter over the held-out samples with the trained state."""
    from fedtiny.interpreter import run

    plan, x, y = case("sensor_cnn full")
    result = LocalTraining(plan, x, y, 8).run(TrainJob(1, 0, 3, 0, plan.initial_state()))
    train, held = heldout_split(8, len(x))
    predicted = run(plan.graph_with(result.state), x[held]).reshape(len(held), -1).argmax(axis=1)
    assert result.personal_accuracy == float((predicted == y[held]).mean())
    assert result.num_examples == len(train)


@pytest.mark.parametrize("name", ["sensor_cnn default", "conformance"])
def test_an_evaluation_part_scores_the_personalised_model_and_takes_no_training(name, cache):
    """A device given an evaluation part (its machine's held-out windows of every class) scores its personalised
    model on those samples, by the C job and by either Python trainer alike, and trains exactly as without one:
    same state, loss, train accuracy and counter. The part here holds a class the device's own samples lack, as a
    fault its machine never had; the held-out fifth of its own samples could not score that class."""
    from fedtiny.interpreter import run

    plan, x, y = case(name)
    lacking = int(y.max())
    own = y != lacking
    x_own, y_own = x[own], y[own]
    x_eval, y_eval = x[~own][:5], y[~own][:5]
    x_eval = np.concatenate([x_eval, x_own[:3]])
    y_eval = np.concatenate([y_eval, y_own[:3]])
    lib = JobLibrary(plan, cache)
    job = TrainJob(3, 0, 2, 0, plan.initial_state())
    for seed in (7, 2**40 + 3):
        plain = LocalTraining(plan, x_own, y_own, seed, rng_counter=0).run(job)
        status, c, raw = lib.run(seed, job, x_own, y_own, 0, evaluation=(x_eval, y_eval))
        for factory in (cruntime.CTrainer, None):
            expected = LocalTraining(plan, x_own, y_own, seed, factory, 0, (x_eval, y_eval)).run(job)
            assert_same_result(status, c, unpack_state(plan, raw), expected, plan, f"{name} seed {seed} {factory}")
        assert (expected.num_examples, expected.loss, expected.accuracy, expected.rng_counter) == \
               (plain.num_examples, plain.loss, plain.accuracy, plain.rng_counter)
        assert all(np.array_equal(expected.state[k], plain.state[k]) for k in plain.state)
        predicted = run(plan.graph_with(expected.state), x_eval).reshape(len(y_eval), -1).argmax(axis=1)
        assert expected.personal_accuracy == float((predicted == y_eval).mean())
        assert lacking not in y_own[heldout_split(seed, len(y_own))[1]]  # what the held-out fifth would score
    # without samples of its own, the device scores the model it was sent
    status, c, raw = lib.run(5, job, x_own[:0], y_own[:0], 0, evaluation=(x_eval, y_eval))
    expected = LocalTraining(plan, x_own[:0], y_own[:0], 5, rng_counter=0, evaluation=(x_eval, y_eval)).run(job)
    assert_same_result(status, c, unpack_state(plan, raw), expected, plan, f"{name}: no samples of its own")
    assert expected.personal_accuracy is not None


def test_a_bad_evaluation_part_is_refused(cache):
    plan, x, y = case("conformance")
    lib = JobLibrary(plan, cache)
    job = TrainJob(2, 0, 1, 0, plan.initial_state())
    assert lib.run(7, job, x, y, 0, evaluation=(x[:4], np.array([0, 1, 3, 0])))[0] == BAD_INPUT  # 3 classes
    assert lib.run(7, job, x[:0], y[:0], 0, evaluation=(x[:2], np.array([0, -1])))[0] == BAD_INPUT
    with pytest.raises(ValueError, match="evaluation part"):
        LocalTraining(plan, x, y, 7, evaluation=(x[:2], y[:3]))
    mse, xm, tm = case("mlp mse full")
    with pytest.raises(ValueError, match="MSE plan"):
        LocalTraining(mse, xm, tm, 7, evaluation=(xm[:2], np.zeros(2, np.int32)))
    assert JobLibrary(mse, cache).run(7, TrainJob(2, 0, 1, 0, mse.initial_state()), xm, tm, 0,
                                      evaluation=(xm[:2], np.zeros(2)))[0] == BAD_INPUT


def test_permutations_are_uniform():
    """Every order of 3 samples about equally often (a Sattolo shuffle, bound i instead of i + 1, makes only 2)."""
    counts = Counter(tuple(training_permutation(11, 0, epoch, 3)) for epoch in range(6000))
    assert set(counts) == set(permutations(range(3)))
    assert all(abs(c - 1000) < 150 for c in counts.values()), counts


def test_poll_abandons_the_job_between_steps(cache):
    plan, x, y = case("conformance")
    lib = JobLibrary(plan, cache)
    job = TrainJob(2, 0, 2, 0, plan.initial_state())
    calls = []
    status, completed, raw = lib.run(7, job, x, y, 7 << 40, poll=lambda ctx: calls.append(1) or 0)
    n_train = len(x) - heldout_count(len(x))
    assert status == OK and len(calls) == 2 * n_train + len(x)  # every step, then every accuracy sample
    for stop_at in (0, 5, 2 * n_train + 3, 2 * n_train + len(x) - 1):  # before, during training, in both passes
        calls.clear()
        status, c, raw = lib.run(7, job, x, y, 7 << 40, poll=lambda ctx: int(calls.append(1) or len(calls) > stop_at))
        assert status == ABANDONED and c.steps_done == min(stop_at, 2 * n_train)
        assert raw == b"\xa5" * len(raw)  # the state goes out only when the job completes
        # the counter a finished job leaves: the node goes on as an agent that trained to the end, then dropped it
        assert c.rng_counter == completed.rng_counter


def test_bad_input_is_refused(cache):
    plan, x, y = case("conformance")
    lib = JobLibrary(plan, cache)
    job = TrainJob(2, 0, 1, 0, plan.initial_state())
    bad = y.copy()
    bad[3] = 3  # the plan has 3 classes
    assert lib.run(7, job, x, bad, 0)[0] == BAD_INPUT
    bad[3] = -1
    assert lib.run(7, job, x, bad, 0)[0] == BAD_INPUT
    status, result, _ = lib.run(7, job, x, y, 0)
    assert status == OK
    cjob = CJob(7, 2, 1, 0, 0, None, x.ctypes.data, y.astype(np.int32).ctypes.data, None, len(x), None, POLL(), None)
    assert lib.lib.fedtiny_train_job_run(ctypes.byref(cjob), ctypes.addressof(ctypes.create_string_buffer(64)),
                                         ctypes.byref(CResult())) == BAD_INPUT  # no base, no order buffer


def test_no_samples_trains_nothing(cache):
    plan, x, y = case("conformance")
    lib = JobLibrary(plan, cache)
    job = TrainJob(2, 0, 3, 0, plan.initial_state())
    status, c, raw = lib.run(7, job, x[:0], y[:0], 12345)
    expected = LocalTraining(plan, x[:0], y[:0], 7, rng_counter=12345).run(job)
    assert_same_result(status, c, unpack_state(plan, raw), expected, plan, "no samples")
    assert (c.num_examples, c.loss, c.accuracy, c.personal_accuracy, c.rng_counter) == (0, 0.0, 0.0, -1.0, 12345)


# ---- the host binding: CTrainer.run_job and CPlanModel ---------------------------------------------------------

@pytest.mark.parametrize("name", ["sensor_cnn default", "mlp mse full"])
def test_ctrainer_run_job_is_local_training_and_keeps_each_nodes_state(name, cache):
    """Two nodes' CTrainers share one library (one static arena): their jobs, interleaved with a single step and
    a batch forward pass, give each node what the Python Trainer gives it alone."""
    need("gcc", "make")
    plan, x, y = case(name)
    forward = cruntime.CPlanModel(plan, cache_dir=cache)
    c_nodes = [LocalTraining(plan, x, y, seed, lambda p, s: cruntime.CTrainer(p, s, cache_dir=cache))
               for seed in (3, 4)]
    py_nodes = [LocalTraining(plan, x, y, seed) for seed in (3, 4)]
    assert c_nodes[0].trainer.path == forward.path  # the same library: the test would not see a clobbered arena
    bases = [plan.initial_state()] * 2
    for round_ in (1, 2):
        for k in (0, 1):
            job = TrainJob(round_, 0, 1, 0 if round_ == 1 else len(x) + 3, bases[k])
            got, expected = c_nodes[k].run(job), py_nodes[k].run(job)
            for buffer in plan.trainable_buffers():
                assert np.array_equal(got.state[buffer], expected.state[buffer]), f"node {k} round {round_} {buffer}"
            assert (got.num_examples, got.loss, got.accuracy, got.personal_accuracy, got.rng_counter) == \
                   (expected.num_examples, expected.loss, expected.accuracy, expected.personal_accuracy,
                    expected.rng_counter)
            forward.run(plan.initial_state(), x[:3])  # loads another state into the arena
            bases[k] = got.state
        # a node's trainer holds its trained state afterwards, also for single steps
        label = y[0] if plan.loss == "mse" else int(y[0])
        assert c_nodes[0].trainer.step(x[0], label) == py_nodes[0].trainer.step(x[0], label)
        for buffer, values in py_nodes[0].trainer.trainable_state().items():
            assert np.array_equal(c_nodes[0].trainer.trainable_state()[buffer], values)
        assert c_nodes[0].rng_counter == py_nodes[0].rng_counter
        bases[0] = py_nodes[0].trainer.trainable_state()


def test_plan_model_runs_the_interpreters_forward_pass(cache):
    need("gcc", "make")
    from fedtiny.interpreter import run

    plan, x, y = case("sensor_cnn full")
    forward = cruntime.CPlanModel(plan, cache_dir=cache)
    trained = LocalTraining(plan, x, y, 5).run(TrainJob(1, 0, 2, 0, plan.initial_state())).state
    for state in (plan.initial_state(), trained):
        assert np.array_equal(forward(state, x), run(plan.graph_with(state), x))
    assert not np.array_equal(forward(trained, x), forward(plan.initial_state(), x))  # the state is used
    assert forward(trained, x[:0]).shape == (0,) + forward.output_shape
    with pytest.raises(ValueError, match="int8"):
        forward(trained, x.astype(np.int16))


def test_plan_libraries_link_one_kernel_build(cache):
    """The kernels depend on no plan: every plan's library links the object `make host-kernels` built once."""
    need("gcc", "make")
    paths = [cruntime.build_plan_host(case(name)[0], cache_dir=cache)
             for name in ("sensor_cnn default", "mlp mse full")]
    kernels = sorted(cache.glob("*-host-kernels"))
    assert len(kernels) == 1 and len(set(paths)) == 2
    for name in cruntime.KERNEL_OBJECTS:
        built = (kernels[0] / name).read_bytes()
        for path in paths:
            assert (path.parent / name).read_bytes() == built, name


# ---- the Cortex-M4 under QEMU -----------------------------------------------------------------------------------

def parse_jobs(stdout: str) -> list[tuple]:
    """firmware_train_job.c's lines -> (round, status, steps, examples, loss, accuracy, personal accuracy (None:
    no held-out part), rng, digest)."""
    out = []
    for line in stdout.splitlines():
        f = line.split()
        if f[:1] == ["job"]:
            double = lambda h: struct.unpack(">d", bytes.fromhex(h))[0]
            personal = double(f[13])
            out.append((int(f[1]), int(f[3]), int(f[5]), int(f[7]), double(f[9]), double(f[11]),
                        None if personal < 0 else personal, int(f[15], 16), f[17]))
    return out


@pytest.mark.parametrize("name", ["conformance", "sensor_cnn default", "sensor_cnn mse sparse"])
def test_m4_firmware_runs_the_jobs_like_local_training(name, cache):
    need("arm-none-eabi-gcc", "qemu-system-arm", "make")
    plan, x, y = case(name)
    seed, steps = 21, 2 * len(x) - 3
    elf = cruntime.make_cached(cruntime.plan_sources(plan, x, y, seed, steps), "m4-train-job",
                               "fedtiny_train_job.elf", cache, prebuilt=cruntime.build_m4_kernels(cache_dir=cache))
    result = cruntime.run_qemu(elf, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    training = LocalTraining(plan, x, y, seed, cruntime.CTrainer)
    first = training.run(TrainJob(3, 0, 0, steps, plan.initial_state()))
    second = training.run(TrainJob(4, 0, 2, 0, first.state))
    expected = [(r, OK, s, e.num_examples, e.loss, e.accuracy, e.personal_accuracy, e.rng_counter,
                 cruntime.trainable_digest(plan, e.state))
                for r, s, e in ((3, steps, first), (4, 2 * (len(x) - heldout_count(len(x))), second))]
    assert parse_jobs(result.stdout) == expected
