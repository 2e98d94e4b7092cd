"""The default run's learning curve (issue 16 item 4): the industrial task's rounds in-process, one change at a time.

    python benchmarks/bench_fedcurve.py [--nodes 50] [--rounds 10] [--scheme S] [--lr LR] [--epochs E]
                                        [--server fedavg | fedavgm:SERVER_LR:MOMENTUM | fedadam:SERVER_LR]
                                        [--host-machines N] [--fleet-models K] [--all-faults] [--no-alone]
    python benchmarks/bench_fedcurve.py --central [--nodes 50]

Rounds: every node trains the run's plan with the C trainer from the global integers (agent.LocalTraining: its
seed, held-out split and training order, as in `fedtiny simulate`), the coordinator takes the example-weighted mean
of the dequantized states (FedAvg; or a server optimizer on that mean's change, as Flower's FedAvgM / FedAdam), clamps
and requantizes it (server/requantize.py). No MQTT and no uplink sparsification. Beside the rounds each device also
trains alone from the pretrained model (the same C jobs, never averaged; --no-alone skips it). Prints per round the
global model's accuracy on the held-out set and, on each node's machine's held-out windows of every class
(scenarios.Task.machine_tests: what the machine will meet, faults its node never had included), the mean / worst tenth
over the devices of the global model, the personalised model (the global one after the device's own steps) and the
device alone; then the device-measured personalised accuracy on its own held-out part (the classes it holds only),
and one JSON line.

The scenario's variants (scenarios.industrial_task): --host-machines (the test rig's machines the host pretrains
on), --fleet-models 0 (every fleet machine its own design instead of units of three machine models), --all-faults
(every node holds every class instead of its machine's fault history). The defaults of --scheme, --lr and --epochs
are what the default run chooses on this scenario (auto = full, the lr rule's 0.003162 x 2 epochs).

--central: the ceiling of one global model: the pretrained float model fine-tuned on the union of the nodes' training
samples (Adam, lr 1e-3, batch 32, BatchNorm statistics frozen), the held-out accuracy after each epoch.
"""

import argparse
import json
import time

import numpy as np

from fedtiny_sim.scenarios import FLEET_MODELS, HOST_MACHINES


def task_of(args):
    from fedtiny_sim.scenarios import industrial_task

    return industrial_task(args.nodes, 0, host_machines=args.host_machines, fault_history=not args.all_faults,
                           fleet_models=args.fleet_models or None)


def rounds(args) -> dict:
    from fedtiny.interpreter import quantize_input
    from fedtiny.protocol.device import TrainJob
    from fedtiny_device.agent import LocalTraining
    from fedtiny_device.cruntime import CPlanModel, CTrainer
    from fedtiny_server.requantize import dequantize_state, requantize_state, tensor_specs

    from fedtiny_sim.personal import fleet_summary
    from fedtiny_sim.scenarios import pretrained
    from fedtiny_sim.simulate import SimulationConfig, node_seed, training_plan

    task = task_of(args)
    _, graph = pretrained(task, 0)
    config = SimulationConfig(nodes=args.nodes, scheme=args.scheme, lr=args.lr, epochs=args.epochs)
    plan, scheme = training_plan(config, graph), config.scheme
    specs = tensor_specs(plan)
    forward = CPlanModel(plan)
    x_test, y_test = quantize_input(graph, task.test.X), task.test.y
    machines = [(quantize_input(graph, t.X), t.y) for t in task.machine_tests]

    def accuracy(ints) -> float:
        return float((forward.run(ints, x_test).reshape(len(y_test), -1).argmax(1) == y_test).mean())

    def on_machine(ints, i) -> float:  # node i's model on its machine's held-out windows of every class
        x, y = machines[i]
        return float((forward.run(ints, x).reshape(len(y), -1).argmax(1) == y).mean())

    def summary(values) -> list[float]:  # [mean, worst tenth] in %
        s = fleet_summary(values)
        return [round(100 * s["mean"], 1), round(100 * s["worst_tenth"], 1)]

    def node(i, ds):
        return LocalTraining(plan, quantize_input(graph, ds.X), ds.y, node_seed(config, i), CTrainer)

    nodes = [node(i, ds) for i, ds in enumerate(task.nodes)]
    alone_nodes = [node(i, ds) for i, ds in enumerate(task.nodes)]  # the same devices, never averaged
    ints = plan.initial_state()
    alone = [ints] * len(nodes)
    master = dequantize_state(specs, ints)
    kind, *server = args.server.split(":")
    first = {n: np.zeros_like(v) for n, v in master.items()}  # momentum, or Adam's first moment
    second = {n: np.zeros_like(v) for n, v in master.items()}
    curve, personal = [accuracy(ints)], []
    start = summary([on_machine(ints, i) for i in range(len(nodes))])
    machine_curves = dict(global_=[start], personalised=[start], alone=[start])
    started = time.perf_counter()
    for r in range(1, args.rounds + 1):
        total, weights, scores, own = {n: np.zeros_like(v) for n, v in master.items()}, 0, [], []
        for i, node_ in enumerate(nodes):
            result = node_.run(TrainJob(r, r - 1, args.epochs, 0, ints))
            state = dequantize_state(specs, result.state)
            for n in master:
                total[n] += result.num_examples * state[n]
            weights += result.num_examples
            if result.personal_accuracy is not None:
                scores.append(result.personal_accuracy)
            own.append(on_machine(result.state, i))
            if not args.no_alone:
                alone[i] = alone_nodes[i].run(TrainJob(r, 0, args.epochs, 0, alone[i])).state
        change = {n: total[n] / weights - master[n] for n in master}
        if kind == "fedavg":
            new = {n: master[n] + change[n] for n in master}
        elif kind == "fedavgm":  # Flower's FedAvgM: momentum on the pseudo-gradient -change
            server_lr, momentum = float(server[0]), float(server[1])
            first = {n: momentum * first[n] - change[n] for n in master}
            new = {n: master[n] - server_lr * first[n] for n in master}
        elif kind == "fedadam":  # Flower's FedAdam defaults: beta 0.9 / 0.99, tau 1e-9
            eta = float(server[0])
            first = {n: 0.9 * first[n] + 0.1 * change[n] for n in master}
            second = {n: 0.99 * second[n] + 0.01 * change[n] ** 2 for n in master}
            new = {n: master[n] + eta * first[n] / (np.sqrt(second[n]) + 1e-9) for n in master}
        else:
            raise SystemExit(f"unknown --server {args.server}")
        master = {n: specs[n].clamp(new[n]) for n in specs}
        ints = requantize_state(specs, master)
        curve.append(accuracy(ints))
        personal.append(float(np.mean(scores)) if scores else None)
        machine_curves["global_"].append(summary([on_machine(ints, i) for i in range(len(nodes))]))
        machine_curves["personalised"].append(summary(own))
        if not args.no_alone:
            machine_curves["alone"].append(summary([on_machine(alone[i], i) for i in range(len(nodes))]))
        print(f"round {r}: held-out {100 * curve[-1]:.1f} %, on each machine's windows of every class "
              f"(mean / worst tenth): global {machine_curves['global_'][-1]}, personalised "
              f"{machine_curves['personalised'][-1]}, alone {machine_curves['alone'][-1]}; personalised on the "
              f"device's own held-out part {100 * personal[-1]:.1f} % ({time.perf_counter() - started:.0f} s)",
              flush=True)
    return dict(scheme=scheme, trainable=int(sum(np.prod(s.shape) for s in specs.values())), curve=curve,
                personal=personal,
                **{f"machines_{k.rstrip('_')}": v for k, v in machine_curves.items()})


