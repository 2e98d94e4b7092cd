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
    from .codegen import codegen_command
    from .protocol.keys import keys_command

    main.add_command(keys_command, "keys")
    main.add_command(codegen_command, "codegen")


_register()
