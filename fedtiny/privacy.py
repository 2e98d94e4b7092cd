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


# The clip norm when the user gives none: this quantile of the update norms the host measures by playing the devices'
# first round on its own data (simulations/clipping.py). Andrew et al. ("Differentially Private Learning with
# Adaptive Clipping", NeurIPS'21) track the median of the devices' norms privately during training and find it a good
# target across tasks; the host's norms are a stand-in for it that costs no budget (clip_norm_rule). Measured
# (docs/privacy.md, BENCHMARKS.md "The clip norm under DP"): on `medical` 0.198 against the devices' median of
# 0.14-0.20; on `industrial` 0.381 against 0.43-0.47, where the devices' median itself did worse at epsilon 8 and 4
# than the rule's C and a smaller one: a C below the devices' norms scales step and noise alike, one above adds noise.
CLIP_QUANTILE = 0.5


def clip_norm_rule(norms) -> tuple[float, str]:
    """(C, why): CLIP_QUANTILE of the update norms (real units) the host measured on its own data, to 3
    significant digits, and the line that says so. It spends no privacy budget: the norms come from the host's
    samples, none from a device, so C is a public parameter of the mechanism (as the model's architecture), fixed
    before any device trains; the DP guarantee is about the devices' data (the host's own samples are not what it
    protects: they already shaped the pretrained model). ValueError when the quantile is 0 (the host's round moved
    no weight: nothing to calibrate to) or a norm is not finite."""
    import numpy as np

    norms = np.asarray(list(norms), np.float64)
    if not norms.size or not np.isfinite(norms).all():
        raise ValueError(f"update norms {norms.tolist()}: need at least one, all finite")
    value = float(f"{float(np.quantile(norms, CLIP_QUANTILE)):.3g}")
    if not value > 0:
        raise ValueError("the host's trial round moved no weight: no update norm to take the clip norm from")
    return value, (f"clip norm {value:g} from the host's data: quantile {CLIP_QUANTILE:g} of the L2 norms of "
                   f"{norms.size} updates it made as the devices' first round would ({norms.min():.3g}.."
                   f"{norms.max():.3g}); no device's data, so no privacy cost")


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


# --- distributed DP: the devices' discrete Gaussian noise under secure aggregation --------------------------------
#
# Each device adds discrete Gaussian noise N_Z(0, s_r) to row r of its clipped integer delta (protocol/noise.py,
# s_r = ceil((sigma / scale_r)^2) LSB^2); secure aggregation releases only the sum over the round's n survivors.
# Kairouz, Liu and Steinke ("The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
# Aggregation", ICML'21, Theorem 1 / Proposition 14): the sum of n independent N_Z(0, s)^d shifted by an integer
# vector of L2 norm D2 and L1 norm D1 has Renyi divergence at most alpha * eps^2 / 2 for every order alpha, where
# eps^2 = D2^2 / (n s) + tau D1 / 2 and tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 s k / (k + 1)): rho-zCDP with
# rho = eps^2 / 2. Per row r (independent blocks, Renyi divergences add) D2_r^2 / (n s_r) <= scale_r^2 D2_r^2 /
# (n sigma^2), and the rows' scale_r^2 D2_r^2 sum to the clipped delta's squared norm in real units, at most C^2:
#
#     rho(n) = C^2 / (2 n sigma^2) + tau(n, s_min) * L1 / 4,   L1 = C * sqrt(sum_r d_r / scale_r^2)
#
# (s_min the smallest row's s, L1 bounds the delta's L1 norm in LSB by Cauchy-Schwarz). The tau term is below
# 1e-300 once s_min >= 40 LSB^2 and is kept for the rest. dp-accounting has no event for a sum of discrete
# Gaussians (its PLD accountant knows one discrete Gaussian, DiscreteGaussianPrivacyLoss, and no Skellam), so
# each round is the ZCDpEvent(rho(n)) of its survivors, composed and converted to (epsilon, delta) by its RDP
# accountant, as the central mechanism's GaussianDpEvent (for the Gaussian, rho = 1 / (2 z^2) exactly).
#
# The clamp: each noised element is clamped to secure aggregation's bounds (secagg.value_bounds), which lie at least
# NOISE_TAIL = 12 noise standard deviations beyond the clipped delta, so the clamp acts only where a device's noise
# exceeds 12 sigma. The discrete Gaussian is sigma^2-sub-Gaussian (Canonne, Kamath, Steinke 2020: E e^(tX) <=
# e^(t^2 sigma^2 / 2)), so by Chernoff P[|X| > 12 sigma] <= 2 e^-72 per element. Coupled on the same noise, the run
# with the clamp differs from the accounted run without it only on an event of probability at most beta = 2 e^-72
# times the elements noised in released rounds (union bound); then for every set S of outcomes P'[S] <= P[S] + beta,
# and an (epsilon, delta) guarantee of the unclamped run becomes (epsilon, delta + (1 + e^epsilon) beta) for the
# clamped one: clamp_delta below, about 1e-24 for 50 devices x 20,000 elements x 10 rounds, in the summary and the
# report beside delta (the budget check is on delta alone: the term is 19 orders of magnitude below it).
#
# Neighbouring is zero-out: one device's update replaced by zero; who took part is visible to the coordinator
# anyway. The noise is calibrated for the survivors a round expects, m (calibrated_survivors), and no round is
# unmasked with fewer (the coordinator fails it before any share is revealed, and each device refuses to reveal
# when told of fewer): sigma = z C / sqrt(m), so that m survivors' summed noise has the central mechanism's z C; a
# round with more survivors spends less, accounted with its real count. The dropout assumption is explicit: a round
# where fewer than m devices survive is lost (nothing released, nothing spent), never released with less noise.

