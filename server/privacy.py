"""Differential privacy at the coordinator: central DP (CentralPrivacy, Flower's DP strategy wrapper fitted to a
fleet) and, under secure aggregation, the coordinator's part of distributed DP (DistributedPrivacy: it sets the
devices' noise, accounts and stops; the devices add the noise).

Without secure aggregation the coordinator sees every device's update, so the noise that protects a device's
data in the released global model is added here, to the aggregate (DP-FedAvg, docs/privacy.md). The wrapper is
Flower's own DifferentialPrivacyServerSideFixedClipping (which clips every reply's update to C in float before the
strategy's aggregation and adds Gaussian noise after it); its configure_train and evaluation pass-through are used
as they are, its aggregate_train is redone with the changes a fleet needs:

- devices clip too: the TASK carries clip_norm, the device's uplink pipeline clips its integer delta and the
  FleetGrid clips the integers again; the float clipping after that is a no-op kept as the guarantee, written
  here because Flower's divides by the update's norm (an all-zero update raised ZeroDivisionError);
- every reply weighs the same: a weighted FedAvg lets one device count for more than 1/m of the mean, beyond
  the sensitivity the noise is calibrated to, so the weights are set equal (as Flower's accounted mode demands);
- a fixed denominator (DP-FedAvg's): the sum of the m clipped updates that came back is divided by the n devices
  the round was sent to, and the noise's standard deviation is z * C / n. Flower divides the noise by the number
  sampled but the updates by the number that answered, which under-noises a round where devices dropped out;
  dividing both by m instead would multiply the noise by n / m exactly when few answer;
- the noise comes from a seeded numpy Generator in simulations (a seed reproduces a run) and from the operating
  system's entropy otherwise (noise a party can predict protects nothing);
- accounting by fedtiny.privacy.PrivacyLedger on dp-accounting: epsilon per device and for the fleet in every
  round's train metrics, and configure_train raises Flower's PrivacyBudgetExhausted instead of starting a round
  that could take a device past the budget (the coordinator then stops and says why).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from fedtiny.privacy import PrivacyLedger, epsilon, zcdp_epsilon

# the strategies whose aggregate is the (weighted) mean of the replies, which the noise is calibrated to
MEAN_STRATEGIES = ("fedavg", "fedprox")


class CentralPrivacy(DifferentialPrivacyServerSideFixedClipping):
    def __init__(self, strategy, ledger: PrivacyLedger, clip_norm: float, noise_seed: int | None = None,
                 clip_rule: str = "") -> None:
        if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
            raise ValueError(f"differential privacy needs a strategy that averages the updates "
                             f"({', '.join(MEAN_STRATEGIES)}), not {type(strategy).__name__}")
        # num_sampled_clients (1) is Flower's denominator, unused: ours is each round's count of devices asked
        super().__init__(strategy, ledger.noise_multiplier, clip_norm, 1)
        self.ledger = ledger
        self.noise_seed = noise_seed
        self.clip_rule = clip_rule or CLIP_GIVEN  # how clip_norm was chosen (privacy_summary)
        self._asked: dict[int, int] = {}  # round -> devices its train messages went to (the fixed denominator)

    def __repr__(self) -> str:
        return "fedtiny central DP (Flower server-side fixed clipping, equal weights, a fixed denominator)"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        if self.ledger.would_exceed():
            raise PrivacyBudgetExhausted(
                f"privacy budget spent: epsilon {self.ledger.fleet_epsilon():.3f} of {self.ledger.budget:g} at "
                f"delta {self.ledger.delta:g} after {self.ledger.rounds} noised rounds; one more could exceed it")
        config["clip_norm"] = float(self.clipping_norm)  # into the TASK: devices clip, the grid clips again
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._asked[server_round] = len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies):
        replies = [r for r in replies if not r.has_error()]
        if not replies:
            return None, None
        weight_key = self.strategy.weighted_by_key
        for reply in replies:
            for record in reply.content.metric_records.values():
                record[weight_key] = 1
        self._clip(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        asked = max(self._asked.pop(server_round, len(replies)), len(replies))
        arrays = self._noised(self._scaled(arrays, len(replies) / asked), server_round, asked)
        self.ledger.record(r.metadata.src_node_id for r in replies)
        metrics = MetricRecord(dict(metrics or {}))
        metrics["epsilon"] = self.ledger.fleet_epsilon()
        metrics["noise-stddev"] = self.noise_stddev(asked)
        return arrays, metrics

    def _scaled(self, mean: ArrayRecord, factor: float) -> ArrayRecord:
        """The round's arrays moved by `factor` times the mean update: sum / asked = mean * answered / asked."""
        if factor == 1.0:
            return mean
        current = {k: v.numpy() for k, v in self.current_arrays.items()}
        return ArrayRecord({k: Array(current[k] + (np.asarray(v.numpy(), np.float64) - current[k]) * factor)
                            for k, v in mean.items()})

    def _clip(self, replies) -> None:
        """Each reply's update (its arrays minus the round's) scaled to L2 norm at most C, in place. Flower's
        compute_clip_model_update does the same but divides by the norm, so one all-zero update (a device that
        learned nothing, or sent nothing above its error-feedback threshold) raises ZeroDivisionError."""
        current = {k: v.numpy() for k, v in self.current_arrays.items()}
        for reply in replies:
            for key, record in list(reply.content.array_records.items()):
                update = {k: np.asarray(v.numpy(), np.float64) - current[k] for k, v in record.items()}
                norm = float(np.sqrt(sum(float(np.sum(u * u)) for u in update.values())))
                if norm > self.clipping_norm:
                    factor = self.clipping_norm / norm
                    reply.content[key] = ArrayRecord({k: Array(current[k] + u * factor) for k, u in update.items()})

    def noise_stddev(self, asked: int) -> float:
        """Of each coordinate of the sum of clipped updates divided by the `asked` devices: z * C / asked."""
        return self.noise_multiplier * self.clipping_norm / max(1, asked)

    def _noised(self, aggregated_arrays: ArrayRecord, server_round: int, asked: int) -> ArrayRecord:
        """Plus N(0, noise_stddev(asked)^2) on every coordinate, from a Generator seeded by (noise_seed, round),
        or by the operating system's entropy without a noise seed."""
        rng = np.random.default_rng(None if self.noise_seed is None else [self.noise_seed, server_round])
        std = self.noise_stddev(asked)
        return ArrayRecord({k: Array(np.asarray(v.numpy(), np.float64) + rng.normal(0.0, std, v.numpy().shape))
                            for k, v in aggregated_arrays.items()})

    # --- the ledger in the coordinator's checkpoint (rounds.strategy_state) -----------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        ids = sorted(self.ledger.releases)
        return {"privacy/devices": np.array(ids, np.int64),
                "privacy/releases": np.array([self.ledger.releases[i] for i in ids], np.int64),
                "privacy/rounds": np.array([self.ledger.rounds], np.int64)}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        if "privacy/rounds" not in arrays:
            return
        self.ledger.releases = dict(zip(arrays["privacy/devices"].tolist(), arrays["privacy/releases"].tolist()))
        self.ledger.rounds = int(arrays["privacy/rounds"][0])


