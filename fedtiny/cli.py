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
    from .importer import ModelImportError
    from .quantize import UnsupportedOpError
    from .scheme import SchemeError
    from .search import SearchError

    try:
        yield
    except (DataError, MissingExtraError, ModelSpecError, ConfigError, BudgetError, FileFormatError,
            UnsupportedOpError, SchemeError, ModelImportError, SearchError) as err:
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


def _profile_command() -> click.Command:
    from fedtiny_device.profile import profile_command

    return profile_command


def _coordinator_command() -> click.Command:
    from fedtiny_server.cli import coordinator_command

    return coordinator_command


def _broker_config_command() -> click.Command:
    from fedtiny_server.cli import broker_config_command

    return broker_config_command


class _Commands(click.Group):
    """The `fedtiny` group. The commands defined in the packages above the host library are imported when they
    are looked up (a run of that command, or the command list of --help)."""

    UPPER = {"codegen": _codegen_command, "profile": _profile_command, "coordinator": _coordinator_command,
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
    """(quantized graph, task or None): a .ftm file (with --data, that task is loaded too: its host part is what
    `--scheme auto` measures on), or a zoo model or a user's FILE.py:FACTORY pretrained on --data and quantized
    (the same model specs `fedtiny simulate --model` takes, checked the same way)."""
    from pathlib import Path

    from .modelfile import load_model
    from .zoo import ZOO

    is_model_file = Path(model).suffix == ".ftm" or (Path(model).is_file() and Path(model).suffix != ".py")
    if not is_model_file and model not in ZOO and Path(model).suffix == ".py":
        raise UserError(f"{model}: name the function that builds the model, as {model}:FACTORY")
    from fedtiny_sim.scenarios import SCENARIOS, check_model, load_task, pretrained

    if data is None:
        if is_model_file:
            with user_errors():
                return load_model(model), None
        raise UserError(f"{model} needs --data to pretrain and calibrate on: a scenario (industrial, vision, "
                        "medical) or a .npz/.csv")
    is_file = data not in SCENARIOS
    notes = []  # shown once every check passed: an error is the one line to show
    with user_errors():
        graph = load_model(model) if is_model_file else None
        task = load_task(data, n_nodes=2, seed=seed, data_file=data if is_file else None, note=notes.append,
                         progress=note)
        if not is_model_file:
            task.model = model
            check_model(model, task.input_shape, task.num_classes)  # zoo name or FILE.py:FACTORY, one clear line
    for message in notes:
        note(message)
    return (graph if is_model_file else pretrained(task, seed)[1]), task


@main.command()
@click.option("--model", "model_name", required=True,
              help="Zoo model (sensor_cnn, mobilenet, mlp) or your module as FILE.py:FACTORY, "
                   "FACTORY(input_shape, num_classes) -> nn.Module.")
@click.option("--data", required=True, help="Scenario (industrial, vision, medical) or a .npz/.csv file.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model file to write (.ftm).")
@click.option("--seed", default=0, show_default=True)
def quantize(model_name: str, data: str, output: str, seed: int) -> None:
    """Pretrain a zoo model or your FILE.py:FACTORY in float on the host part of DATA, quantize it to int8 and
    save it."""
    from .inspect import describe
    from .modelfile import save_model

    graph, _ = _model_for(model_name, data, seed)
    save_model(graph, output)
    click.echo(describe(graph))


@main.command("import")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model file to write (.ftm).")
def import_(model_file: str, output: str) -> None:
    """Read a full-integer TFLite model (MODEL.tflite) or an int8 QDQ or QOperator ONNX model (MODEL.onnx,
    onnxruntime's quantize_static) into fedtiny's graph and save it as a model file, for `fedtiny compile`, `evaluate` and
    `simulate --model`."""
    from .importer import import_model
    from .inspect import describe
    from .modelfile import save_model

    with user_errors():
        graph, notes = import_model(model_file)
    for message in notes:
        note(message)
    save_model(graph, output)
    click.echo(describe(graph))


@main.command()
@click.argument("model")
@click.option("--data", default=None, help="With a zoo name or FILE.py:FACTORY: scenario or .npz/.csv to pretrain "
              "and calibrate on; with --scheme auto also for a model file (its host part is what auto measures on).")
@click.option("--scheme", default="auto", show_default=True,
              help="auto | classifier | bias | last:K | full | sparse:B:I@R,... (see fedtiny.scheme). auto measures "
                   "candidate schemes with short int8 fine-tuning runs (at --lr, else at each lr of a grid) on the part "
                   "of --data's host part that pretraining held out, and takes the one that fits the budget with the "
                   "most trainable bytes among those tied with the best (fedtiny.search); it needs --data.")
@click.option("--budget", default="256KB", show_default=True, help="Device SRAM.")
@click.option("--reserve", default=None, help="SRAM kept for the network stack and firmware; default: 64KB, at most "
              "a quarter of --budget.")
@click.option("--lr", default=None, type=float, help="SGD learning rate (QAS-scaled); default: with --scheme auto, "
              "the best of the search's grid for the scheme it chose, else 0.05.")
@click.option("--no-qas", is_flag=True, help="Naive int8 SGD without quantization-aware scaling (for ablations).")
@click.option("--loss", default="cross_entropy", show_default=True, type=click.Choice(["cross_entropy", "mse"]),
              help="cross_entropy (class labels) or mse (regression / reconstruction targets, any output shape).")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False), help="Plan file to write (.ftp).")
