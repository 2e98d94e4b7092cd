"""The built-in scenarios' splits (simulations/scenarios.py): who pretrains on what, what each node holds, what
the held-out set covers, and which host samples the learning settings are chosen on."""

import numpy as np

from fedtiny_sim import data
from fedtiny_sim.scenarios import (FLEET_FIRST_MACHINE, FLEET_MODELS, FLEET_WINDOWS_PER_CLASS, TEST_FRACTION, halves,
                                   host_split, industrial_task, load_task, unseen_halves)


def test_industrial_scores_the_fleet_on_windows_no_node_holds():
    task = load_task("industrial", 4, seed=0)
    fleet = [int(np.unique(node.group)[0]) for node in task.nodes]
    assert len(set(fleet)) == 4 and not set(fleet) & set(task.pretrain.group.tolist())
    # the held-out set: a fifth of every fleet machine's windows, of every class, none of them a node's own
    assert sorted(np.unique(task.test.group).tolist()) == sorted(fleet)
    per_class = round(TEST_FRACTION * FLEET_WINDOWS_PER_CLASS)
    for machine, node, test in zip(fleet, task.nodes, task.machine_tests):
        assert (test.group == machine).all() and len(test) == (task.test.group == machine).sum()
        assert np.bincount(test.y, minlength=4).tolist() == [per_class] * 4  # faults the node never saw too
        assert not (test.X[:, None] == node.X[None]).all(axis=(2, 3)).any()


def test_each_fleet_machine_holds_healthy_running_and_the_faults_of_its_history():
    task = industrial_task(20, seed=0, host_machines=1)  # the host's rig does not change the nodes: one is quicker
    seen = []
    for node in task.nodes:
        machine = int(np.unique(node.group)[0])
        history = data.fault_history(machine, seed=0)
        assert 1 <= len(history) <= 2 and set(history) <= {1, 2, 3}
        counts = np.bincount(node.y, minlength=4)
        own = round((1 - TEST_FRACTION) * FLEET_WINDOWS_PER_CLASS)
        assert counts.tolist() == [own if c in (0,) + history else 0 for c in range(4)]
        seen.append(history)
    # machines differ in their faults, and the fleet together has met every kind the host knows
    assert len(set(seen)) >= 4 and set().union(*seen) == {1, 2, 3}
    everything = industrial_task(3, seed=0, host_machines=1, fault_history=False)  # the scenario before fault histories
    assert all(np.bincount(node.y).tolist() == [own] * 4 for node in everything.nodes)


def test_the_industrial_split_is_the_seeds():
    def split(seed):
        task = industrial_task(6, seed=seed, host_machines=1)
        return [(node.X, node.y) for node in task.nodes] + [(task.test.X, task.test.y)]

    for (xa, ya), (xb, yb) in zip(split(0), split(0)):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert [data.fault_history(100 + i, seed=0) for i in range(20)] != \
        [data.fault_history(100 + i, seed=1) for i in range(20)]
    # a machine's history does not depend on the fleet's size
    assert [np.unique(n.y).tolist() for n in industrial_task(3, seed=0, host_machines=1).nodes] == \
        [np.unique(n.y).tolist() for n in industrial_task(6, seed=0, host_machines=1).nodes[:3]]


def test_unseen_halves_split_the_validation_part_with_every_machine_and_class_in_both():
    task = load_task("industrial", 2, seed=0)
    first, second = unseen_halves(task, seed=0)
    train, val = host_split(task, seed=0)
    assert len(val) + len(train) == len(task.pretrain) and set(val.y.tolist()) == {0, 1, 2, 3}
    strata = len(np.unique(np.stack([val.group, val.y], 1), axis=0))
    assert len(first) + len(second) == len(val) and 0 <= len(first) - len(second) <= strata  # odd ones first
    twice = {(int(g), int(c)) for g, c in zip(val.group, val.y) if ((val.group == g) & (val.y == c)).sum() >= 2}
    for part in (first, second):
        assert twice <= {(int(g), int(c)) for g, c in zip(part.group, part.y)}  # in both, where it can be
    both = np.concatenate([first.X, second.X])
    assert len(np.unique(both.reshape(len(both), -1), axis=0)) == len(val)  # disjoint, nothing lost
    odd = halves(val.subset(np.arange(3)))  # three samples of one stratum: the first half gets the odd one out
    assert (len(odd[0]), len(odd[1])) == (2, 1)


