"""The coordinator's own ServerApp (fedtiny_server.app:app) under a real Flower SuperLink, submitted with the real
`flwr run` from its own environment, reaching real NodeAgents through a real mosquitto (TLS, client
certificates, ACL) with its FleetGrid.

The app project is the one docs/deployment.md shows (its pyproject block), with this test's run config. The
devices are not SuperNodes and the app does not use the Grid Flower hands it, so no SuperNode is started: the
SuperLink runs a submitted ServerApp without one."""

import json
import re
import sqlite3
import tomllib
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from flower_deploy import FlowerDeployment, toml_table
from test_server_e2e import FLEET, NODES, fleet, start_agents, task  # noqa: F401 (fixtures)
from fedtiny.planfile import save_plan
from fedtiny_server.app import Settings
from fedtiny_server.rounds import heldout_evaluator

ROUNDS = 3
DOCS = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"


def write_app_project(folder: Path, run_config: dict) -> None:
    """The app project of docs/deployment.md with `run_config` in place of the documented values. The documented
    run config must name exactly the ServerApp's settings."""
    block = re.search(r"```toml\n(.*?)```", DOCS.read_text(), re.S).group(1)
    doc = tomllib.loads(block)
    documented = doc["tool"]["flwr"]["app"]["config"]
    assert set(documented) == {f.name.replace("_", "-") for f in fields(Settings)}, "docs/deployment.md run config"
    assert set(run_config) <= set(documented)
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text("\n".join([
        toml_table("project", doc["project"]),
        toml_table("tool.flwr.app", {"publisher": doc["tool"]["flwr"]["app"]["publisher"]}),
        toml_table("tool.flwr.app.components", doc["tool"]["flwr"]["app"]["components"]),
        toml_table("tool.flwr.app.config", {**documented, **run_config}),
    ]))


def _db(path, sql):
    with sqlite3.connect(path, timeout=5) as db:
        return db.execute(sql).fetchall()


def _checkpointed_round(path) -> str | None:
    """The last round in the ServerApp's checkpoint; None until its tables exist (the file comes first)."""
    try:
        return dict(_db(path, "SELECT key, value FROM meta")).get("round") if path.exists() else None
    except sqlite3.OperationalError:  # "no such table: meta": the store is being created
        return None


def test_serverapp_under_a_superlink(fleet, task, tmp_path, flwr_cli):  # noqa: F811
    url, keys, names = fleet
    plan, _, (hx, hy) = task
    plan_path, db, heldout = tmp_path / "mlp.plan", tmp_path / "coordinator.db", tmp_path / "heldout.npz"
    save_plan(plan, plan_path)
    np.savez(heldout, X=hx, y=hy)
    write_app_project(tmp_path / "app", {
        "broker": url, "fleet-dir": str(keys), "fleet": FLEET, "plan": str(plan_path), "state-db": str(db),
        "num-server-rounds": 100, "quorum": 1.0, "deadline": 30.0, "seen-within": 60.0, "heldout": str(heldout),
        "metrics-port": 0})
    agents = start_agents(url, keys, names, task, tmp_path / "nodes")
    try:
        with FlowerDeployment(tmp_path / "flower", flwr_cli) as flower:
            flower.wait(lambda: all(a.transport.connected.is_set() for a in agents), "devices to connect")
            flower.superlink()  # and no SuperNode
            run_id = flower.submit(tmp_path / "app", {"num-server-rounds": ROUNDS})  # flwr run --run-config
            flower.wait(lambda: _checkpointed_round(db) == str(ROUNDS), "the rounds")
            flower.wait(lambda: flower.run_status(run_id)[0].startswith("finished"), "the run to finish", every=1.0)
            status, details = flower.run_status(run_id)
            run_log = flower.run_log(run_id)
    finally:
        for a in agents:
            a.stop()
    assert status == "finished:completed", (status, details, run_log)

    # the checkpoint holds every round, each with all devices' replies, aggregated once
    assert dict(_db(db, "SELECT key, value FROM meta WHERE key IN ('round', 'model_version')")) == \
        {"round": str(ROUNDS), "model_version": str(ROUNDS)}
    rows = _db(db, "SELECT round, device, aggregated FROM replies ORDER BY round, device")
    assert rows == [(r, n, 1) for r in range(1, ROUNDS + 1) for n in names]
    assert dict(_db(db, "SELECT device, accepted FROM devices")) == {n: ROUNDS for n in names}
    assert _db(db, "SELECT value FROM meta WHERE key = 'link_replay'")  # the link's replay counters too
    metrics = {v: json.loads(m) for v, m in _db(db, "SELECT version, metrics FROM globals WHERE version > 0")}
    assert sorted(metrics) == list(range(1, ROUNDS + 1))
    assert all(m["replies"] == NODES and 0 <= m["train"]["accuracy"] <= 1 for m in metrics.values())

    # the held-out accuracy of the int8 model rose from near chance; the run's Flower log reports each round
    initial = heldout_evaluator(plan, SimpleNamespace(ints=plan.initial_state()), hx, hy)(0, None)["accuracy"]
    final = metrics[ROUNDS]["eval"]["accuracy"]
    assert final >= initial + 0.15 and final >= 0.8, (initial, [m["eval"] for m in metrics.values()])
    events = [json.loads(line[line.index("{"):]) for line in run_log.splitlines()
              if '"event":"round_completed"' in line]
    assert [(e["round"], e["replies"], e["eval"]["accuracy"]) for e in events] == \
        [(r, NODES, metrics[r]["eval"]["accuracy"]) for r in range(1, ROUNDS + 1)], run_log

    # the devices trained the last round from the version before it
    assert [a.model_version for a in agents] == [ROUNDS - 1] * NODES