@click.option("--seed", default=0, show_default=True)
def compile(model: str, data, scheme: str, budget: str, reserve: str, lr: float | None, no_qas: bool, loss: str,
            output, seed: int):
    """Compile MODEL (a .ftm file, a zoo name or FILE.py:FACTORY) into a training plan and print its memory
    report."""
    from .compiler import BudgetError, compile_plan
    from .device_memory import describe as describe_memory
    from .planfile import save_plan
    from .scheme import SchemeError, parse
    from .search import SearchError

    budget_bytes = parse_bytes(budget, "--budget")
    reserve_bytes = parse_reserve(budget_bytes, reserve)
    if scheme == "auto" and data is None:
        raise UserError("--scheme auto (the default) measures schemes on the host's data: give --data (a scenario or "
                        "a .npz/.csv), or a scheme by name (--scheme classifier, bias, last:K, full, sparse:...)")
    graph, task = _model_for(model, data, seed)
    try:
        if scheme == "auto":
            from fedtiny_sim.autoscheme import auto_scheme
            from fedtiny_sim.scenarios import unseen_halves

            result = auto_scheme(graph, unseen_halves(task, seed), budget=budget_bytes, reserve=reserve_bytes, lr=lr,
                                 qas=not no_qas, loss=loss, seed=seed, note=note)
            click.echo(result.table())
            click.echo(result.summary())
            plan, scheme = result.plan, f"auto = {result.scheme}"
        else:
            plan = compile_plan(graph, parse(scheme, graph), lr=0.05 if lr is None else lr, qas=not no_qas,
                                budget=budget_bytes, reserve=reserve_bytes, loss=loss)
    except (SchemeError, BudgetError, SearchError, ValueError) as err:
        raise UserError(" ".join(str(err).split())) from err
    click.echo(f"plan: scheme {scheme}, loss {loss}, {len(plan.steps)} steps, lr {plan.lr:g}, "
               f"QAS {'off' if no_qas else 'on'}")
    for line in describe_memory(plan):
        click.echo(line)
    if output:
        save_plan(plan, output)
        click.echo(f"wrote {output}")


@main.command()
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", required=True,
              help="A .npz/.csv of labelled samples (raw features, as the model's training file had them), or a "
                   "scenario (industrial, vision, medical): its held-out test set.")