class DistributedPrivacy:
    """Distributed DP under secure aggregation (fedtiny/privacy.py, "distributed DP"): the devices add the noise,
    the coordinator only sees the survivors' noised sum (server/secagg.py), so nothing is added here. It wraps the
    strategy to
    - put the devices' noise into every TASK: noise_sigma = z C / sqrt(m) (real units, a float32 rounded up), m =
      the survivors the round expects (fedtiny.privacy.calibrated_survivors: the quorum's share of the cohort, no
      more than a device can count among its neighbours, at least the secure-aggregation threshold), which is also
      the fewest survivors the round may be unmasked with ("min_survivors", also in the TASK: the coordinator fails
      a round with fewer before any share is revealed, and each device refuses to reveal its shares when told of
      fewer);
    - account: each released round costs its survivors rho(n) (zCDP, dp-accounting's ZCDpEvent), epsilon per device
      and for the fleet in the round's train metrics;
    - stop: configure_train raises PrivacyBudgetExhausted when a round with m survivors could take a device past
      the budget.
    m, and with it the noise, is fixed by the first round's cohort and the round policy's quorum (the ledger);
    later rounds keep it."""

    def __init__(self, strategy, settings: PrivacySettings, plan, rounds: int) -> None:
        if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
            raise ValueError(f"differential privacy needs a strategy that averages the updates "
                             f"({', '.join(MEAN_STRATEGIES)}), not {type(strategy).__name__}")
        from fedtiny.protocol.update import row_scales

        self.strategy, self.settings, self.rounds = strategy, settings, rounds
        self.row_scales = {n: (s, int(np.prod(plan.buffers[n].shape)) // len(s)) for n, s in row_scales(plan).items()}
        self.ledger = None  # fedtiny.privacy.DistributedLedger, made for the first round's cohort
        self._loaded: dict[str, np.ndarray] = {}
        self._grid = None

    def __repr__(self) -> str:
        return "fedtiny distributed DP (devices' discrete Gaussian noise under secure aggregation)"

    def __getattr__(self, name):  # everything else is the wrapped strategy's (weighted_by_key, summary, ...)
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    @property
    def clipping_norm(self) -> float:
        return self.settings.clip_norm

    def _ledger_for(self, cohort: int, survival: float = 1.0):
        """The ledger, made for the first round's cohort with `survival` (the round policy's quorum) of it
        expected to survive."""
        from fedtiny.privacy import calibrated_survivors, distributed_noise

        if self.ledger is None:
            m = calibrated_survivors(cohort, survival)
            z = self.settings.noise_multiplier
            self.ledger = distributed_noise(self.settings.epsilon, self.settings.delta, self.rounds,
                                            self.settings.clip_norm, m, cohort, self.row_scales, noise_multiplier=z)
            self._restore()
        self.ledger.cohort = max(self.ledger.cohort, cohort)
        return self.ledger

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        config["clip_norm"] = float(self.settings.clip_norm)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._grid = grid
        if not messages:
            return messages
        ledger = self._ledger_for(len(messages), getattr(getattr(grid, "policy", None), "quorum", 1.0))
        if ledger.would_exceed():
            raise PrivacyBudgetExhausted(
                f"privacy budget spent: epsilon {ledger.fleet_epsilon():.3f} of {ledger.budget:g} at delta "
                f"{ledger.delta:g} after {ledger.rounds} noised rounds; one more could exceed it")
        for message in messages:
            for record in message.content.config_records.values():
                record["noise_sigma"] = float(ledger.device_sigma)
                record["min_survivors"] = int(ledger.min_survivors)  # the coordinator's rule and the TASK's
        return messages

    def aggregate_train(self, server_round: int, replies):
        replies = [r for r in replies if not r.has_error()]
        if not replies:  # the round's secure aggregation failed: nothing was released, nothing is spent
            return None, None
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or self.ledger is None:
            return arrays, metrics
        survivors = int(replies[0].content.metric_records["metrics"]["num-examples"])
        ids = {r.device: r.device_id for r in self._grid.registry.values()} if self._grid is not None else {}
        accepted = self._grid._accepted_in(server_round) if self._grid is not None else set()
        self.ledger.record([ids[d] for d in sorted(accepted) if d in ids], survivors)
        metrics = MetricRecord(dict(metrics or {}))
        metrics["epsilon"] = self.ledger.fleet_epsilon()
        metrics["noise-stddev"] = self.ledger.device_sigma / math.sqrt(survivors)  # of the survivors' mean
        return arrays, metrics

    # --- the ledger in the coordinator's checkpoint (rounds.strategy_state) -----------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        if self.ledger is None:
            return dict(self._loaded)
        pairs = [(d, n) for d, rounds in sorted(self.ledger.participation.items()) for n in rounds]
        return {"privacy/participation": np.array(pairs, np.int64).reshape(-1, 2),  # (device, survivors) per round
                "privacy/rounds": np.array([self.ledger.rounds], np.int64),
                "privacy/round_rho": np.array(self.ledger.round_rho, np.float64).reshape(-1, 2)}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self._loaded = {k: v for k, v in arrays.items() if k.startswith("privacy/")}
        if self.ledger is not None:
            self._restore()

    def _restore(self) -> None:
        a = self._loaded
        if "privacy/participation" not in a:
            return
        self.ledger.participation = {}
        for d, n in a["privacy/participation"].tolist():
            self.ledger.participation.setdefault(int(d), []).append(int(n))
        self.ledger.rounds = int(a["privacy/rounds"][0])
        self.ledger.round_rho = [(int(n), float(r)) for n, r in a["privacy/round_rho"].tolist()]


def check_options(epsilon: float, delta: float, clip_norm: float | None, noise_multiplier: float, strategy: str
                  ) -> None:
    """ValueError naming the command-line option at fault (--dp-epsilon, --dp-delta, --clip-norm,
    --dp-noise-multiplier, --strategy) unless these make a run under central DP. clip_norm None: chosen later
    from the host's data (fedtiny simulate, fedtiny.privacy.clip_norm_rule)."""
    import math

    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"--dp-epsilon {epsilon}: must be a positive number")
    if not 0 < delta < 1:
        raise ValueError(f"--dp-delta {delta}: must be strictly between 0 and 1")
    if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):  # None: the host's rule
        raise ValueError(f"--clip-norm {clip_norm}: --dp-epsilon needs a positive clip norm (the noise is calibrated "
                         f"to the clipped updates' L2 norm)")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"--dp-noise-multiplier {noise_multiplier}: must be 0 (derived from the budget) or positive")
    if strategy.lower().replace("-", "").replace("_", "") not in MEAN_STRATEGIES:
        raise ValueError(f"--strategy {strategy}: differential privacy needs one that averages the updates "
                         f"({', '.join(MEAN_STRATEGIES)})")


