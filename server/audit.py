"""What the coordinator writes into its signed audit log (fedtiny/audit.py), in `fedtiny simulate` and
`fedtiny coordinator` alike.

    coordinator_started  the plan's and the global model's hashes, strategy, and the fleet as enrolled (pseudonyms of
                         the enrolled devices, and of the revoked ones with when), from the coordinator's folder
    devices_revoked      devices revoked while the coordinator ran (revoked.json, read before each round)
    round_configured     a round's settings before its TASKs go out: cohort (pseudonyms), sampling fraction, quorum,
                         deadline, clip norm, noise multiplier, secure aggregation (with its planned graph degree,
                         threshold and the fewest survivors it may be unmasked with), the devices' noise under
                         distributed DP, the TASK settings every device gets (noise_sigma too), the model version
                         and hash sent
    round_completed      whose updates the aggregate holds (pseudonyms), the new model's version and hash, under
                         secure aggregation the threshold and degree the round used, and the cumulative epsilon at
                         delta (the fleet's and each participant's) under DP
    run_stopped          why the run ended before its rounds (the privacy budget)
    audit_closed         the closing record (AuditLog.close)

Devices appear only as pseudonyms (AuditLog.pseudonym: a keyed hash of the name); whoever holds the coordinator's
audit key can map them back (`fedtiny privacy-report` does, on the coordinator's side).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from fedtiny.audit import PRIVATE_KEY_FILE, AuditLog, load_private_key


def model_hash(ints: dict[str, np.ndarray]) -> str:
    """SHA-256 over the global integers, buffer by buffer in name order (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name in sorted(ints):
        value = np.ascontiguousarray(ints[name])
        h.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def open_audit_log(path: str | Path, coordinator_dir: str | Path) -> AuditLog:
    """The coordinator's audit log at `path`, signed with coordinator_dir/audit.key (AuditError if it is missing:
    a fleet provisioned before the audit log existed needs a new fleet)."""
    key_file = Path(coordinator_dir) / PRIVATE_KEY_FILE
    if not key_file.exists():
        from fedtiny.audit import AuditError

        raise AuditError(f"{key_file} is missing: the coordinator signs its audit log with it; fleets provisioned by "
                         "`fedtiny keys` have it since the audit log exists (provision the fleet again)")
    return AuditLog(path, load_private_key(key_file))


class CoordinatorAudit:
    """The Coordinator's hooks (server/rounds.py) into an AuditLog."""

    def __init__(self, log: AuditLog, coordinator_dir: str | Path | None = None) -> None:
        self.log = log
        self.coordinator_dir = Path(coordinator_dir) if coordinator_dir is not None else None
        self.revoked: dict[str, str | None] = {}  # as the log last recorded it

    def _names(self, coordinator, node_ids) -> list[str]:
        by_id = {r.device_id: r.device for r in coordinator.grid.registry.values()}
        return sorted(self.log.pseudonym(by_id.get(i, str(i))) for i in node_ids)

    def _revoked(self) -> dict[str, str | None]:
        """The fleet's denylist (coordinator/revoked.json) as pseudonym -> when it was revoked."""
        denylist = self.coordinator_dir / "revoked.json" if self.coordinator_dir is not None else None
        if denylist is None or not denylist.exists():
            return {}
        return {self.log.pseudonym(d): v.get("revoked") for d, v in json.loads(denylist.read_text()).items()}

    def started(self, coordinator) -> None:
        from fedtiny.planfile import plan_hash

        enrolled = []
        if self.coordinator_dir is not None and (self.coordinator_dir / "fleet.json").exists():
            manifest = json.loads((self.coordinator_dir / "fleet.json").read_text())
            enrolled = sorted(self.log.pseudonym(d) for d in manifest["devices"])
        revoked = self.revoked = self._revoked()
        config = coordinator.config
        self.log.record("coordinator_started", round=coordinator.round, model_version=coordinator.model.version,
                        plan_hash=plan_hash(coordinator.plan).hex(), model_hash=model_hash(coordinator.model.ints),
                        strategy=config.strategy, rounds=config.rounds, enrolled=enrolled, revoked=revoked)

    def round_configured(self, coordinator, rnd: int, messages) -> None:
        revoked = self._revoked()  # a running coordinator refuses devices revoked meanwhile: say so first
        if revoked.keys() - self.revoked.keys():
            self.log.record("devices_revoked", round=rnd,
                            revoked={p: revoked[p] for p in sorted(revoked.keys() - self.revoked.keys())})
            self.revoked = revoked
        config, policy = coordinator.config, coordinator.config.policy
        task = {**policy.task, **config.train_config}
        sent = next(iter(messages[0].content.config_records.values()), {}) if messages else {}
        task.update({k: v for k, v in sent.items() if "-" not in k})  # what the strategy added (noise_sigma)
        privacy = config.privacy
        ledger = getattr(coordinator.strategy, "ledger", None)
        extra = {}
        if getattr(config, "secagg", False):
            from fedtiny.protocol.secagg import graph_degree, threshold

            degree = graph_degree(len(messages))
            extra["secagg"] = dict(graph_degree=degree, threshold=threshold(degree),
                                   min_survivors=int(sent.get("min_survivors", 0)))
        if ledger is not None and hasattr(ledger, "device_sigma"):  # distributed DP: the devices' noise
            extra["device_noise"] = dict(mechanism="discrete Gaussian per element (protocol/noise.py)",
                                         sigma=ledger.device_sigma, sigma2_min_lsb=ledger.sigma2_min,
                                         calibrated_for_survivors=ledger.min_survivors)
        self.log.record(
            "round_configured", round=rnd,
            cohort=self._names(coordinator, [m.metadata.dst_node_id for m in messages]),
            sampling_fraction=config.strategy_options.get("fraction_train", 1.0), quorum=policy.quorum,
            deadline=policy.deadline, clip_norm=float(task.get("clip_norm") or 0.0),
            noise_multiplier=float(ledger.noise_multiplier) if ledger is not None else 0.0,
            dp=None if privacy is None else {"epsilon_budget": privacy.epsilon, "delta": privacy.delta},
            secure_aggregation=bool(getattr(config, "secagg", False) or task.get("secagg")),
            task=task,  # every setting the devices get (clip_norm, noise_sigma, secagg, local_steps, ...)
            model_version=coordinator.model.version, model_hash=model_hash(coordinator.model.ints), **extra)

    def round_completed(self, coordinator, rnd: int, replies) -> None:
        if getattr(coordinator.config, "secagg", False):
            # Under secure aggregation one reply stands for the survivors' masked sum (server/secagg.py); the
            # survivors are the round's accepted devices.
            participants = sorted(self.log.pseudonym(d) for d in coordinator.grid._accepted_in(rnd)) if replies else []
        else:
            participants = self._names(coordinator, [m.metadata.src_node_id for m in replies])
        fields = dict(round=rnd, participants=participants, model_version=coordinator.model.version,
                      model_hash=model_hash(coordinator.model.ints))
        stages = getattr(coordinator.grid, "secagg_log", {}).get(rnd)
        if stages:  # the threshold and degree the round's secure aggregation used, and its counts
            keys = next((s for s in stages if s.get("stage") == "keys"), {})
            fields["secagg"] = dict(threshold=keys.get("threshold"), graph_degree=keys.get("degree"),
                                    sent_keys=keys.get("sent_keys"),
                                    masked=next((s.get("masked") for s in stages if s.get("stage") == "masked"), 0),
                                    failed=not replies)
        summary = coordinator.privacy()
        if summary is not None:
            fields.update(epsilon=summary["epsilon"], delta=summary["delta"], device_epsilon={
                self.log.pseudonym(d): e for d, e in summary["device_epsilon"].items()})
        self.log.record("round_completed", **fields)

    def stopped(self, coordinator, reason: str) -> None:
        self.log.record("run_stopped", round=coordinator.round, reason=reason)

    def close(self, coordinator=None) -> None:
        fields = {}
        if coordinator is not None:
            fields = dict(round=coordinator.round, model_version=coordinator.model.version,
                          model_hash=model_hash(coordinator.model.ints))
        self.log.close(**fields)