def central(args) -> dict:
    import copy

    import torch

    from fedtiny.train import evaluate
    from fedtiny_device.agent import heldout_split

    from fedtiny_sim.scenarios import pretrained
    from fedtiny_sim.simulate import SimulationConfig, node_seed

    torch.set_num_threads(1)
    task = task_of(args)
    model, _ = pretrained(task, 0)
    config = SimulationConfig(nodes=args.nodes)
    parts = [heldout_split(node_seed(config, i), len(ds.y))[0] for i, ds in enumerate(task.nodes)]
    x = torch.as_tensor(np.concatenate([ds.X[p] for ds, p in zip(task.nodes, parts)]), dtype=torch.float32)
    y = torch.as_tensor(np.concatenate([ds.y[p] for ds, p in zip(task.nodes, parts)]))
    tuned = copy.deepcopy(model).eval()  # BatchNorm statistics frozen, as on the devices
    optimizer = torch.optim.Adam(tuned.parameters(), 1e-3)
    rng = np.random.default_rng(0)
    curve = [evaluate(tuned, task.test.X, task.test.y)[0]]
    for epoch in range(args.rounds):
        for batch in np.array_split(rng.permutation(len(y)), max(1, len(y) // 32)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(tuned(x[batch]), y[batch]).backward()
            optimizer.step()
        curve.append(evaluate(tuned, task.test.X, task.test.y)[0])
        print(f"epoch {epoch + 1}: held-out {100 * curve[-1]:.1f} %", flush=True)
    return dict(central=True, curve=curve)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10, help="rounds (with --central: epochs)")
    parser.add_argument("--scheme", default="full", help="default: what --scheme auto chooses in the default run")
    parser.add_argument("--lr", type=float, default=0.003162, help="default: the lr rule's choice in the default run")
    parser.add_argument("--epochs", type=int, default=2, help="default: the lr rule's choice in the default run")
    parser.add_argument("--server", default="fedavg")
    parser.add_argument("--central", action="store_true")
    parser.add_argument("--host-machines", type=int, default=HOST_MACHINES,
                        help="the machines the host pretrains on (default: the scenario's)")
    parser.add_argument("--all-faults", action="store_true",
                        help="every node holds windows of every class (the scenario before fault histories)")
    parser.add_argument("--fleet-models", type=int, default=FLEET_MODELS,
                        help="the machine models the fleet's machines are units of (0: every machine its own design)")
    parser.add_argument("--no-alone", action="store_true", help="do not train each device alone beside the rounds")
    args = parser.parse_args()
    print(json.dumps(dict(vars(args), **(central(args) if args.central else rounds(args)))))


if __name__ == "__main__":
    main()