@click.option("--nodes", default=50, show_default=True, help="With a scenario: the node count of the run whose "
              "test set to use (the industrial test set is a fifth of each node's machine's windows).")
@click.option("--seed", default=0, show_default=True, help="With a scenario: the seed of its split.")
def evaluate(model_file: str, data: str, nodes: int, seed: int) -> None:
    """Accuracy and per-class recall of an int8 model file (.ftm: `fedtiny quantize`'s, or a run's global.ftm) on
    DATA, computed with the device's integer kernels."""
    from .datafile import DataError
    from .interpreter import predict, standardize_input
    from .modelfile import load_model

    with user_errors():
        graph = load_model(model_file)
    outputs = graph.tensors[graph.outputs[0]].shape[-1]
    classes = graph.meta.get("classes") or [str(i) for i in range(outputs)]
    from fedtiny_sim.scenarios import SCENARIOS, load_task

    with user_errors():
        if data in SCENARIOS:
            test = load_task(data, n_nodes=nodes, seed=seed).test
            if [str(c) for c in test.classes] != list(classes):
                raise DataError(f"scenario {data} has classes {[str(c) for c in test.classes]}, the model {list(classes)}")
            x = test.X  # standardized with the scenario's own statistics already
        else:
            from .datafile import load_user_data

            test = load_user_data(data, classes=classes)  # labels named as the model's classes
            x = test.X
        expected = tuple(graph.meta.get("input_shape") or ())
        if expected and tuple(x.shape[1:]) != expected:
            raise DataError(f"{data}: samples of shape {tuple(x.shape[1:])}, but {model_file} takes {expected}")
        if data not in SCENARIOS:
            x = standardize_input(graph, x)
    predicted = predict(graph, x)
    click.echo(f"{model_file} on {data}: accuracy {100 * float((predicted == test.y).mean()):.1f} % "
               f"({len(test.y):,} samples)")
    click.echo(f"  {'class':<16} {'samples':>8} {'recall':>8} {'precision':>10}")
    for k, name in enumerate(classes):
        actual, said = test.y == k, predicted == k
        recall = f"{100 * (said & actual).sum() / actual.sum():.1f} %" if actual.any() else "-"
        precision = f"{100 * (said & actual).sum() / said.sum():.1f} %" if said.any() else "-"
        click.echo(f"  {str(name):<16} {int(actual.sum()):>8} {recall:>8} {precision:>10}")


@main.command()
@click.option("--nodes", default=50, show_default=True, help="Node agents (devices), each with its own data.")
@click.option("--rounds", default=10, show_default=True)
@click.option("--scenario", default="industrial", show_default=True, type=click.Choice(["industrial", "vision", "medical"]),
              help="industrial: bearing vibration; vision: sklearn digits; medical: breast cancer.")
@click.option("--data", "data_file", default=None, type=click.Path(dir_okay=False),
              help="Your own .npz (X, y, optional group) or .csv (label/y, optional group) instead of a scenario.")
@click.option("--model", default=None, help="Zoo model (sensor_cnn, mobilenet, mlp), your module as "
              "FILE.py:FACTORY, FACTORY(input_shape, num_classes) -> nn.Module, or a model file MODEL.ftm (`fedtiny "
              "quantize`'s or `fedtiny import`'s: not pretrained again); default: the scenario's.")
@click.option("--strategy", default="fedavg", show_default=True,
              help="fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad, fedmedian, fedtrimmedavg, krum, "
                   "multikrum or fedbuff (semi-asynchronous: its rounds run on the wall clock).")
@click.option("--strategy-option", "strategy_options", multiple=True, metavar="KEY=VALUE",
              help="Strategy constructor argument, as `fedtiny coordinator` takes it, e.g. beta=0.2, "
                   "num_malicious_nodes=1, buffer_size=8.")
