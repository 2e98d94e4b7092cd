"""The `fedtiny` command: one subcommand per stage of the data flow."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fedtiny")
def main() -> None:
    """Federated on-device training for microcontrollers."""


@main.command()
@click.argument("model_file", type=click.Path(dir_okay=False))
def inspect(model_file: str) -> None:
    """Print a quantized model's graph: ops, shapes, quantization, flash and SRAM bytes."""
    from .fileformat import FileFormatError
    from .inspect import describe
    from .modelfile import load_model

    try:
        graph = load_model(model_file)
    except FileFormatError as err:
        raise click.ClickException(str(err)) from err
    click.echo(describe(graph))


def _register() -> None:
    from fedtiny_server.cli import broker_config_command, coordinator_command

    from .codegen import codegen_command
    from .protocol.keys import keys_command

    main.add_command(keys_command, "keys")
    main.add_command(codegen_command, "codegen")
    main.add_command(coordinator_command, "coordinator")
    main.add_command(broker_config_command, "broker-config")


_register()


def parse_bytes(text: str) -> int:
    """'256KB', '256K', '1MB', '262144' -> bytes (K = 1024)."""
    units = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2}
    s = text.strip().upper()
    number = s.rstrip("KMGIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 256KB or 262144") from None
    if unit not in units or value < 0:
        raise click.BadParameter(f"{text!r} is not a size like 256KB or 262144")
    return int(value * units[unit])


def _model_for(model: str, data: str | None, seed: int):
    """A quantized model from a .ftm file, or a zoo model pretrained on --data and quantized."""
    from pathlib import Path

    from .fileformat import FileFormatError
    from .modelfile import load_model
    from .zoo import ZOO

    if Path(model).suffix == ".ftm" or Path(model).exists():
        try:
            return load_model(model)
        except FileFormatError as err:
            raise click.ClickException(str(err)) from err
    if model not in ZOO:
        raise click.ClickException(f"{model!r} is neither a model file nor a zoo model ({', '.join(ZOO)})")
    from fedtiny_sim.scenarios import SCENARIOS, load_task, pretrained

    if data is None:
        raise click.ClickException("a zoo model needs --data: a scenario (industrial, vision, medical) or a .npz/.csv")
    is_file = data not in SCENARIOS
    task = load_task(data, n_nodes=2, seed=seed, data_file=data if is_file else None)
    task.model = model
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
@click.option("--reserve", default="64KB", show_default=True, help="SRAM kept for the network stack and firmware.")
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

    graph = _model_for(model, data, seed)
    scheme = scheme or DEFAULT_SCHEMES.get(graph.meta.get("model", model), "last:2")
    try:
        plan = compile_plan(graph, parse(scheme, graph), lr=lr, qas=not no_qas, budget=parse_bytes(budget),
                            reserve=parse_bytes(reserve), loss=loss)
    except (SchemeError, BudgetError, ValueError) as err:
        raise click.ClickException(str(err)) from err
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
@click.option("--data", "data_file", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Your own .npz (X, y, optional group) or .csv (label/y, optional group) instead of a scenario.")
@click.option("--model", default=None, help="Zoo model (sensor_cnn, mobilenet, mlp) or your module as "
              "FILE.py:FACTORY, FACTORY(input_shape, num_classes) -> nn.Module; default: the scenario's.")
@click.option("--strategy", default="fedavg", show_default=True, help="A Flower strategy by name, or fedbuff.")
@click.option("--scheme", default=None, help="Update scheme; default: the model's sparse default.")
@click.option("--budget", default="256KB", show_default=True)
@click.option("--reserve", default="64KB", show_default=True)
@click.option("--lr", default=0.01, show_default=True, type=float, help="Devices' SGD learning rate (QAS-scaled).")
@click.option("--epochs", default=2, show_default=True, help="Local epochs per round.")
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
@click.option("--baseline", is_flag=True, help="Also train the same task with plain Flower FedAvg + PyTorch fp32.")
@click.option("--baseline-lr", default=0.003, show_default=True, type=float,
              help="The baseline's fp32 SGD learning rate (0.01 diverges on some bearing machines).")
def simulate(nodes, rounds, scenario, data_file, model, strategy, scheme, budget, reserve, lr, epochs, chunk_size,
             uplink_keep, dropout, stragglers, deadline, seed, broker, fleet_dir, out, engine, baseline, baseline_lr) -> None:
    """Run the whole system on this machine: coordinator, broker and NODES node agents over MQTT (or, with
    --engine flower, the coordinator and NODES ClientApps in Flower's simulation engine)."""
    from fedtiny_sim.simulate import LiveTable, SimulationConfig
    from fedtiny_sim.simulate import simulate as run_simulation

    config = SimulationConfig(nodes=nodes, rounds=rounds, scenario=scenario, data=data_file, model=model,
                              strategy=strategy, scheme=scheme, budget=parse_bytes(budget),
                              reserve=parse_bytes(reserve), lr=lr, epochs=epochs, chunk_size=chunk_size,
                              uplink_keep=uplink_keep,
                              dropout=dropout, stragglers=stragglers, deadline=deadline, seed=seed, broker=broker,
                              fleet_dir=fleet_dir, out=out, engine=engine, baseline=baseline,
                              baseline_lr=baseline_lr)
    if engine == "flower":
        from fedtiny_sim.flower_engine import check_config

        try:
            check_config(config)
        except (RuntimeError, ValueError) as err:
            raise click.ClickException(str(err)) from err
    with LiveTable(rounds) as live:
        result = run_simulation(config, progress=live)
    click.echo(f"\nreport: {out}/summary.md (accuracy {100 * result['initial_accuracy']:.1f} % -> "
               f"{100 * result['rounds'][-1]['accuracy']:.1f} %, {result['wall_seconds']:.1f} s)")
    if result["baseline"]:
        b = result["baseline"]
        click.echo(f"baseline (Flower FedAvg + PyTorch fp32): accuracy {100 * b['rounds'][-1]['accuracy']:.1f} %, "
                   f"{b['bytes_per_node_per_round']:,.0f} B per node per round, {b['wall_seconds']:.1f} s")