def calibrated_survivors(cohort: int, survival: float = 1.0) -> int:
    """m, the survivors the devices' noise is calibrated for, in a cohort of `cohort` of which a fraction
    `survival` is expected to survive (the coordinator's quorum: the replies that close a round): survival x
    cohort, but no more than a device can check among its neighbours (survival x graph degree + 1, on a sparse
    graph it sees only those), and at least the secure-aggregation threshold (and 3).

    Calibrating for the threshold instead (half the neighbours) gave every round sqrt(cohort / threshold) times
    central DP's noise when everyone survived (1.4x for 20 devices) and left that share of the budget unspent."""
    from fedtiny.protocol.secagg import graph_degree, threshold

    degree = graph_degree(cohort)
    expected = min(math.ceil(survival * cohort - 1e-9), math.floor(survival * degree + 1e-9) + 1)
    return max(3, threshold(degree), expected)


def float32_up(x: float) -> float:
    """The smallest float32 at least x: a TASK carries the devices' noise sigma as a float32, and rounding it
    down would give less noise than accounted for."""
    import numpy as np

    f = np.float32(x)
    return float(f if float(f) >= x else np.nextafter(f, np.float32(np.inf)))


def ddg_tau(survivors: int, sigma2_min: float) -> float:
    """Kairouz et al.'s tau for `survivors` devices each adding N_Z(0, s) with s >= sigma2_min."""
    return 10.0 * sum(math.exp(-2.0 * math.pi ** 2 * sigma2_min * k / (k + 1)) for k in range(1, survivors))


def distributed_rho(clip_norm: float, device_sigma: float, survivors: int, sigma2_min: float, l1_lsb: float
                    ) -> float:
    """rho (zCDP) of one round's sum over `survivors` devices, each adding discrete Gaussian noise of standard
    deviation device_sigma (real units) to a delta clipped to clip_norm; sigma2_min and l1_lsb from the plan
    (distributed_plan_constants)."""
    if survivors < 1 or not device_sigma > 0:
        return math.inf
    return clip_norm ** 2 / (2.0 * survivors * device_sigma ** 2) + ddg_tau(survivors, sigma2_min) * l1_lsb / 4.0


def plan_elements(row_scales: dict) -> int:
    """Trainable elements of a plan, from row_scales as distributed_plan_constants takes them."""
    return sum(len(scales) * per_row for scales, per_row in row_scales.values())


def distributed_plan_constants(row_scales: dict, clip_norm: float, device_sigma: float) -> tuple[float, float]:
    """(sigma2_min, l1_lsb): the smallest row's noise variance in LSB^2 as the devices compute it (noise.row_sigma2)
    and the bound C * sqrt(sum_r d_r / scale_r^2) on a clipped delta's L1 norm in LSB. row_scales: per trainable
    buffer, (row scales, elements per row)."""
    from fedtiny.protocol.noise import row_sigma2

    sigma2_min, total = math.inf, 0.0
    for scales, per_row in row_scales.values():
        for scale in scales:
            sigma2_min = min(sigma2_min, row_sigma2(device_sigma, float(scale)))
            total += per_row / float(scale) ** 2
    return float(sigma2_min), clip_norm * math.sqrt(total)


@lru_cache(maxsize=4096)
def zcdp_epsilon(rho: float, delta: float) -> float:
    """Epsilon at delta of rho-zCDP, by dp-accounting's RDP accountant (ZCDpEvent). 0.0 for rho 0."""
    import dp_accounting

    if rho <= 0:
        return 0.0
    if not math.isfinite(rho):
        return math.inf
    accountant = _accountant()
    accountant.compose(dp_accounting.ZCDpEvent(rho))
    return float(accountant.get_epsilon(delta))


