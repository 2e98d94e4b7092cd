"""`fedtiny coordinator` and `fedtiny broker-config` (registered by fedtiny.cli)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a plant network has no internet
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@click.command("coordinator", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--broker", required=True, help="mqtts://HOST:PORT (TLS) or mqtt://HOST:PORT (loopback only).")
@click.option("--fleet-dir", type=click.Path(file_okay=False, exists=True), required=True,
              help="Directory written by `fedtiny keys`.")
@click.option("--fleet", required=True, help="Fleet name.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, exists=True), required=True,
              help="Training plan file (the one flashed on the devices).")
@click.option("--rounds", type=int, default=10, show_default=True)
@click.option("--strategy", default="fedavg", show_default=True,
              help="fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad, fedmedian, fedtrimmedavg, krum, "
                   "multikrum or fedbuff (semi-asynchronous).")
@click.option("--strategy-option", "strategy_options", multiple=True, metavar="KEY=VALUE",
              help="Strategy constructor argument, e.g. beta=0.2, num_malicious_nodes=1, buffer_size=8.")
@click.option("--fraction", type=float, default=1.0, show_default=True,
              help="Fraction of recently seen devices sampled per round.")
@click.option("--quorum", type=float, default=0.8, show_default=True,
              help="Fraction of the cohort whose replies end a round early.")
@click.option("--deadline", type=float, default=120.0, show_default=True, help="Seconds a round waits at most.")
@click.option("--seen-within", type=float, default=600.0, show_default=True,
              help="Sample only devices heard from within this many seconds.")
@click.option("--max-examples", type=int, default=10_000, show_default=True,
              help="Clamp of a device's num_examples (its aggregation weight).")
@click.option("--max-staleness", type=int, default=0, show_default=True,
              help="Semi-asynchronous: accept replies up to this many versions old (fedbuff).")
@click.option("--local-steps", type=int, default=0, show_default=True, help="Steps per round (0: one epoch).")
@click.option("--state-db", type=click.Path(dir_okay=False), required=True,
              help="SQLite checkpoint; an existing one resumes its run.")
@click.option("--heldout", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Held-out set (.npz/.csv) for server-side evaluation of the int8 model.")
@click.option("--metrics-port", type=int, default=0, help="Prometheus endpoint port (0: off).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.option("--chunk-size", type=int, default=4096, show_default=True)
@click.option("--uplink-keep", type=float, default=1.0, show_default=True,
              help="Fraction of each tensor's changes a device sends per round (largest first); the rest is kept "
                   "on the device and sent later.")
@click.option("--clip-norm", type=float, default=0.0, show_default=True,
              help="L2 norm (real units) every device update is clipped to, on the device and again here; 0: off.")
@click.option("--dp-epsilon", type=float, default=0.0, show_default=True,
              help="Central differential privacy: the budget epsilon (at --dp-delta) no device may exceed; Gaussian "
                   "noise on every aggregate, calibrated to --clip-norm; rounds stop when it is spent. 0: off.")
@click.option("--dp-delta", type=float, default=1e-5, show_default=True, help="The delta of --dp-epsilon.")
@click.option("--dp-noise-multiplier", type=float, default=0.0, show_default=True,
              help="Noise standard deviation / clip norm; 0: the smallest that keeps --rounds within the budget.")
@click.option("--secagg", is_flag=True,
              help="Secure aggregation: devices send masked deltas and this coordinator learns only each round's "
                   "sum (needs --clip-norm; no robust strategy; with --dp-epsilon the devices add the noise: "
                   "distributed DP; firmware nodes refuse it).")
@click.option("--audit-log", type=click.Path(dir_okay=False), default=None,
              help="The signed, hash-chained audit log (checked by `fedtiny audit verify`); an existing one is "
                   "continued. Default: --state-db's name with .audit.jsonl.")
def coordinator_command(broker, fleet_dir, fleet, plan_path, rounds, strategy, strategy_options, fraction, quorum,
                        deadline, seen_within, max_examples, max_staleness, local_steps, state_db,
                        heldout, metrics_port, metrics_host, chunk_size, uplink_keep, clip_norm, dp_epsilon, dp_delta,
                        dp_noise_multiplier, secagg, audit_log) -> None:
    """Run federated rounds over a fleet of microcontrollers with a Flower strategy; resumable."""
    from fedtiny.cli import UserError

    from . import ops
    from .app import Settings, run_coordinator

    settings = Settings(broker, fleet_dir, fleet, plan_path, state_db, rounds, strategy, ",".join(strategy_options),
                        fraction, quorum, deadline, seen_within, max_examples, max_staleness, local_steps,
                        heldout or "", metrics_port, metrics_host, chunk_size, uplink_keep, clip_norm,
                        dp_epsilon=dp_epsilon, dp_delta=dp_delta, dp_noise_multiplier=dp_noise_multiplier,
                        secagg=int(secagg), audit_log=audit_log or "")
    if dp_epsilon:
        from .privacy import check_options

        try:
            check_options(dp_epsilon, dp_delta, clip_norm, dp_noise_multiplier, strategy)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    if secagg:
        from .secagg import check_strategy

        try:
            check_strategy(strategy)
        except ValueError as exc:
            raise UserError(f"--secagg: {exc}") from exc
        if not clip_norm > 0:
            raise UserError("--secagg needs --clip-norm > 0 (the devices clip; the coordinator sees only sums)")
    ops.setup_json_logging(sys.stderr)
    try:
        history = run_coordinator(settings)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    empty = [r.round for r in history if r.replies == 0]
    if empty:  # a fleet that answers nothing is an outage, not a successful run
        click.echo(f"error: {len(empty)} of {len(history)} rounds got no device replies (rounds "
                   f"{', '.join(map(str, empty[:10]))}{' ...' if len(empty) > 10 else ''}); see the message_rejected "
                   f"and round_completed events above", err=True)
        sys.exit(3)


@click.command("broker-config", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--fleet-dir", type=click.Path(file_okay=False, exists=True), required=True)
@click.option("--port", type=int, default=8883, show_default=True, help="TLS listener, client certificates.")
@click.option("--password-port", type=int, default=None, help="Optional TLS listener with password login.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--max-packet-size", type=int, default=0, help="Disconnect clients sending more (0: no limit).")
@click.option("--persistence-dir", type=click.Path(file_okay=False), default=None,
              help="Keep sessions, queued downlinks and retained STATUS across broker restarts in DIR/mosquitto.db "
                   "(saved every 60 s and at shutdown); DIR must exist and be writable by mosquitto's user.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
def broker_config_command(fleet_dir, port, password_port, host, max_packet_size, persistence_dir, output) -> None:
    """Write a mosquitto 2.0 config for a fleet: TLS, client certificates or passwords, ACL, TCP_NODELAY,
    and a queue limit the coordinator cannot overflow."""
    from fedtiny.protocol.brokers import mosquitto_config

    text = mosquitto_config(fleet_dir, port, password_port=password_port, host=host, max_packet_size=max_packet_size,
                            persistence_dir=persistence_dir)
    Path(output).write_text(text)
    click.echo(f"wrote {output} (listener {host}:{port})")