CLIP_GIVEN = "clip norm given by the operator (--clip-norm)"


class PrivacySettings:
    """--dp-epsilon and its companions: the budget (epsilon at delta), the clip norm C in real units, and the noise
    multiplier z (0: the smallest that keeps the planned rounds within the budget, from dp-accounting)."""

    def __init__(self, epsilon: float, delta: float, clip_norm: float, noise_multiplier: float = 0.0,
                 noise_seed: int | None = None, clip_rule: str = "") -> None:
        from fedtiny.privacy import check_budget

        check_budget(epsilon, delta)
        if not clip_norm > 0 or not np.isfinite(clip_norm):
            raise ValueError(f"clip norm {clip_norm}: must be a positive finite number")
        if not noise_multiplier >= 0 or not np.isfinite(noise_multiplier):
            raise ValueError(f"noise multiplier {noise_multiplier}: must be 0 (derived from the budget) or positive")
        self.epsilon, self.delta, self.clip_norm = float(epsilon), float(delta), float(clip_norm)
        self.noise_multiplier, self.noise_seed = float(noise_multiplier), noise_seed
        self.clip_rule = clip_rule or CLIP_GIVEN  # how clip_norm was chosen: the run's settings and privacy report

    def wrap(self, strategy, rounds: int) -> CentralPrivacy:
        """`strategy` under central DP for a run of `rounds` rounds."""
        from fedtiny.privacy import noise_multiplier_for

        z = self.noise_multiplier or noise_multiplier_for(self.epsilon, self.delta, rounds)
        ledger = PrivacyLedger(z, self.delta, self.epsilon)
        return CentralPrivacy(strategy, ledger, self.clip_norm, self.noise_seed, self.clip_rule)


