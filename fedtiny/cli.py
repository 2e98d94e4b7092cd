"""The `fedtiny` command: one subcommand per stage of the data flow."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fedtiny")
def main() -> None:
    """Federated on-device training for microcontrollers."""