def test_fleet_machines_are_units_of_a_few_machine_models():
    units = [data.machine(FLEET_FIRST_MACHINE + i, seed=0, model=i % FLEET_MODELS) for i in range(2 * FLEET_MODELS)]
    for a, b in zip(units, units[FLEET_MODELS:]):  # two units of one model: its design, their own duty and sensor
        assert (a.n_balls, a.ball_d, a.pitch_d, a.contact_angle_deg, a.damping) == \
            (b.n_balls, b.ball_d, b.pitch_d, b.contact_angle_deg, b.damping)
        assert a.load != b.load and a.gain != b.gain and a.shaft_hz != b.shaft_hz
        assert abs(a.resonance_hz / b.resonance_hz - 1) < 0.11  # within the mounting's +-5 % of one design
    assert len({u.pitch_d for u in units}) == FLEET_MODELS
    # a machine without a model is drawn as before, and the unit keeps its own part of that draw
    alone, unit = data.machine(100, seed=0), data.machine(100, seed=0, model=0)
    assert (alone.load, alone.gain, alone.noise) == (unit.load, unit.gain, unit.noise)
    task = industrial_task(FLEET_MODELS + 1, seed=0, host_machines=1)  # node i: its machine as a unit of i % 3
    for i in (0, FLEET_MODELS):
        node = task.nodes[i]
        windows = data.bearing_dataset([FLEET_FIRST_MACHINE + i], FLEET_WINDOWS_PER_CLASS, seed=0, model=0).X
        assert (node.X[:, None] == windows[None]).all(axis=(2, 3)).any(axis=1).all()


def test_the_model_cache_keeps_the_most_recently_used_pretrained_models(tmp_path, monkeypatch):
    """Pretrained models (.ftm and .pt) are evicted as C builds are (fedtiny.lru): past CACHE_MODELS the least
    recently used go, a model found in the cache counts as used, and weights without their .ftm (a model another
    process is writing) stay."""
    import os

    from fedtiny_sim import scenarios

    def entry(name, used):
        for suffix in (".ftm", ".pt"):
            (tmp_path / f"{name}{suffix}").write_text("")
        os.utime(tmp_path / f"{name}.ftm", (used, used))

    monkeypatch.setattr(scenarios, "CACHE_MODELS", 3)
    for i in range(4):
        entry(f"old{i}", 1000 + i)
    (tmp_path / "writing.pt").write_text("")
    task = load_task("medical", 2)
    scenarios.pretrained(task, 0, cache_dir=tmp_path)  # pretrains, writes the fifth model, keeps three
    first = {p.stem for p in tmp_path.glob("*.ftm")} - {"old2", "old3"}
    assert len(first) == 1 and {p.name for p in tmp_path.iterdir()} == {
        "writing.pt", *(f"{stem}{suffix}" for stem in (*first, "old2", "old3") for suffix in (".ftm", ".pt"))}
    (new,) = first
    os.utime(tmp_path / f"{new}.ftm", (500, 500))  # the oldest now, until it is used
    scenarios.pretrained(task, 0, cache_dir=tmp_path)  # found: used now
    scenarios.pretrained(task, 1, cache_dir=tmp_path)  # another seed: a new model, and old2 goes
    kept = {p.stem for p in tmp_path.glob("*.ftm")}
    assert len(kept) == 3 and {new, "old3"} < kept and {p.stem for p in tmp_path.glob("*.pt")} == kept | {"writing"}
