"""The `fedtiny` command: one subcommand per stage of the data flow.

This module is the application layer over all four packages (docs/architecture.md): the only module of the host
library that may use fedtiny_device, fedtiny_server and fedtiny_sim, and only inside a command's function, so
that importing fedtiny.cli imports none of them (tests/test_layering.py checks both).
"""

from contextlib import contextmanager

import click


class UserError(click.ClickException):
    """Input the user can fix: one line on stderr ("Error: ..."), exit code 2, no traceback."""

    exit_code = 2


@contextmanager
def user_errors():
    """The errors that bad input causes, as UserError. Only these types: anything else is a bug, and keeps its
    traceback."""
    from fedtiny_sim.data import MissingExtraError
    from fedtiny_sim.scenarios import ModelSpecError
    from fedtiny_sim.simulate import ConfigError

    from .compiler import BudgetError
    from .datafile import DataError
    from .fileformat import FileFormatError
    from .quantize import UnsupportedOpError
    from .scheme import SchemeError

    try:
        yield
    except (DataError, MissingExtraError, ModelSpecError, ConfigError, BudgetError, FileFormatError,
            UnsupportedOpError, SchemeError) as err:
        raise UserError(" ".join(str(err).split())) from err


def note(message: str) -> None:
    """A line for the person running the command (how the data was read, a scaled reserve), on stderr."""
    click.echo(message, err=True)


def parse_bytes(text: str, option: str = "size") -> int:
    """'256KB', '256K', '1MB', '262144' -> bytes (K = 1024)."""
    units = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2}
    s = text.strip().upper()
    number = s.rstrip("KMGIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value >= 0:
        raise UserError(f"{option} {text!r} is not a size like 256KB or 262144")
    return int(value * units[unit])


def parse_reserve(budget: int, reserve: str | None) -> int:
    """--reserve as bytes: given, or the default rule (fedtiny.compiler.reserve_for), noting a scaled one."""
    from .compiler import reserve_for

    with user_errors():
        value, scaled = reserve_for(budget, None if reserve is None else parse_bytes(reserve, "--reserve"))
    if scaled:
        note(scaled)
    return value


def _codegen_command() -> click.Command:
    from fedtiny_device.codegen import codegen_command

    return codegen_command


def _coordinator_command() -> click.Command:
    from fedtiny_server.cli import coordinator_command

    return coordinator_command


def _broker_config_command() -> click.Command:
    from fedtiny_server.cli import broker_config_command

    return broker_config_command


class _Commands(click.Group):
    """The `fedtiny` group. The commands defined in the packages above the host library are imported when they
    are looked up (a run of that command, or the command list of --help)."""

    UPPER = {"codegen": _codegen_command, "coordinator": _coordinator_command,
             "broker-config": _broker_config_command}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.UPPER])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self.UPPER[name]() if name in self.UPPER else super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fedtiny")
def main() -> None:
    """Federated on-device training for microcontrollers."""


@main.command()
@click.argument("model_file", type=click.Path(dir_okay=False))
def inspect(model_file: str) -> None:
    """Print a quantized model's graph: ops, shapes, quantization, flash and SRAM bytes."""
    from .inspect import describe
    from .modelfile import load_model

    with user_errors():
        graph = load_model(model_file)
    click.echo(describe(graph))


def _register() -> None:
    from .protocol.keys import keys_command

    main.add_command(keys_command, "keys")


_register()


def _model_for(model: str, data: str | None, seed: int):
    """A quantized model from a .ftm file, or a zoo model pretrained on --data and quantized."""
    from pathlib import Path

    from .modelfile import load_model
    from .zoo import ZOO

    if Path(model).suffix == ".ftm" or Path(model).exists():
        with user_errors():
            return load_model(model)
    if model not in ZOO:
        raise UserError(f"{model!r} is neither a model file nor a zoo model ({', '.join(ZOO)})")
    from fedtiny_sim.scenarios import SCENARIOS, check_model, load_task, pretrained

    if data is None:
        raise UserError("a zoo model needs --data: a scenario (industrial, vision, medical) or a .npz/.csv")
    is_file = data not in SCENARIOS
    notes = []  # shown once every check passed: an error is the one line to show
    with user_errors():
        task = load_task(data, n_nodes=2, seed=seed, data_file=data if is_file else None, note=notes.append,
                         progress=note)
        task.model = model
        check_model(model, task.input_shape, task.num_classes)
    for message in notes:
        note(message)
    return pretrained(task, seed)[1]