def privacy_summary(strategy, device_names: dict[int, str]) -> dict | None:
    """The run's DP settings and spending (None without DP): fleet epsilon and, per device name, its epsilon."""
    if isinstance(strategy, DistributedPrivacy):
        return distributed_summary(strategy, device_names)
    if not isinstance(strategy, CentralPrivacy):
        return None
    ledger = strategy.ledger
    rounds = dict(sorted((device_names.get(i, str(i)), n) for i, n in ledger.releases.items()))
    return dict(mechanism="central Gaussian (DP-FedAvg), user-level, add/remove one device, RDP via dp-accounting",
                epsilon=ledger.fleet_epsilon(), delta=ledger.delta, budget=ledger.budget,
                noise_multiplier=ledger.noise_multiplier, clip_norm=strategy.clipping_norm,
                clip_norm_rule=strategy.clip_rule,
                noised_rounds=ledger.rounds, device_rounds=rounds,
                device_epsilon={d: epsilon(ledger.noise_multiplier, n, ledger.delta) for d, n in rounds.items()})


def distributed_summary(strategy: DistributedPrivacy, device_names: dict[int, str]) -> dict | None:
    ledger = strategy.ledger
    if ledger is None:
        return None
    rounds = dict(sorted((device_names.get(i, str(i)), n) for i, n in ledger.releases.items()))
    rho = {device_names.get(i, str(i)): r for i, r in ledger.rho.items()}
    survivors = {device_names.get(i, str(i)): list(n) for i, n in ledger.participation.items()}
    return dict(mechanism="distributed discrete Gaussian under secure aggregation (Kairouz, Liu, Steinke ICML'21), "
                          "user-level, zero-out one device, zCDP composed with dp-accounting's RDP accountant",
                distributed=True, epsilon=ledger.fleet_epsilon(), delta=ledger.delta, budget=ledger.budget,
                noise_multiplier=ledger.noise_multiplier, clip_norm=ledger.clip_norm,
                clip_norm_rule=strategy.settings.clip_rule,
                device_noise_sigma=ledger.device_sigma, min_survivors=ledger.min_survivors,
                sigma2_min_lsb=ledger.sigma2_min, l1_lsb=ledger.l1_lsb, cohort=ledger.cohort,
                clamp_delta=ledger.clamp_delta(), noised_rounds=ledger.rounds,
                round_survivors=[n for n, _ in ledger.round_rho],
                round_rho=[r for _, r in ledger.round_rho], device_rounds=rounds,
                device_survivors=dict(sorted(survivors.items())),
                device_rho=dict(sorted(rho.items())),
                device_epsilon={d: zcdp_epsilon(r, ledger.delta) for d, r in sorted(rho.items())})
