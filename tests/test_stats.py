"""The claim statistics against values computed independently: textbook formulas, the power
function of the noncentral t, a numpy bootstrap, the normal approximation, and the exact McNemar
test."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from deit_repro.reporting.stats import (
    ImageTest,
    SeedTest,
    fmt_p,
    image_test,
    seed_test,
    verdict,
)


def _paired_correct(rng, n: int, acc_a: float, acc_b: float, seeds: int = 1) -> np.ndarray:
    """Per-image differences 100 * (correct_a − correct_b), [seeds, n], independent errors."""
    a = rng.random((seeds, n)) < acc_a
    b = rng.random((seeds, n)) < acc_b
    return 100.0 * (a.astype(float) - b.astype(float))


def _power(mde: float, std: float, n: int, alpha: float) -> float:
    ncp = mde * math.sqrt(n) / std
    crit = stats.t.ppf(1 - alpha / 2, n - 1)
    # P(T < -crit | ncp) as P(T > crit | -ncp): nct.cdf is nan far in the lower tail.
    return stats.nct.sf(crit, n - 1, ncp) + stats.nct.sf(crit, n - 1, -ncp)


# --- over seeds -------------------------------------------------------------------------------


def test_the_seed_interval_and_p_are_the_textbook_t_formulas():
    d = np.array([0.4, 1.1, 0.7, 0.2, 0.9])
    n, m, s = d.size, d.mean(), d.std(ddof=1)
    half = stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    p = 2 * stats.t.sf(abs(m) / (s / math.sqrt(n)), n - 1)

    r = seed_test(d)

    assert (r.n, r.mean, r.std) == (5, pytest.approx(m, abs=1e-12), pytest.approx(s, abs=1e-12))
    assert r.lo == pytest.approx(m - half, abs=1e-12)
    assert r.hi == pytest.approx(m + half, abs=1e-12)
    assert r.p == pytest.approx(p, rel=1e-9)
    half90 = stats.t.ppf(0.95, n - 1) * s / math.sqrt(n)
    assert seed_test(d, confidence=0.9).lo == pytest.approx(m - half90, abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
@pytest.mark.parametrize(("confidence", "power"), [(0.95, 0.8), (0.9, 0.9)])
def test_the_mde_is_where_the_t_test_reaches_the_requested_power(n, confidence, power):
    d = np.linspace(-0.3, 0.5, n) + 0.1 * np.arange(n) ** 2
    r = seed_test(d, confidence=confidence, power=power)
    assert r.mde > 0
    assert _power(r.mde, r.std, n, 1 - confidence) == pytest.approx(power, abs=1e-6)


def test_the_mde_grows_as_seeds_get_fewer_and_noisier():
    in_stds = [
        (r.mde / r.std) for r in (seed_test([0.0, 1.0, 2.0, 3.0, 4.0][:n]) for n in (2, 3, 5))
    ]
    assert in_stds[0] > in_stds[1] > in_stds[2]
    assert seed_test([0.0, 2.0, 4.0]).mde == pytest.approx(2 * seed_test([0.0, 1.0, 2.0]).mde)


@pytest.mark.parametrize("d", [[0.3, 1.4], [0.3, 1.4, 0.8, -0.2, 0.6]])
def test_the_mde_has_its_power_by_monte_carlo(d):
    r = seed_test(d)
    rng = np.random.default_rng(7)
    draws = rng.normal(r.mde, r.std, size=(20_000, r.n))
    rejected = stats.ttest_1samp(draws, 0.0, axis=1).pvalue < 0.05
    # The binomial standard error of the rejection rate is 0.003.
    assert rejected.mean() == pytest.approx(0.8, abs=0.012)


@pytest.mark.parametrize(
    ("d", "p", "word"),
    [([0.25, 0.25, 0.25], 0.0, "holds"), ([-0.1] * 4, 0.0, "reversed"), ([0.0, 0.0], 1.0, None)],
)
def test_equal_seed_differences_collapse_the_interval_to_the_mean(d, p, word):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 from scipy
        r = seed_test(d)
    assert (r.std, r.lo, r.hi, r.p, r.mde) == (0.0, d[0], d[0], p, 0.0)
    assert verdict(r, None) == (word or "not resolved")


def test_one_seed_has_a_mean_and_nothing_else():
    r = seed_test([0.7])
    assert r.n == 1 and r.mean == 0.7
    assert all(math.isnan(v) for v in (r.std, r.lo, r.hi, r.p, r.mde))
    assert verdict(r, None) == "not resolved"


@pytest.mark.parametrize(
    ("diffs", "kw"),
    [
        ([], {}),
        ([[1.0, 2.0]], {}),
        ([1.0, math.nan], {}),
        ([1.0, 2.0], {"confidence": 1.0}),
        ([1.0, 2.0], {"power": 0.01}),
    ],
)
def test_seed_test_rejects_bad_input(diffs, kw):
    with pytest.raises(ValueError):
        seed_test(diffs, **kw)


# --- over images ------------------------------------------------------------------------------


def test_the_bootstrap_interval_matches_a_numpy_bootstrap():
    rng = np.random.default_rng(1)
    x = _paired_correct(rng, 2000, 0.8, 0.77, seeds=3)
    d = x.mean(axis=0)
    boot = np.random.default_rng(2).choice(d, size=(40_000, d.size)).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])

    r = image_test(x)

    assert r.n_images == 2000 and r.mean == pytest.approx(d.mean(), abs=1e-12)
    # Each endpoint is a quantile of 9999 draws: its Monte-Carlo error is ~0.03 bootstrap sds.
    assert r.lo == pytest.approx(lo, abs=0.15 * boot.std())
    assert r.hi == pytest.approx(hi, abs=0.15 * boot.std())


def test_the_bootstrap_interval_matches_the_normal_approximation_on_10000_images():
    x = _paired_correct(np.random.default_rng(3), 10_000, 0.9, 0.88)
    d = x[0]
    half = stats.norm.ppf(0.975) * d.std() / math.sqrt(d.size)

    r = image_test(x)

    assert r.lo == pytest.approx(d.mean() - half, abs=0.04 * half)
    assert r.hi == pytest.approx(d.mean() + half, abs=0.04 * half)


@pytest.mark.parametrize(("a_only", "b_only"), [(48, 30), (25, 5), (10, 10), (0, 9)])
def test_one_seed_sign_flip_is_mcnemars_exact_test(a_only, b_only):
    """Images right for a only / b only are McNemar's discordant pairs; the rest cancel."""
    x = np.zeros((1, 1000))
    x[0, :a_only] = 100.0
    x[0, a_only : a_only + b_only] = -100.0
    exact = stats.binomtest(a_only, a_only + b_only, 0.5).pvalue

    r = image_test(x)

    mc_sd = math.sqrt(exact * (1 - exact) / 9999)
    assert r.p == pytest.approx(exact, abs=4 * mc_sd + r.p_floor)
    assert r.p >= r.p_floor == 2 / 10_000