@main.command()
@click.option("--model", "model_name", required=True, help="Zoo model: sensor_cnn, mobilenet or mlp.")
@click.option("--data", required=True, help="Scenario (industrial, vision, medical) or a .npz/.csv file.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model file to write (.ftm).")
@click.option("--seed", default=0, show_default=True)
def quantize(model_name: str, data: str, output: str, seed: int) -> None:
    """Pretrain a zoo model in float on the host part of DATA, quantize it to int8 and save it."""
    from .inspect import describe
    from .modelfile import save_model

    graph = _model_for(model_name, data, seed)
    save_model(graph, output)
    click.echo(describe(graph))


@main.command()
@click.argument("model")
@click.option("--data", default=None, help="With a zoo model name: scenario or .npz/.csv to pretrain and calibrate on.")
@click.option("--scheme", default=None,
              help="classifier | bias | last:K | full | sparse:B:I@R,... (see fedtiny.scheme); default: the zoo "
                   "model's (fedtiny.scheme.DEFAULT_SCHEMES), else last:2.")
@click.option("--budget", default="256KB", show_default=True, help="Device SRAM.")
@click.option("--reserve", default=None, help="SRAM kept for the network stack and firmware; default: 64KB, at most "
              "a quarter of --budget.")
@click.option("--lr", default=0.05, show_default=True, type=float, help="SGD learning rate (QAS-scaled).")
@click.option("--no-qas", is_flag=True, help="Naive int8 SGD without quantization-aware scaling (for ablations).")
@click.option("--loss", default="cross_entropy", show_default=True, type=click.Choice(["cross_entropy", "mse"]),
              help="cross_entropy (class labels) or mse (regression / reconstruction targets, any output shape).")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="Plan file to write (.ftp).")
@click.option("--seed", default=0, show_default=True)
def compile(model: str, data, scheme: str, budget: str, reserve: str, lr: float, no_qas: bool, loss: str, output,
            seed: int):
    """Compile MODEL (a .ftm file or a zoo name) into a training plan and print its memory report."""
    from .compiler import BudgetError, compile_plan
    from .planfile import save_plan
    from .scheme import DEFAULT_SCHEMES, SchemeError, parse

    budget_bytes = parse_bytes(budget, "--budget")
    reserve_bytes = parse_reserve(budget_bytes, reserve)
    graph = _model_for(model, data, seed)
    scheme = scheme or DEFAULT_SCHEMES.get(graph.meta.get("model", model), "last:2")
    try:
        plan = compile_plan(graph, parse(scheme, graph), lr=lr, qas=not no_qas, budget=budget_bytes,
                            reserve=reserve_bytes, loss=loss)
    except (SchemeError, BudgetError, ValueError) as err:
        raise UserError(str(err)) from err
    report = plan.memory_report()
    click.echo(f"plan: scheme {scheme}, loss {loss}, {len(plan.steps)} steps, lr {lr}, "
               f"QAS {'off' if no_qas else 'on'}")
    for key, value in report.items():
        click.echo(f"  {key.replace('_', ' ')}: {value}")
    if output:
        save_plan(plan, output)
        click.echo(f"wrote {output}")


@main.command()
@click.option("--nodes", default=50, show_default=True, help="Node agents (devices), each with its own data.")
@click.option("--rounds", default=10, show_default=True)
@click.option("--scenario", default="industrial", show_default=True, type=click.Choice(["industrial", "vision", "medical"]),
              help="industrial: bearing vibration; vision: sklearn digits; medical: breast cancer.")
@click.option("--data", "data_file", default=None, type=click.Path(dir_okay=False),
              help="Your own .npz (X, y, optional group) or .csv (label/y, optional group) instead of a scenario.")
@click.option("--model", default=None, help="Zoo model (sensor_cnn, mobilenet, mlp) or your module as "
              "FILE.py:FACTORY, FACTORY(input_shape, num_classes) -> nn.Module; default: the scenario's.")
@click.option("--strategy", default="fedavg", show_default=True, help="A Flower strategy by name, or fedbuff.")
@click.option("--scheme", default=None, help="Update scheme; default: the model's sparse default.")
@click.option("--budget", default="256KB", show_default=True, help="Device SRAM.")
@click.option("--reserve", default=None, help="SRAM kept for the network stack and firmware; default: 64KB, at most "
              "a quarter of --budget.")
