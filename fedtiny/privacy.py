"""Differential privacy accounting: what a run's noise buys, per device and for the fleet (docs/privacy.md).

The mechanism accounted for is DP-FedAvg's (McMahan et al., ICLR'18): every device's update is clipped to an L2
norm C (real units), the coordinator sums the clipped updates of a round and adds Gaussian noise of standard
deviation z * C (z: the noise multiplier), then divides by the number of updates. One round is then one Gaussian
mechanism of noise multiplier z with respect to adding or removing one device's data (user-level DP).

Epsilon comes from dp-accounting (Google's accountant, the one flwr[dp] wraps), RDP at a stated delta. No
amplification by sampling is claimed: the coordinator samples among the devices that happen to be online, not by
Poisson sampling from a fixed population, so a round costs each device that took part a whole Gaussian mechanism
and costs nothing to a device that did not (its data were not used). A device's epsilon therefore counts the
rounds it contributed to; the fleet's epsilon is the largest of them (the guarantee every device has).

    epsilon               (epsilon at delta) after `releases` Gaussian mechanisms of multiplier z, optionally
                          Poisson-subsampled at a rate q (for comparisons with the literature)
    noise_multiplier_for  the smallest z whose `releases` rounds stay within (epsilon, delta)
    PrivacyLedger         the releases each device took part in, its epsilon and the fleet's, and the budget check
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

DEFAULT_DELTA = 1e-5  # below 1 / (number of devices) for fleets of up to 100,000 devices


def check_budget(epsilon: float, delta: float) -> None:
    """ValueError naming the bad value unless 0 < epsilon < inf and 0 < delta < 1."""
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon {epsilon}: must be a positive finite number")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta {delta}: must be strictly between 0 and 1")


def _event(noise_multiplier: float, releases: int, sampling_rate: float):
    import dp_accounting

    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    return dp_accounting.SelfComposedDpEvent(event, releases)


def _accountant():
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant()  # dp-accounting's default orders; add-or-remove-one neighbouring


@lru_cache(maxsize=1024)  # a ledger asks for the same few (z, releases) again every round
def epsilon(noise_multiplier: float, releases: int, delta: float, sampling_rate: float = 1.0) -> float:
    """Epsilon at `delta` after `releases` Gaussian mechanisms of multiplier z (each Poisson-subsampled at
    `sampling_rate` if below 1). 0.0 for no release; inf for z = 0 and at least one release."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = _accountant()
    accountant.compose(_event(noise_multiplier, releases, sampling_rate))
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(target_epsilon: float, delta: float, releases: int, sampling_rate: float = 1.0) -> float:
    """The smallest noise multiplier (to dp-accounting's bisection tolerance, rounded up) whose `releases` rounds
    spend at most target_epsilon at delta."""
    import dp_accounting

    check_budget(target_epsilon, delta)
    if releases < 1:
        raise ValueError(f"releases {releases}: at least 1")
    z = dp_accounting.calibrate_dp_mechanism(
        _accountant, lambda z: _event(z, releases, sampling_rate), target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4)
    z = float(z)
    while epsilon(z, releases, delta, sampling_rate) > target_epsilon:  # the bisection's end may sit just below
        z *= 1.0001
    return z


@dataclass
class PrivacyLedger:
    """Releases per device under a fixed noise multiplier, and the budget they are spent against.

    `record(devices)` after a noised aggregate was released with these devices' updates in it; `would_exceed()`
    before a round: whether one more release could take some device past the budget (the coordinator then stops
    scheduling rounds). Device keys are whatever the caller counts by (the coordinator: node ids)."""

    noise_multiplier: float
    delta: float = DEFAULT_DELTA
    budget: float = math.inf  # epsilon at `delta` no device may exceed
    releases: dict[int, int] = field(default_factory=dict)  # device -> rounds its update was in
    rounds: int = 0  # noised aggregates released

    def record(self, devices) -> None:
        self.rounds += 1
        for d in devices:
            self.releases[d] = self.releases.get(d, 0) + 1

    def device_epsilon(self, device) -> float:
        return epsilon(self.noise_multiplier, self.releases.get(device, 0), self.delta)

    def fleet_epsilon(self) -> float:
        """The epsilon every device stays within: that of the device in the most releases."""
        return epsilon(self.noise_multiplier, max(self.releases.values(), default=0), self.delta)

    def would_exceed(self) -> bool:
        """Whether a device in every release so far could pass the budget with the next one."""
        return epsilon(self.noise_multiplier, max(self.releases.values(), default=0) + 1, self.delta) > self.budget


def fleet_noise_warning(noise_multiplier: float, clip_norm: float, per_round: int, weight_rms: float,
                        epsilon: float, rounds: int) -> str | None:
    """One line when the central noise on a round's mean update (std z * C / per_round on every coordinate) is
    larger than the trainable weights themselves (their RMS in real units): then every round moves each weight by
    more than its own size at random, and the fleet is too small for the budget. None when the noise is smaller.
    Measured on `medical` (weights' RMS 0.086), 20 nodes, 10 rounds (BENCHMARKS.md): noise 0.6x the weights cost
    1.8 points of accuracy, 1.1x 5.3 points, 3.7x 9.7 points; 5 nodes at 6.6x fell from 97.4 % to 20.2 % in two
    rounds."""
    std = noise_multiplier * clip_norm / max(1, per_round)
    if not weight_rms > 0 or std <= weight_rms:
        return None
    needed = math.ceil(noise_multiplier * clip_norm / weight_rms)
    return (f"Warning: --dp-epsilon {epsilon:g} over {rounds} round(s) needs noise multiplier {noise_multiplier:.2f}: "
            f"each round's mean update from {per_round} node(s) gets noise of std {std:.3g} per coordinate, "
            f"{std / weight_rms:.1f}x the trainable weights' RMS ({weight_rms:.3g}): the budget is too small for this "
            f"fleet; the noise will cost accuracy, the more the larger that ratio. For noise below the weights' size: "
            f"at least {needed} nodes per round, a larger --dp-epsilon or fewer --rounds.")