@click.option("--fraction", default=1.0, show_default=True, help="Fraction of the nodes sampled per round.")
@click.option("--quorum", default=None, type=float,
              help="Fraction of the cohort whose replies end a round early; default: 1, or with --dropout or "
                   "--stragglers max(0.3, 1 - dropout - 0.1).")
@click.option("--local-steps", default=0, show_default=True, help="Training steps per round (0: --epochs passes).")
@click.option("--max-examples", default=10_000, show_default=True,
              help="Clamp of a node's num_examples (its aggregation weight).")
@click.option("--max-staleness", default=0, show_default=True,
              help="Semi-asynchronous: accept replies up to this many versions old (fedbuff); such rounds run on the "
                   "wall clock.")
@click.option("--scheme", default="auto", show_default=True,
              help="Update scheme: auto (a search: the scheme that learns most within --budget, measured with short "
                   "int8 runs on the host's held-out data; cached, and printed), or classifier, bias, last:K, full, "
                   "sparse:B:I@R,... (fedtiny.scheme).")
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
              help="Seconds a round waits at most: virtual seconds, in which a node's round lasts its training steps "
                   "on a nominal 216 MHz Cortex-M4 plus its straggler delay, so that a seed gives the same rounds on "
                   "any machine; wall-clock seconds with --realtime, --strategy fedbuff or --max-staleness.")
@click.option("--realtime", is_flag=True,
              help="Run deadlines, --dropout and --stragglers on the wall clock (--engine mqtt): stragglers really "
                   "wait, and a busy machine can make nodes miss rounds. --qemu-nodes run in either mode.")
@click.option("--seed", default=0, show_default=True)
@click.option("--broker", default=None,
              help="mqtt(s)://HOST:PORT of a running broker; default: mosquitto on loopback where installed, else "
                   "the embedded amqtt.")
@click.option("--fleet-dir", default=None, help="With --broker: the `fedtiny keys` folder the broker trusts.")
@click.option("--out", default="runs/latest", show_default=True, help="Report folder.")
@click.option("--engine", default="mqtt", show_default=True, type=click.Choice(["mqtt", "flower"]),
              help="mqtt: a broker and node agents in worker processes; flower: the same node logic as ClientApps in "
              "Flower's simulation engine on Ray, for thousands of nodes or a cluster (pip install "
              "'fedtiny[simulation]'); its rounds run in virtual time as the mqtt engine's do (no --realtime).")
@click.option("--qemu-nodes", default=0, show_default=True,
              help="Of the nodes, how many run the node firmware (C: protocol, crypto, training) under QEMU "
                   "(Cortex-M4, mps2-an386), each with its own modem bridge to the broker; in virtual time a round "
                   "waits for them however long QEMU takes.")
@click.option("--baseline", is_flag=True, help="Also train the same task with plain Flower FedAvg + PyTorch fp32.")
@click.option("--baseline-lr", default=None, type=float,
              help="The baseline's fp32 SGD learning rate; default: chosen by the devices' rule, for fp32.")
@click.option("--clip-norm", default=None, type=float,
              help="L2 norm (real units) each node's update is clipped to, on the node and again at the coordinator; "
                   "default 0 (off); with --dp-epsilon the median norm of the updates the host makes from its own "
                   "data as the nodes' first round would (no privacy cost; docs/privacy.md); 0.5 with --secagg alone.")
@click.option("--dp-epsilon", default=0.0, show_default=True, type=float,
              help="Differential privacy: the budget epsilon (at --dp-delta) no node may exceed; Gaussian noise on "
                   "every aggregate, calibrated to --clip-norm; rounds stop when it is spent. 0: off. With --secagg "
                   "the nodes add discrete Gaussian noise before masking (distributed DP, docs/privacy.md).")
@click.option("--dp-delta", default=1e-5, show_default=True, type=float, help="The delta of --dp-epsilon.")
@click.option("--dp-noise-multiplier", default=0.0, show_default=True, type=float,
              help="Noise standard deviation / clip norm; 0: the smallest that keeps --rounds within the budget.")
