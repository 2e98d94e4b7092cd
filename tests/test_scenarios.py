"""The built-in scenarios' splits (simulations/scenarios.py): who pretrains on what, what each node holds, what
the held-out set covers, and which host samples the learning settings are chosen on."""

import numpy as np

from fedtiny_sim.scenarios import halves, host_split, load_task, unseen_halves


def test_industrial_scores_the_fleet_on_windows_no_node_holds():
    task = load_task("industrial", 4, seed=0)
    fleet = [int(np.unique(node.group)[0]) for node in task.nodes]
    assert len(set(fleet)) == 4 and not set(fleet) & set(task.pretrain.group.tolist())
    # the held-out set: a fifth of every fleet machine's windows, of every class, none of them a node's own
    assert sorted(np.unique(task.test.group).tolist()) == sorted(fleet)
    for machine, node in zip(fleet, task.nodes):
        held = task.test.X[task.test.group == machine]
        assert np.bincount(task.test.y[task.test.group == machine]).tolist() == [len(node) // 16] * 4
        assert not (held[:, None] == node.X[None]).all(axis=(2, 3)).any()


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