@click.option("--lr", default=None, type=float, help="Devices' SGD learning rate (QAS-scaled); default: chosen on "
              "the host's validation data.")
@click.option("--epochs", default=None, type=int, help="Local epochs per round; default: chosen with the lr.")
@click.option("--chunk-size", default=1024, show_default=True, help="Maximum MQTT payload per message (256 B..256 KB).")
@click.option("--uplink-keep", default=0.5, show_default=True, type=float,
              help="Fraction of each tensor's changes a node sends per round, largest first; the rest stays on the "
                   "node and is added to its next round's change (error feedback). 1 sends everything.")
@click.option("--dropout", default=0.0, show_default=True, help="Fraction of nodes that fail each round.")
@click.option("--stragglers", default=0.0, show_default=True,
              help="Fraction of nodes that are slow in a random half of their rounds (1.25-2 deadlines late).")
@click.option("--deadline", default=20.0, show_default=True,
              help="Seconds a round waits at most (with --engine flower: virtual seconds once every node answered).")
@click.option("--seed", default=0, show_default=True)
@click.option("--broker", default=None, help="mqtt(s)://HOST:PORT of a running broker; default: embedded amqtt.")
@click.option("--fleet-dir", default=None, help="With --broker: the `fedtiny keys` folder the broker trusts.")
@click.option("--out", default="runs/latest", show_default=True, help="Report folder.")
@click.option("--engine", default="mqtt", show_default=True, type=click.Choice(["mqtt", "flower"]),
              help="mqtt: a broker and node agents in worker processes; flower: the same node logic as ClientApps in "
              "Flower's simulation engine on Ray, for thousands of nodes or a cluster (pip install "
              "'fedtiny[simulation]').")
@click.option("--qemu-nodes", default=0, show_default=True,
              help="Of the nodes, how many run the node firmware (C: protocol, crypto, training) under QEMU "
                   "(Cortex-M4, mps2-an386), each with its own modem bridge to the broker.")
@click.option("--baseline", is_flag=True, help="Also train the same task with plain Flower FedAvg + PyTorch fp32.")
@click.option("--baseline-lr", default=None, type=float,
              help="The baseline's fp32 SGD learning rate; default: chosen by the devices' rule, for fp32.")
def simulate(nodes, rounds, scenario, data_file, model, strategy, scheme, budget, reserve, lr, epochs, chunk_size,
             uplink_keep, dropout, stragglers, deadline, seed, broker, fleet_dir, out, engine, qemu_nodes, baseline,
             baseline_lr) -> None:
    """Run the whole system on this machine: coordinator, broker and NODES node agents over MQTT (or, with
    --engine flower, the coordinator and NODES ClientApps in Flower's simulation engine)."""
    from fedtiny_sim.simulate import LiveTable, SimulationConfig, check_inputs
    from fedtiny_sim.simulate import simulate as run_simulation

    config = SimulationConfig(nodes=nodes, rounds=rounds, scenario=scenario, data=data_file, model=model,
                              strategy=strategy, scheme=scheme, budget=parse_bytes(budget, "--budget"),
                              reserve=None if reserve is None else parse_bytes(reserve, "--reserve"), lr=lr,
                              epochs=epochs, chunk_size=chunk_size, uplink_keep=uplink_keep,
                              dropout=dropout, stragglers=stragglers, deadline=deadline, seed=seed, broker=broker,
                              fleet_dir=fleet_dir, out=out, engine=engine, qemu_nodes=qemu_nodes, baseline=baseline,
                              baseline_lr=baseline_lr)
    with user_errors():
        task = check_inputs(config, note, progress=note)  # every input problem, before the live table and training
    # user_errors: a plan too big for the budget, known after pretraining
    with LiveTable(rounds, qemu_nodes) as live, user_errors():
        result = run_simulation(config, progress=live, task=task, note=live.note)  # a line per phase
    click.echo(f"\nreport: {out}/summary.md (accuracy {100 * result['initial_accuracy']:.1f} % -> "
               f"{100 * result['rounds'][-1]['accuracy']:.1f} %, {result['wall_seconds']:.1f} s)")
    if result["baseline"]:
        b = result["baseline"]
        click.echo(f"baseline (Flower FedAvg + PyTorch fp32): accuracy {100 * b['rounds'][-1]['accuracy']:.1f} %, "
                   f"{b['bytes_per_node_per_round']:,.0f} B per node per round, {b['wall_seconds']:.1f} s")