@click.option("--secagg", is_flag=True,
              help="Secure aggregation: nodes send their clipped deltas masked (SecAgg+ over MQTT); the coordinator "
                   "learns only the sum of each round's survivors. Needs a clip norm > 0 (see --clip-norm).")
@click.option("--alone/--no-alone", default=False, show_default=True,
              help="Also train each node alone from the pretrained model, round by round as its rounds, and report "
                   "its accuracy per round beside the global and personalised ones (as much C training again as "
                   "the rounds' own).")
@click.option("--capture", is_flag=True,
              help="Record every MQTT payload the embedded broker carries (RUN/capture.jsonl) for `fedtiny "
                   "privacy-report`'s scan for raw samples.")
@click.option("--quiet", is_flag=True, help="Print only errors and the final summary line.")
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable output: one JSON object per line on stdout as the run goes ({\"event\": "
                   "\"note\"} for each phase line, \"round\" for each round, \"summary\" at the end); errors stay "
                   "one line on stderr.")
def simulate(nodes, rounds, scenario, data_file, model, strategy, strategy_options, fraction, quorum, local_steps,
             max_examples, max_staleness, clip_norm, scheme, budget, reserve, lr, epochs, chunk_size, uplink_keep,
             dropout, stragglers, deadline, realtime, seed, broker, fleet_dir, out, engine, qemu_nodes, baseline, baseline_lr,
             quiet, as_json, dp_epsilon, dp_delta, dp_noise_multiplier, secagg, alone, capture) -> None:
    """Run the whole system on this machine: coordinator, broker and NODES node agents over MQTT (or, with
    --engine flower, the coordinator and NODES ClientApps in Flower's simulation engine)."""
    from fedtiny_server.grid import MissingReplies
    from fedtiny_sim.simulate import JsonLines, LiveTable, QuietView, SimulationConfig, check_inputs
    from fedtiny_sim.simulate import simulate as run_simulation

    if quiet and as_json:
        raise UserError("--quiet and --json: choose one")
    config = SimulationConfig(nodes=nodes, rounds=rounds, scenario=scenario, data=data_file, model=model,
                              strategy=strategy, scheme=scheme, budget=parse_bytes(budget, "--budget"),
                              reserve=None if reserve is None else parse_bytes(reserve, "--reserve"), lr=lr,
                              epochs=epochs, chunk_size=chunk_size, uplink_keep=uplink_keep,
                              dropout=dropout, stragglers=stragglers, deadline=deadline, seed=seed, broker=broker,
                              fleet_dir=fleet_dir, out=out, engine=engine, qemu_nodes=qemu_nodes, baseline=baseline,
                              baseline_lr=baseline_lr, realtime=realtime, strategy_options=",".join(strategy_options),
                              fraction=fraction, quorum=quorum, local_steps=local_steps, max_examples=max_examples,
                              max_staleness=max_staleness, clip_norm=clip_norm, dp_epsilon=dp_epsilon, dp_delta=dp_delta,
                              dp_noise_multiplier=dp_noise_multiplier, secagg=secagg, alone=alone, capture=capture)
    view = QuietView() if quiet else JsonLines() if as_json else None
    say = view.note if view is not None else note
    with user_errors():
        task = check_inputs(config, say, progress=say)  # every input problem, before the live table and training
    # user_errors: a plan too big for the budget, known after pretraining
    with view or LiveTable(rounds, qemu_nodes, privacy=bool(dp_epsilon)) as live, user_errors():
        try:
            result = run_simulation(config, progress=live, task=task, note=live.note)  # a line per phase
        except MissingReplies as err:  # a node process died: not the user's input, but one line, not a traceback
            raise click.ClickException(str(err)) from err
    final = dict(report=f"{out}/report.html", initial_accuracy=result["initial_accuracy"],
                 accuracy=result["rounds"][-1]["accuracy"], wall_seconds=result["wall_seconds"],
                 clock=result["clock"], privacy=result["privacy"], stopped=result["stopped"])
    b = result["baseline"]
    if as_json:
        view.emit("summary", **final, baseline=None if not b else dict(
            accuracy=b["rounds"][-1]["accuracy"], bytes_per_node_per_round=b["bytes_per_node_per_round"],
            wall_seconds=b["wall_seconds"]))
        return
    gap = "" if quiet else "\n"  # a blank line under the live table
    if result["privacy"]:
        p = result["privacy"]
        click.echo(f"{gap}privacy: epsilon {p['epsilon']:.3f} of {p['budget']:g} at delta {p['delta']:g} (noise "
                   f"multiplier {p['noise_multiplier']:.3f}, clip norm {p['clip_norm']:g}, {p['noised_rounds']} noised "
                   f"rounds" + (f"; each node's noise std {p['device_noise_sigma']:.4g}, calibrated for "
                                f"{p['min_survivors']} survivors" if p.get("distributed") else "") + ")"
                   + (f"; {result['stopped']}" if result["stopped"] else ""))
    click.echo(f"{gap}report: {out}/report.html and summary.md (accuracy {100 * final['initial_accuracy']:.1f} % -> "
               f"{100 * final['accuracy']:.1f} %, {final['wall_seconds']:.1f} s)")
    if capture:
        click.echo(f"capture: {out}/capture.jsonl; `fedtiny privacy-report {out}` scans it for raw samples")
    if b:
        click.echo(f"baseline (Flower FedAvg + PyTorch fp32): accuracy {100 * b['rounds'][-1]['accuracy']:.1f} %, "
                   f"{b['bytes_per_node_per_round']:,.0f} B per node per round, {b['wall_seconds']:.1f} s")


# --- privacy evidence (docs/privacy.md, "Evidence") ----------------------------------------------------------------

@main.group()
def audit() -> None:
    """The coordinator's signed, hash-chained audit log."""


@audit.command("verify")
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False),
              help="The coordinator's audit public key (PEM): audit.pub in the fleet's provisioning folder or in "
                   "coordinator/.")