def test_the_sign_flip_p_matches_scipys_permutation_test():
    x = _paired_correct(np.random.default_rng(4), 300, 0.8, 0.74, seeds=3)
    d = x.mean(axis=0)
    perm = stats.permutation_test(
        (d,),
        lambda v, axis: np.mean(v, axis=axis),
        permutation_type="samples",
        n_resamples=9999,
        rng=np.random.default_rng(5),
    ).pvalue
    assert 0.01 < perm < 0.5  # a p where Monte-Carlo error matters, not a floor or a ceiling

    r = image_test(x)

    # Two independent Monte-Carlo estimates: the sd of their difference is ~0.004 here.
    assert r.p == pytest.approx(perm, abs=0.02)


def test_models_that_agree_everywhere_or_differ_everywhere():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no degenerate-bootstrap warning from scipy
        same = image_test(np.zeros((2, 500)))
        always = image_test(np.full((1, 500), 100.0))
    assert (same.mean, same.lo, same.hi, same.p) == (0.0, 0.0, 0.0, 1.0)
    assert (always.mean, always.lo, always.hi, always.p) == (100.0, 100.0, 100.0, 2 / 10_000)


def test_image_test_is_deterministic_and_seeded():
    x = _paired_correct(np.random.default_rng(6), 5000, 0.8, 0.79, seeds=2)
    first, again = image_test(x), image_test(x.copy())
    assert first == again
    other = image_test(x, seed=1)
    assert (other.lo, other.hi, other.p) != (first.lo, first.hi, first.p)
    assert seed_test([0.1, 0.5, 0.2]) == seed_test(np.array([0.1, 0.5, 0.2]))


def test_image_test_rejects_bad_input():
    for bad in (np.zeros((0, 3)), np.array([[1.0, math.inf]]), np.zeros((2, 2, 2))):
        with pytest.raises(ValueError):
            image_test(bad)


# --- verdicts and formatting -----------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(8)
    return {
        "above": image_test(_paired_correct(rng, 4000, 0.85, 0.75, seeds=3)),
        "below": image_test(_paired_correct(rng, 4000, 0.75, 0.85, seeds=3)),
        "spans": image_test(_paired_correct(rng, 4000, 0.80, 0.80, seeds=3)),
    }


def test_the_constructed_image_tests_are_what_their_names_say(images):
    assert images["above"].lo > 0
    assert images["below"].hi < 0
    assert images["spans"].lo < 0 < images["spans"].hi


@pytest.mark.parametrize(
    ("seeds", "image", "expected"),
    [
        ([9.8, 10.1, 10.3], "above", "holds"),
        ([9.8, 10.1, 10.3], None, "holds"),
        ([-9.8, -10.1, -10.3], "below", "reversed"),
        ([-9.8, -10.1, -10.3], None, "reversed"),
        ([-0.5, 0.2, 0.6], "spans", "not resolved"),
        ([-0.5, 0.2, 0.6], None, "not resolved"),
        ([9.8, 10.1, 10.3], "spans", "not resolved"),  # seeds agree, the test set does not
        ([9.8, 10.1, 10.3], "below", "not resolved"),
        ([10.0], "above", "not resolved"),  # one seed: no interval
    ],
)
def test_verdict(images, seeds, image, expected):
    seed = seed_test(seeds)
    assert verdict(seed, images[image] if image else None) == expected


def test_verdict_needs_two_seeds_even_with_a_made_up_interval():
    one = SeedTest(n=1, mean=1.0, std=0.0, lo=0.5, hi=1.5, p=0.0, mde=0.0)
    img = ImageTest(n_images=10, mean=1.0, lo=0.5, hi=1.5, p=0.0, method="", p_floor=2e-4)
    assert verdict(one, img) == "not resolved"


@pytest.mark.parametrize(
    ("p", "floor", "text"),
    [
        (math.nan, 0.0, "–"),
        (3e-5, 0.0, "< 1e-4"),
        (0.0, 0.0, "< 1e-4"),
        (2e-4, 2e-4, "≤ 0.0002"),
        (3e-4, 2e-4, "0.0003"),
        (0.0031, 0.0, "0.003"),
        (0.0421, 0.0, "0.04"),
        (0.4238, 0.0, "0.42"),
        (1.0, 0.0, "1.00"),
    ],
)
def test_fmt_p(p, floor, text):
    assert fmt_p(p, floor=floor) == text