@dataclass
class DistributedLedger:
    """The zCDP each device spent under distributed DP (rho adds up over rounds), and the budget check.

    `record(devices, survivors)` after a round's sum over `survivors` devices was released; `would_exceed()`
    before a round: whether a round unmasked with the fewest survivors allowed could take a device past the
    budget. Device keys as PrivacyLedger's."""

    noise_multiplier: float  # z: m survivors' summed noise has standard deviation z * C
    delta: float
    budget: float
    clip_norm: float
    device_sigma: float  # each device's noise, real units: z * C / sqrt(min_survivors)
    min_survivors: int  # m: no round is unmasked with fewer
    sigma2_min: float
    l1_lsb: float
    cohort: int  # the largest round: bounds tau, which grows with the survivors
    elements: int = 0  # trainable elements each device noises per round (the clamp's delta term)
    participation: dict[int, list[int]] = field(default_factory=dict)  # device -> survivors of each round it was in
    rounds: int = 0
    round_rho: list[tuple[int, float]] = field(default_factory=list)  # (survivors, rho) of each released round

    @property
    def rho(self) -> dict[int, float]:
        """device -> the zCDP rho it spent: its rounds' rho(n) summed (zCDP composes by addition)."""
        return {d: sum(self.round_cost(n) for n in rounds) for d, rounds in self.participation.items()}

    @property
    def releases(self) -> dict[int, int]:
        return {d: len(rounds) for d, rounds in self.participation.items()}

    def round_cost(self, survivors: int) -> float:
        return distributed_rho(self.clip_norm, self.device_sigma, survivors, self.sigma2_min, self.l1_lsb)

    def worst_round(self) -> float:
        """A round's largest rho: m survivors' first term and the largest cohort's tau."""
        return self.clip_norm ** 2 / (2.0 * self.min_survivors * self.device_sigma ** 2) + \
            ddg_tau(max(self.cohort, self.min_survivors), self.sigma2_min) * self.l1_lsb / 4.0

    def clamp_delta(self, epsilon: float | None = None) -> float:
        """What the clamp at NOISE_TAIL standard deviations adds to delta at `epsilon` (default: the fleet's):
        (1 + e^epsilon) beta, beta = 2 e^(-NOISE_TAIL^2 / 2) per element noised in a released round (above)."""
        from fedtiny.protocol.secagg import NOISE_TAIL

        eps = self.fleet_epsilon() if epsilon is None else epsilon
        beta = 2.0 * math.exp(-NOISE_TAIL ** 2 / 2.0) * self.elements * sum(n for n, _ in self.round_rho)
        return min(1.0, (1.0 + math.exp(min(eps, 700.0))) * beta)

    def record(self, devices, survivors: int) -> None:
        self.rounds += 1
        self.round_rho.append((survivors, self.round_cost(survivors)))
        for d in devices:
            self.participation.setdefault(d, []).append(survivors)

    def device_epsilon(self, device) -> float:
        return zcdp_epsilon(self.rho.get(device, 0.0), self.delta)

    def fleet_epsilon(self) -> float:
        return zcdp_epsilon(max(self.rho.values(), default=0.0), self.delta)

    def would_exceed(self) -> bool:
        return zcdp_epsilon(max(self.rho.values(), default=0.0) + self.worst_round(), self.delta) > self.budget


def distributed_noise(target_epsilon: float, delta: float, releases: int, clip_norm: float, min_survivors: int,
                      cohort: int, row_scales: dict, noise_multiplier: float = 0.0) -> DistributedLedger:
    """The ledger of a run of `releases` rounds whose every round, unmasked with at least `min_survivors` of a
    cohort of at most `cohort`, keeps the devices within (target_epsilon, delta): z from the Gaussian's
    calibration (the same rho = 1 / (2 z^2) per round), raised while the tau term still pushes epsilon over.
    A given noise_multiplier is used as it is (the budget then only stops the rounds)."""
    if min_survivors < 1:
        raise ValueError(f"min_survivors {min_survivors}: at least 1")
    z = noise_multiplier or noise_multiplier_for(target_epsilon, delta, releases)
    while True:
        sigma = float32_up(z * clip_norm / math.sqrt(min_survivors))
        sigma2_min, l1 = distributed_plan_constants(row_scales, clip_norm, sigma)
        ledger = DistributedLedger(z, delta, target_epsilon, clip_norm, sigma, min_survivors, sigma2_min, l1, cohort,
                                   plan_elements(row_scales))
        if noise_multiplier or zcdp_epsilon(releases * ledger.worst_round(), delta) <= target_epsilon:
            return ledger
        z *= 1.01