@click.option("--allow-open", is_flag=True,
              help="Accept a log without its closing record (a coordinator still running).")
def audit_verify(log: str, key_file: str, allow_open: bool) -> None:
    """Check every line's signature and its link to the line before; name the first bad line (exit 2)."""
    from .audit import AuditError, load_public_key, verify

    try:
        result = verify(log, load_public_key(key_file), require_closed=not allow_open)
    except AuditError as err:
        raise UserError(str(err)) from None
    events = [e["event"] for e in result.events]
    rounds = sum(e == "round_completed" for e in events)
    click.echo(f"{log}: {result.lines} lines verified (key {result.key_id}), {rounds} rounds, "
               + ("closed" if result.closed else "open: no closing record yet"))


@main.command("privacy-report")
@click.argument("run_dir", type=click.Path())
@click.option("--key", "key_file", default=None, type=click.Path(dir_okay=False),
              help="The audit public key; default: RUN_DIR/fleet/audit.pub.")
@click.option("--attack", is_flag=True,
              help="Also measure a membership-inference attack on the run's models and updates (AUC; minutes on "
                   "a large run).")
def privacy_report(run_dir: str, key_file: str | None, attack: bool) -> None:
    """Write RUN_DIR/privacy_report.html and privacy_report.md: what left each device, what the coordinator saw,
    epsilon spent, keys, retention, the audit log's check, the capture scan and a map to GDPR, HIPAA and
    IEC 62443-3-3."""
    from fedtiny_sim.privacy_report import ReportError, write_privacy_report

    try:
        html, markdown, lines = write_privacy_report(run_dir, key_file, attack)
    except ReportError as err:
        raise UserError(str(err)) from None
    for line in lines:
        click.echo(line)
    click.echo(f"wrote {html} and {markdown}")
