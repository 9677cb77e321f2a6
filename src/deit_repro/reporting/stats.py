"""Paired tests behind the verdicts on the paper's claims "a > b" (the claims table of
``results/claims.md``), as pure functions on numpy arrays, computed with scipy.

A claim is checked twice. Over seeds (:func:`seed_test`): the differences a − b of the per-seed
top-1 accuracies, the same seed on both sides, give a t-interval and a t-test; this asks whether
another training run would reproduce the gap. Over test images (:func:`image_test`, only where
both models were evaluated on the same images): the per-image differences, seeds averaged per
image, give a bootstrap interval and a sign-flip test; this asks whether another test set from the
same distribution would. :func:`verdict` combines the two intervals by the rule in :data:`RULE`,
which the claims table quotes in its header.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

_logger = logging.getLogger(__name__)

CONFIDENCE = 0.95
POWER = 0.8
RESAMPLES = 9999
# Values (indices or signs) one resampling batch may hold: about 16 MB for the bootstrap's int64
# indices plus float64 values, whatever the number of test images.
_BATCH_VALUES = 2**20

RULE = (
    f'A claim "a > b" holds when the {CONFIDENCE:.0%} t-interval of the mean paired difference '
    f"a − b over seeds (the same seed on both sides) lies above 0 and, where both models were "
    f"evaluated on the same test images, so does the {CONFIDENCE:.0%} percentile bootstrap "
    f"interval of the mean per-image difference (seeds averaged per image, {RESAMPLES} "
    f"resamples); it is reversed when both lie below 0, and not resolved otherwise or with fewer "
    f"than 2 seeds. p is the two-sided one-sample t-test over seeds, and over images a sign-flip "
    f"randomisation test ({RESAMPLES} draws; McNemar's test for one seed). MDE is the smallest "
    f"true mean difference the seed test detects with {POWER:.0%} power at "
    f"α = {1 - CONFIDENCE:.2f}, taking the observed seed std as the true one."
)


@dataclass(frozen=True)
class SeedTest:
    """The paired test over seeds of a claim "a > b"; all in the units of the differences."""

    n: int  # seeds, i.e. paired differences
    mean: float  # mean paired difference a − b
    std: float  # sample std (ddof=1) of the differences; nan if n < 2
    lo: float  # t-interval of the mean; nan if n < 2
    hi: float
    p: float  # two-sided one-sample t-test of mean = 0; nan if n < 2
    mde: float  # smallest true mean difference detected with the requested power; nan if n < 2


@dataclass(frozen=True)
class ImageTest:
    """The paired test over test images of a claim "a > b"; all in the units of the differences."""

    n_images: int
    mean: float  # mean over images of d_i, the per-image difference averaged over seeds
    lo: float  # percentile bootstrap interval of the mean over images
    hi: float
    p: float  # two-sided sign-flip randomisation test of the d_i
    method: str  # short description for the table
    p_floor: float  # smallest p the randomisation can return: 2 / (resamples + 1)


def seed_test(diffs, *, confidence: float = CONFIDENCE, power: float = POWER) -> SeedTest:
    """The t-interval, t-test and minimum detectable effect of paired per-seed differences.

    Why a t-interval and not a sign-flip or bootstrap one: with 3–5 seeds a sign-flip test has
    only 2^n distinct outcomes (n = 3: the smallest two-sided p is 0.25, so no 95 % interval
    exists), and a bootstrap of 3–5 values badly under-covers. The t-interval is exact when the
    seed noise is normal, the usual assumption when reporting over seeds (Henderson et al. 2018,
    "Deep Reinforcement Learning that Matters"; Colas et al. 2018, "How Many Random Seeds?").

    The minimum detectable effect (MDE) is the true mean difference at which a two-sided
    one-sample t-test at α = 1 − confidence over n seeds rejects with probability ``power``, the
    seed std taken to be the observed one. Power counts both rejection regions (as G*Power and
    statsmodels' ``TTestPower`` do) and is computed with the noncentral t distribution.

    When all n ≥ 2 differences are equal the sample std is 0 and scipy's t statistic is 0/0 or
    ±inf. The result is then the limit as the std goes to 0: the interval collapses to the mean,
    p is 0 if the mean is non-zero and 1 if it is 0, and the MDE is 0. Identical differences on
    every seed usually mean the seed never reached the runs, so this also logs a warning.

    Args:
        diffs: the per-seed differences a − b, one per seed (1-D, finite).
        confidence: coverage of the interval; the test's α is 1 − confidence.
        power: the power at which the MDE is solved, between α and 1.

    Raises:
        ValueError: on an empty, non-1-D or non-finite input, or an out-of-range level.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"diffs must be a non-empty 1-D array, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"diffs must be finite, got {d.tolist()}")
    alpha = 1.0 - confidence
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if not alpha < power < 1.0:
        raise ValueError(f"power must lie in (alpha = {alpha:g}, 1), got {power}")

    n = int(d.size)
    mean = float(np.mean(d))
    nan = math.nan
    if n < 2:
        return SeedTest(n=n, mean=mean, std=nan, lo=nan, hi=nan, p=nan, mde=nan)
    if np.all(d == d[0]):
        # Tested for equality rather than std == 0: np.std of equal non-dyadic values (0.1, 0.1,
        # 0.1) can come out a few ulps above 0, and scipy would then report t ~ 1e15.
        _logger.warning("all %d seed differences equal %g: zero seed spread", n, d[0])
        mean = float(d[0])
        return SeedTest(
            n=n, mean=mean, std=0.0, lo=mean, hi=mean, p=1.0 if mean == 0 else 0.0, mde=0.0
        )

    res = stats.ttest_1samp(d, 0.0)
    ci = res.confidence_interval(confidence)
    std = float(np.std(d, ddof=1))
    return SeedTest(
        n=n,
        mean=mean,
        std=std,
        lo=float(ci.low),
        hi=float(ci.high),
        p=float(res.pvalue),
        mde=_ncp_at_power(n - 1, alpha, power) * std / math.sqrt(n),
    )


def _ncp_at_power(df: int, alpha: float, power: float) -> float:
    """The noncentrality δ·√n/σ at which a two-sided t-test with ``df`` degrees of freedom at
    level ``alpha`` rejects with probability ``power``."""
    crit = stats.t.ppf(1.0 - alpha / 2.0, df)

    def shortfall(ncp: float) -> float:
        # The lower region P(T < -crit | ncp) is written P(T > crit | -ncp): scipy 1.17's
        # nct.cdf returns nan far in the lower tail (e.g. df=1, ncp=8; scipy/scipy#25470),
        # where nct.sf of the mirrored distribution stays finite and equal where both are.
        rejects = stats.nct.sf(crit, df, ncp) + stats.nct.sf(crit, df, -ncp)
        return rejects - power

    # Power is alpha at ncp = 0 and rises to 1, so doubling finds a bracket for brentq.
    hi = 1.0
    while shortfall(hi) < 0.0:
        hi *= 2.0
    return float(optimize.brentq(shortfall, 0.0, hi, xtol=1e-12))


def image_test(
    per_image, *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> ImageTest:
    """The paired bootstrap interval and sign-flip test over test images.

    ``per_image[s, i]`` is the difference a − b on test image i for seed s, in accuracy points:
    ``100 * (correct_a − correct_b)`` for a claim "a beats b", or a difference of such
    differences. The seeds are averaged per image, d_i = mean_s per_image[s, i]; the test then
    treats the trained models as fixed and the test images as the sample, so it measures
    test-set noise only (seed noise is :func:`seed_test`'s job).

    The interval is scipy.stats.bootstrap's percentile interval of the mean of the d_i (the d_i
    are already paired differences, so resampling them is the paired bootstrap). The p is a
    two-sided randomisation test of "a and b are exchangeable on every image": under it each d_i
    is +|d_i| or −|d_i| with probability 1/2. Images with d_i = 0 cannot change sign and are
    dropped; the statistic is the sum of |d_i| over the images where a wins, a monotone function
    of the mean that sums positive terms only, so scipy's relative tie tolerance applies. For one
    seed and 0/1 correctness this is the exact McNemar test, run by randomisation.
    The draws go through scipy.stats.monte_carlo_test with random sign patterns: it is the null
    distribution of scipy.stats.permutation_test(permutation_type="samples") on one sample, but
    vectorised, where permutation_test loops over the images in Python (about a minute for
    50,000 images).

    A randomised p is (k + 1) / (resamples + 1) per tail and two-sided it is twice the smaller
    tail, so it never goes below ``p_floor`` = 2 / (resamples + 1) (2e-4 for 9999 resamples):
    report such a p as "≤ 0.0002" (``fmt_p(t.p, floor=t.p_floor)``), not as its value.

    Both draws use fixed generators derived from ``seed`` and a batch size fixed by the number
    of images, so equal inputs give identical floats; memory stays bounded (about 16 MB) for any
    number of images.

    Args:
        per_image: float array [seeds, images]; a 1-D array is one seed.
        confidence: coverage of the bootstrap interval.
        resamples: bootstrap resamples, and sign patterns drawn for the p.
        seed: seeds both random generators.

    Raises:
        ValueError: on an empty or non-finite input, or a confidence outside (0, 1).
    """
    x = np.atleast_2d(np.asarray(per_image, dtype=np.float64))
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"per_image must be a non-empty [seeds, images] array, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("per_image must be finite")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    n_seeds, n = x.shape
    d = x.mean(axis=0)
    mean = float(d.mean())
    boot_rng, flip_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))

    if np.all(d == d[0]):
        # The bootstrap distribution is a single point; scipy warns and returns nan for it.
        lo = hi = float(d[0])
    else:
        ci = stats.bootstrap(
            (d,),
            np.mean,
            n_resamples=resamples,
            batch=max(1, _BATCH_VALUES // n),
            vectorized=True,
            confidence_level=confidence,
            method="percentile",
            rng=boot_rng,
        ).confidence_interval
        lo, hi = float(ci.low), float(ci.high)

    size = np.abs(d[d != 0.0])
    if size.size == 0:
        p = 1.0  # a and b agree on every image: nothing to test
    else:

        def flips(size: tuple[int, int]) -> np.ndarray:
            # Fair 0/1 per image ("a wins"), eight from each random byte.
            k, m = size
            raw = flip_rng.integers(0, 256, size=(k, (m + 7) // 8), dtype=np.uint8)
            return np.unpackbits(raw, axis=-1, count=m)

        def wins(a_wins: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.moveaxis(a_wins, axis, -1).astype(np.float64) @ size

        p = float(
            stats.monte_carlo_test(
                (d[d != 0.0] > 0).astype(np.uint8),
                flips,
                wins,
                vectorized=True,
                n_resamples=resamples,
                batch=max(1, _BATCH_VALUES // size.size),
                alternative="two-sided",
            ).pvalue
        )

    seeds = f"{n_seeds} seeds averaged" if n_seeds > 1 else "1 seed"
    return ImageTest(
        n_images=int(n),
        mean=mean,
        lo=lo,
        hi=hi,
        p=p,
        method=f"paired bootstrap + sign-flip over {n} images ({seeds}), {resamples} resamples",
        p_floor=2.0 / (resamples + 1),
    )


def verdict(seed: SeedTest, image: ImageTest | None) -> str:
    """ "holds", "reversed" or "not resolved", by the rule in :data:`RULE`.

    A nan interval (fewer than 2 seeds) compares false both ways and so is never resolved.
    """
    if seed.n < 2:
        return "not resolved"
    if seed.lo > 0 and (image is None or image.lo > 0):
        return "holds"
    if seed.hi < 0 and (image is None or image.hi < 0):
        return "reversed"
    return "not resolved"


def fmt_p(p: float, *, floor: float = 0.0) -> str:
    """A p-value for a table: "–" for nan, "< 1e-4" below 1e-4, else one significant digit
    below 0.01 ("0.003") and two decimals above ("0.42"). A p at or below ``floor``, the
    smallest value a randomisation test can return, reads "≤ floor"."""
    if math.isnan(p):
        return "–"
    if floor > 0 and p <= floor:
        return "≤ " + fmt_p(floor)
    if p < 1e-4:
        return "< 1e-4"
    if p < 0.01:
        return f"{p:.1g}"
    return f"{p:.2f}"
