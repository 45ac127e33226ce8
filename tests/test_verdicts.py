"""Verdict library: intervals against scipy and hand values, the four outcomes, Holm, frontiers, error rates."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tokenpo.verdicts import (OUTCOMES, Claim, Preregistration, classify, estimate_effect, frontier_summary, holm,
                              interpolate_at_kl, per_run, sqrt_kl_slope)

A = np.array([0.61, 0.58, 0.66, 0.63, 0.60])
B = np.array([0.55, 0.57, 0.52, 0.58, 0.54, 0.53])


def decide_one(direction, a, b=None, *, delta, kind="difference", alpha=0.05, **kw):
    claim = Claim("c", "the paper's claim", direction, delta=delta, kind=kind, **kw)
    return Preregistration([claim], alpha=alpha).decide({"c": a if b is None else (a, b)})["c"]


# ---------------------------------------------------------------------------------------------------- intervals
def test_welch_interval_and_p_match_scipy():
    e = estimate_effect(A, B, kind="difference")
    ref = stats.ttest_ind(A, B, equal_var=False)
    for level in (0.95, 0.99, 1 - 0.05 / 3):
        ci = ref.confidence_interval(level)
        assert e.interval(level) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert e.estimate == pytest.approx(A.mean() - B.mean())
    assert e.p_value(0.0) == pytest.approx(ref.pvalue, rel=1e-10)
    assert e.df == pytest.approx(ref.df, rel=1e-10)


def test_paired_and_one_sample_intervals_match_scipy():
    b = A - np.array([0.02, 0.05, 0.01, 0.04, 0.03])
    e = estimate_effect(A, b, kind="paired")
    ref = stats.ttest_rel(A, b)
    assert e.interval(0.95) == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-10)
    assert e.p_value(0.0) == pytest.approx(ref.pvalue, rel=1e-10)
    m = estimate_effect(A, kind="mean")
    ref1 = stats.ttest_1samp(A, 0.5)
    assert m.interval(0.9) == pytest.approx(tuple(ref1.confidence_interval(0.9)), rel=1e-10)
    assert m.p_value(0.5) == pytest.approx(ref1.pvalue, rel=1e-10)


def test_textbook_two_runs():
    # n = 2: mean 1, s = sqrt(2), se = 1, t_{0.975, 1} = 12.706 -> [1 - 12.706, 1 + 12.706]
    lo, hi = estimate_effect([0.0, 2.0], kind="mean").interval(0.95)
    assert lo == pytest.approx(-11.706, abs=1e-3) and hi == pytest.approx(13.706, abs=1e-3)


def test_ratio_delta_method_by_hand():
    a, b = np.array([2.0, 2.4, 2.2]), np.array([1.0, 1.2, 1.1, 0.9])
    e = estimate_effect(a, b, kind="ratio")
    va = a.var(ddof=1) / (3 * a.mean() ** 2)
    vb = b.var(ddof=1) / (4 * b.mean() ** 2)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    q = stats.t.ppf(0.975, df)
    log_ratio = math.log(a.mean() / b.mean())
    assert e.estimate == pytest.approx(a.mean() / b.mean())
    assert e.interval() == pytest.approx((math.exp(log_ratio - q * math.sqrt(va + vb)),
                                          math.exp(log_ratio + q * math.sqrt(va + vb))))
    pr = estimate_effect(a[:3], b[:3], kind="paired_ratio")
    assert pr.estimate == pytest.approx(math.exp(np.mean(np.log(a[:3] / b[:3]))))
    with pytest.raises(ValueError, match="positive"):
        estimate_effect([1.0, -1.0], [1.0, 2.0], kind="ratio")


@pytest.mark.parametrize("n", [2, 3, 10, 30])
def test_any_run_count_from_2_to_30(n):
    rng = np.random.default_rng(n)
    v = decide_one("greater", rng.normal(1, 1, n), rng.normal(0, 1, n), delta=0.5)
    assert v.outcome in OUTCOMES and v.n_a == v.n_b == n and v.low < v.estimate < v.high


def test_bootstrap_is_seeded_and_close_to_t_for_many_runs():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1, 1, 30), rng.normal(0, 1, 30)
    e1 = estimate_effect(a, b, method="bootstrap", seed=3, name="x")
    e2 = estimate_effect(a, b, method="bootstrap", seed=3, name="x")
    assert e1.interval() == e2.interval()
    assert e1.interval() != estimate_effect(a, b, method="bootstrap", seed=4, name="x").interval()
    (tl, th), (bl, bh) = estimate_effect(a, b).interval(), e1.interval()
    assert abs(bl - tl) < 0.15 and abs(bh - th) < 0.15
    p = Preregistration([Claim("x", "t", "greater", delta=0.1)], method="bootstrap", seed=3)
    v = p.decide({"x": (a, b)})["x"]
    assert (v.low95, v.high95) == pytest.approx(e1.interval()) and v.outcome == "holds" and "bootstrap" in v.summary


# ------------------------------------------------------------------------------------------------------ outcomes
NOISE = np.array([-0.02, 0.01, 0.0, 0.02, -0.01])


def test_large_clear_effect_holds():
    v = decide_one("greater", 1.0 + NOISE, 0.0 + NOISE[::-1], delta=0.1)
    assert v.outcome == "holds" and v.low > 0.9


def test_reliable_effect_the_other_way_does_not_hold():
    assert decide_one("greater", 0.0 + NOISE, 1.0 + NOISE[::-1], delta=0.1).outcome == "does not hold"
    assert decide_one("less", 1.0 + NOISE, 0.0 + NOISE[::-1], delta=0.1).outcome == "does not hold"
    assert decide_one("less", 0.0 + NOISE, 1.0 + NOISE[::-1], delta=0.1).outcome == "holds"


def test_tight_noise_around_zero_with_wide_delta_is_equivalent():
    v = decide_one("greater", NOISE, NOISE[::-1], delta=0.5)
    assert v.outcome == "equivalent" and -0.5 < v.low < v.high < 0.5


def test_two_seeds_with_huge_noise_are_inconclusive():
    v = decide_one("greater", [3.0, -1.0], [-2.0, 1.5], delta=0.1)
    assert v.outcome == "inconclusive" and v.low < 0 < v.high


def test_significant_but_below_delta_is_equivalent_not_holds():
    v = decide_one("greater", 0.05 + NOISE / 10, NOISE[::-1] / 10, delta=0.2)
    assert v.low > 0 and v.p_adjusted < 0.001       # statistically detectable ...
    assert v.outcome == "equivalent"               # ... but negligible


def test_practical_threshold_is_needed_for_holds():
    ratio = 1.10 + NOISE                            # clearly above 1, clearly below the declared 1.2
    v = decide_one("greater", ratio, kind="mean", null=1.0, delta=0.02, threshold=1.2)
    assert v.low > 1.0 and v.high < 1.2 and v.outcome == "does not hold"
    wide = 1.15 + 4 * NOISE                         # significant, estimate below 1.2, interval reaches above it
    v = decide_one("greater", wide, kind="mean", null=1.0, delta=0.02, threshold=1.2)
    assert v.low > 1.0 and v.high > 1.2 and v.outcome == "inconclusive"
    assert decide_one("greater", 1.3 + NOISE, kind="mean", null=1.0, delta=0.02, threshold=1.2).outcome == "holds"


def test_equivalence_claims():
    assert decide_one("equivalent", NOISE, NOISE[::-1], delta=0.5).outcome == "holds"
    assert decide_one("equivalent", 1 + NOISE, NOISE, delta=0.5).outcome == "does not hold"
    assert decide_one("equivalent", [3.0, -1.0], [-2.0, 1.5], delta=0.5).outcome == "inconclusive"


@pytest.mark.parametrize("low,high,est,expected", [
    (0.5, 2.0, 1.0, "holds"), (0.01, 3.0, 0.3, "holds"), (0.01, 3.0, 0.2, "inconclusive"),
    (0.05, 0.15, 0.1, "equivalent"), (-0.15, -0.05, -0.1, "equivalent"), (-3.0, 0.15, -1.0, "does not hold"),
    (-3.0, -1.0, -2.0, "does not hold"), (-3.0, 3.0, 0.0, "inconclusive"), (-0.2, 0.35, 0.1, "inconclusive"),
    (-0.25, 0.1, 0.0, "does not hold"),  # not within +-delta, but reliably below the threshold 0.3
])
def test_classify_rules_greater(low, high, est, expected):
    # delta 0.2, threshold 0.3: the exact inequalities of the docstring
    assert classify("greater", est, low, high, null=0.0, delta=0.2, threshold=0.3) == expected
    # "less" mirrors everything
    assert classify("less", -est, -high, -low, null=0.0, delta=0.2, threshold=-0.3) == expected
    # a ratio-like null shifts everything
    assert classify("greater", 1 + est, 1 + low, 1 + high, null=1.0, delta=0.2, threshold=1.3) == expected


def test_classify_never_calls_a_negligible_interval_holds():
    rng = np.random.default_rng(0)
    for low, width in zip(rng.uniform(-1, 1, 2000), rng.uniform(0, 1, 2000)):
        high, est = low + width, low + width / 2
        out = classify("greater", est, low, high, null=0.0, delta=0.3, threshold=0.4)
        if -0.3 < low and high < 0.3:
            assert out == "equivalent"
        if out == "holds":
            assert low > 0 and est >= 0.4
        if out == "does not hold":
            assert high < 0.4


# -------------------------------------------------------------------------------------------------- multiplicity
def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005 = 0.02, 3*0.01 = 0.03, 2*0.03 = 0.06, max(0.06, 1*0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])
    assert holm([0.9, 0.01, 0.6]) == pytest.approx([1.0, 0.03, 1.0])


def test_decide_uses_holm_and_bonferroni_intervals():
    rng = np.random.default_rng(5)
    claims = [Claim(f"c{i}", "x", "greater", delta=0.1) for i in range(4)]
    data = {f"c{i}": (rng.normal(s, 1, 5), rng.normal(0, 1, 5)) for i, s in enumerate([0, 0.5, 1.5, 3])}
    verdicts = Preregistration(claims, alpha=0.05).decide(data)
    raw = [stats.ttest_ind(*data[v.claim], equal_var=False).pvalue for v in verdicts]
    assert [v.p_raw for v in verdicts] == pytest.approx(raw)
    assert [v.p_adjusted for v in verdicts] == pytest.approx(holm(raw))
    for v in verdicts:
        ci = stats.ttest_ind(*data[v.claim], equal_var=False).confidence_interval(1 - 0.05 / 4)
        assert v.level == pytest.approx(0.9875) and (v.low, v.high) == pytest.approx((ci.low, ci.high))
        assert v.low < v.low95 < v.high95 < v.high
        if v.outcome == "holds":
            assert v.p_adjusted <= 0.05


# ------------------------------------------------------------------------------------------------------- pairing
def test_paired_sees_what_unpaired_cannot():
    seeds = np.array([0.1, 0.9, 0.4, 1.6, 0.7])     # large seed-to-seed variation shared by both arms
    trained, untrained = seeds + 0.3 + NOISE, seeds
    assert decide_one("greater", trained, untrained, delta=0.1, kind="paired").outcome == "holds"
    assert decide_one("greater", trained, untrained, delta=0.1).outcome == "inconclusive"


def test_paired_series_align_on_seed():
    a = pd.Series([1.0, 2.0, 3.5], index=[0, 1, 2])
    b = pd.Series([3.0, 0.8, 1.9], index=[2, 0, 1])
    shuffled = estimate_effect(a, b, kind="paired")
    aligned = estimate_effect(a.to_numpy(), b.sort_index().to_numpy(), kind="paired")
    assert shuffled.interval() == pytest.approx(aligned.interval())
    with pytest.raises(ValueError, match="same seeds"):
        estimate_effect(a, b.set_axis([0, 1, 7]), kind="paired")


# ------------------------------------------------------------------------------------------------- input checks
def test_nan_and_bad_inputs_name_the_claim():
    prereg = Preregistration([Claim("frontier@kl=3", "x", "greater", delta=0.1)])
    with pytest.raises(ValueError, match=r"frontier@kl=3.*NaN"):
        prereg.decide({"frontier@kl=3": ([1.0, np.nan, 2.0], [1.0, 2.0, 3.0])})
    with pytest.raises(ValueError, match=r"frontier@kl=3.*>= 2"):
        prereg.decide({"frontier@kl=3": ([1.0], [1.0, 2.0])})
    with pytest.raises(ValueError, match=r"frontier@kl=3.*per run"):
        prereg.decide({"frontier@kl=3": (np.ones(5000), np.ones(5000))})


def test_claim_validation():
    with pytest.raises(ValueError, match="threshold"):
        Claim("c", "x", "greater", delta=0.1, threshold=0.05)
    with pytest.raises(ValueError, match="threshold"):
        Claim("c", "x", "equivalent", delta=0.1, threshold=0.05)
    with pytest.raises(ValueError, match="null"):
        Claim("c", "x", "greater", delta=0.1, kind="mean")
    with pytest.raises(ValueError, match="delta"):
        Claim("c", "x", "greater", delta=0.0)
    assert Claim("c", "x", "less", delta=0.1, kind="ratio").threshold == pytest.approx(0.9)


# ------------------------------------------------------------------------------------------------ preregistration
def test_preregistration_is_frozen_and_refuses_unregistered_claims():
    c = Claim("registered", "x", "greater", delta=0.1)
    prereg = Preregistration([c])
    data = {"registered": (A, B)}
    with pytest.raises(KeyError, match="not in preregistration"):
        prereg.decide({**data, "found later": (A, B)})
    with pytest.raises(KeyError, match="no data"):
        Preregistration([c, Claim("other", "y", "less", delta=0.1)]).decide(data)
    with pytest.raises(AttributeError, match="frozen"):
        prereg.claims = prereg.claims + (Claim("found later", "y", "greater", delta=0.1),)
    with pytest.raises(ValueError, match="unique"):
        Preregistration([c, c])
    assert not hasattr(prereg, "add") and isinstance(prereg.claims, tuple)
    later = Preregistration([c, Claim("found later", "y", "greater", delta=0.1)])
    assert later.fingerprint != prereg.fingerprint == Preregistration([c]).fingerprint
    assert prereg.fingerprint in repr(prereg) and "registered" in prereg.table().index


def test_result_objects_and_summary():
    claim = Claim("frontier", "SparsePO beats TDPO-1", "greater", delta=0.02, groups=("SparsePO", "TDPO-1"))
    verdicts = Preregistration([claim, Claim("other", "x", "less", delta=0.1)]).decide(
        {"frontier": (A, B[:5]), "other": (A, B)})
    v = verdicts["frontier"]
    assert v.summary.startswith(f"{v.outcome}: SparsePO − TDPO-1 = +0.")
    for part in ("5 vs 5 runs", "δ = 0.02", "Holm-adjusted p", "97.5 % CI", "95 %: ["):
        assert part in v.summary
    frame = verdicts.to_frame()
    assert list(frame.index) == ["frontier", "other"]
    assert {"outcome", "estimate", "low", "high", "low95", "high95", "n_a", "n_b", "delta", "p_raw",
            "p_adjusted", "summary"} <= set(frame.columns)
    assert json.loads(json.dumps(verdicts.to_json())) == {x.claim: x.summary for x in verdicts}


# ------------------------------------------------------------------------------------------------------ frontiers
def test_interpolation_by_hand():
    # unsorted checkpoints; reference (0, 0.2); 2 lies 1/3 of the way from KL 1 to KL 4
    got = interpolate_at_kl([4.0, 1.0], [1.1, 0.5], [0, 0.5, 2, 4, 5], r_ref=0.2)
    assert got[:4] == pytest.approx([0.2, 0.35, 0.7, 1.1]) and np.isnan(got[4])
    # duplicate KL averaged; reference given as a KL-0 point
    assert interpolate_at_kl([0, 2, 2], [0.0, 1.0, 3.0], [1, 2]) == pytest.approx([1.0, 2.0])
    with pytest.raises(ValueError, match="reference"):
        interpolate_at_kl([1.0, 2.0], [0.1, 0.2], [1.0])
    with pytest.raises(ValueError, match="negative"):
        interpolate_at_kl([-0.01, 2.0], [0.1, 0.2], [1.0], r_ref=0.0)


def test_more_checkpoints_on_the_same_curve_get_no_bonus():
    levels = [1.5, 3.0, 7.5]
    line = lambda k: 0.2 + 0.05 * np.asarray(k)
    sparse, dense = np.array([0.0, 5.0, 10.0]), np.linspace(0, 10, 41)
    assert interpolate_at_kl(sparse, line(sparse), levels) == pytest.approx(interpolate_at_kl(dense, line(dense),
                                                                                              levels))
    # noisy evaluations: the best reward with KL <= L grows with the checkpoint count, interpolation does not
    rng = np.random.default_rng(0)
    interp, best = {}, {}
    for name, ks in (("sparse", sparse), ("dense", dense)):
        noisy = line(ks) + rng.normal(0, 0.05, (400, ks.size)) * (ks > 0)
        interp[name] = np.mean([interpolate_at_kl(ks, r, [5.0])[0] for r in noisy])
        best[name] = np.mean([r[ks <= 5.0].max() for r in noisy])
    assert abs(interp["dense"] - interp["sparse"]) < 0.01
    assert best["dense"] - best["sparse"] > 0.02             # ~ 0.04; Monte Carlo s.e. ~ 0.003


def test_sqrt_kl_fit():
    # hand: a = (1 * 0.5 + 2 * 0.8) / (1 + 4) = 0.42
    assert sqrt_kl_slope([1.0, 4.0], [0.7, 1.0], r_ref=0.2) == pytest.approx(0.42)
    ks = np.array([0.0, 0.5, 2.0, 6.0, 12.0])
    assert sqrt_kl_slope(ks, 0.1 + 0.3 * np.sqrt(ks)) == pytest.approx(0.3)
    assert math.isnan(sqrt_kl_slope([0.0], [0.1]))


def test_frontier_summary_feeds_claims():
    rows = []
    for method, gain, schedule in (("SparsePO", 0.30, [1, 2, 4, 8]), ("TDPO-1", 0.20, [2, 6])):
        for seed in range(3):
            for k in schedule:
                rows.append({"method": method, "seed": seed, "kl": k,
                             "reward": 0.1 + gain * math.sqrt(k) + 0.01 * seed})
    summary = frontier_summary(pd.DataFrame(rows), [2.0, 8.0], r_ref=0.1)
    assert summary.loc[("SparsePO", 0), "n_checkpoints"] == 4 and summary.loc[("TDPO-1", 1), "max_kl"] == 6
    assert summary.loc[("SparsePO", 0), "sqrt_kl_a"] == pytest.approx(0.30, abs=0.02)
    assert np.isnan(summary.loc[("TDPO-1", 0), "reward_at_kl_8"])
    a, b = per_run(summary, "SparsePO", "reward_at_kl_2"), per_run(summary, "TDPO-1", "reward_at_kl_2")
    assert list(a.index) == [0, 1, 2]
    prereg = Preregistration([Claim("at kl 8", "x", "greater", delta=0.02, groups=("SparsePO", "TDPO-1")),
                              Claim("at kl 2", "x", "greater", delta=0.02, kind="paired")])
    with pytest.raises(ValueError, match="at kl 8.*NaN"):
        prereg.decide({"at kl 8": (per_run(summary, "SparsePO", "reward_at_kl_8"),
                                   per_run(summary, "TDPO-1", "reward_at_kl_8")), "at kl 2": (a, b)})


# ------------------------------------------------------------------------------------------------- error rates
def test_false_holds_rate_under_the_null_is_at_most_alpha():
    rng = np.random.default_rng(2024)
    n_sim, alpha = 3000, 0.05
    prereg = Preregistration([Claim("null", "x", "greater", delta=0.05)], alpha=alpha)
    outcomes = [prereg.decide({"null": (rng.normal(0, 1, 5), rng.normal(0, 1, 5))})["null"].outcome
                for _ in range(n_sim)]
    rate = outcomes.count("holds") / n_sim
    assert rate <= alpha
    assert rate > 0.01                      # not vacuous: about alpha / 2 for a two-sided interval
    family = Preregistration([Claim(f"n{i}", "x", "greater", delta=0.05) for i in range(3)], alpha=alpha)
    any_holds = sum(any(v.outcome == "holds" for v in family.decide(
        {f"n{i}": (rng.normal(0, 1, 5), rng.normal(0, 1, 5)) for i in range(3)})) for _ in range(1000))
    assert any_holds / 1000 <= alpha


def test_a_claim_without_data_is_inconclusive_with_its_reason_and_counts_for_holm():
    from tokenpo.verdicts import NoData

    rng = np.random.default_rng(0)
    prereg = Preregistration([Claim("a", "text", "greater", delta=0.1), Claim("b", "text", "greater", delta=0.1)])
    alone = Preregistration([Claim("a", "text", "greater", delta=0.1)])
    x, y = rng.normal(1.0, 0.05, 5), rng.normal(0.0, 0.05, 5)
    both = prereg.decide({"a": (x, y), "b": NoData("no key token in the set")})
    assert both["b"].outcome == "inconclusive" and "not tested (no key token in the set)" in both["b"].summary
    assert both["a"].m == 2 and both["a"].p_adjusted >= alone.decide({"a": (x, y)})["a"].p_adjusted
