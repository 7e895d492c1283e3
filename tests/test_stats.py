"""Welch's t-test and the results table, against hand formulas and scipy."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from lossevo.evaluate import stats

A = [0.913, 0.905, 0.921, 0.917, 0.909, 0.899, 0.924, 0.915, 0.911, 0.919]
B = [0.889, 0.881, 0.902, 0.893, 0.877, 0.891, 0.885, 0.899, 0.872, 0.896]


def test_welch_matches_hand_formula_and_scipy():
    a, b = np.array(A), np.array(B)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    res = stats.welch(A, B, "greater")
    assert res["t"] == pytest.approx(t) and res["df"] == pytest.approx(df)
    assert res["p"] == pytest.approx(sps.t.sf(t, df))
    ref = sps.ttest_ind(A, B, equal_var=False, alternative="greater")
    assert res["p"] == pytest.approx(ref.pvalue)
    assert stats.welch(A, B, "less")["p"] == pytest.approx(1 - res["p"])


@pytest.mark.parametrize("p,mark", [(0.2, "ns"), (0.05, "ns"), (0.049, "*"), (0.009, "**"),
                                    (0.0009, "***"), (float("nan"), "ns")])
def test_stars(p, mark):
    assert stats.stars(p) == mark


def test_table_and_markdown():
    df = stats.table({"ce": B, "new": A}, "ce")
    row = df.set_index("loss").loc["new"]
    assert row["mean"] == pytest.approx(np.mean(A)) and row["std"] == pytest.approx(np.std(A, ddof=1))
    assert row["sig"] == "***"
    md = stats.markdown(df, "ce")
    assert "| new | 10 | 0.9133 (0.0076) |" in md and "baseline" in md


# --------------------------------------------------------------------------- Holm, g, CI

def test_holm_matches_hand_example():
    # Sorted: 0.005, 0.01, 0.03, 0.04 (m = 4) -> times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04;
    # running max (step-down monotonicity): 0.02, 0.03, 0.06, 0.06; back in input order:
    # 0.01 -> 0.03, 0.04 -> 0.06, 0.03 -> 0.06, 0.005 -> 0.02.
    adj = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_is_monotone_capped_and_between_raw_and_bonferroni():
    p = np.array([0.2, 0.001, 0.6, 0.04, 0.03, 0.5])
    adj = stats.holm(p)
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)  # same order as the raw p-values
    assert np.all(adj >= p) and np.all(adj <= np.minimum(1, len(p) * p))
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # 2 * 0.5, 1 * 0.6 -> max 1, capped
    assert stats.holm([]).size == 0


def test_holm_nan_stays_nan_but_counts_in_the_family():
    adj = stats.holm([0.01, float("nan"), 0.02])
    assert math.isnan(adj[1])
    assert adj[[0, 2]] == pytest.approx([0.03, 0.04])  # m = 3: 3 * 0.01, max(0.03, 2 * 0.02)


def test_hedges_g_hand_value_and_sign():
    a, b = [2.0, 4.0, 6.0], [1.0, 2.0, 3.0]
    # means 4 and 2, variances (ddof=1) 4 and 1; pooled SD = sqrt((2*4 + 2*1) / 4) = sqrt(2.5)
    # = 1.58114; d = 2 / 1.58114 = 1.26491; J = 1 - 3 / (4*4 - 1) = 0.8; g = 1.01193.
    assert stats.hedges_g(a, b) == pytest.approx(2 / math.sqrt(2.5) * 0.8)
    assert stats.hedges_g(a, b) == pytest.approx(1.01193, abs=1e-5)
    assert stats.hedges_g(b, a) == pytest.approx(-stats.hedges_g(a, b))
    assert stats.hedges_g(A, B) > 0
    assert math.isnan(stats.hedges_g([1.0, 1.0], [1.0, 1.0]))  # zero pooled SD: undefined


def test_ci_contains_difference_and_matches_scipy_welch_interval():
    lo, hi = stats.diff_ci(A, B)
    d = np.mean(A) - np.mean(B)
    assert lo < d < hi and (lo + hi) / 2 == pytest.approx(d)
    ref = sps.ttest_ind(A, B, equal_var=False).confidence_interval(0.95)  # two-sided Welch, scipy >= 1.11
    assert (lo, hi) == pytest.approx((ref.low, ref.high))
    a, b = A[:4], B[:7]  # unequal n and variances
    ref = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.99)
    assert stats.diff_ci(a, b, 0.99) == pytest.approx((ref.low, ref.high))
    lo90, hi90 = stats.diff_ci(a, b, 0.90)
    assert stats.diff_ci(a, b)[0] < lo90 and hi90 < stats.diff_ci(a, b)[1]
    # The one-tailed p < 0.05 exactly when the two-sided 90 % interval lies above 0.
    p = stats.welch(a, b, "greater")["p"]
    assert (p < 0.05) == (lo90 > 0)


# --------------------------------------------------------------------------- table
C = [0.915, 0.902, 0.925, 0.911, 0.907, 0.903, 0.921, 0.913, 0.909, 0.917]  # mean 0.9123
D = [0.890, 0.885, 0.899, 0.896, 0.880, 0.893, 0.887, 0.901, 0.878, 0.894]  # mean 0.8903
SPECS = {"ce": {"kind": "cross_entropy"}, "ls": {"kind": "label_smoothing", "alpha": 0.1},
         "baikal": {"kind": "baikal"}, "tg": {"search": "plain"}}
ACC = {"ce": B, "ls": C, "baikal": D, "tg": A}  # tg (evolved) is best overall, ls the best hand-designed


def test_baseline_row_has_nan_comparisons():
    df = stats.table(ACC, "ce", SPECS).set_index("loss")
    assert df.loc["ce", list(stats.VS_BASELINE)].isna().all() and df.loc["ce", "sig"] == "baseline"
    for name in ("ls", "baikal", "tg"):
        row = df.loc[name]
        assert row["diff"] == pytest.approx(np.mean(ACC[name]) - np.mean(B))
        assert row["hedges_g"] == pytest.approx(stats.hedges_g(ACC[name], B))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(stats.diff_ci(ACC[name], B))
        assert row["p"] == pytest.approx(stats.welch(ACC[name], B)["p"])
        assert row["sig"] == stats.stars(row["p"])  # stars from the raw p
    others = ["ls", "baikal", "tg"]
    assert df.loc[others, "p_holm"].to_numpy() == pytest.approx(stats.holm(df.loc[others, "p"]))


def test_best_hand_designed_is_picked_and_not_compared_with_itself():
    means = {k: float(np.mean(v)) for k, v in ACC.items()}
    assert stats.best_hand_designed(means, SPECS) == "ls"  # not tg: evolved, despite the higher mean
    assert stats.best_hand_designed(means, {**SPECS, "baikal": {"kind": "fast_logit"}}) == "ls"
    assert stats.best_hand_designed({"ce": 0.9, "tg": 0.95}, SPECS) is None
    df = stats.table(ACC, "ce", SPECS, confidence=0.9).set_index("loss")
    assert (df["hd_ref"] == "ls").all()
    assert df.loc["ls", list(stats.VS_HAND)].isna().all() and df.loc["ls", "hd_sig"] == "reference"
    for name in ("ce", "baikal", "tg"):  # the baseline is compared with the best hand-designed too
        assert df.loc[name, "hd_diff"] == pytest.approx(np.mean(ACC[name]) - np.mean(C))
        assert (df.loc[name, "hd_ci_low"], df.loc[name, "hd_ci_high"]) == pytest.approx(
            stats.diff_ci(ACC[name], C, 0.9))
    fam = ["ce", "baikal", "tg"]  # its own Holm family, apart from the baseline's
    assert df.loc[fam, "hd_p_holm"].to_numpy() == pytest.approx(stats.holm(df.loc[fam, "hd_p"]))


@pytest.mark.parametrize("acc,specs", [
    ({"ce": B, "tg": A}, SPECS),                                   # no hand-designed loss
    ({"ce": B, "tg": A}, None),                                    # no specs given
    ({"ls": C, "baikal": D, "tg": A}, SPECS),                       # the best one is the baseline
])
def test_second_comparison_skipped_when_there_is_none(acc, specs):
    baseline = next(iter(acc))
    df = stats.table(acc, baseline, specs)
    assert (df["hd_ref"] == "").all() and df[list(stats.VS_HAND)].isna().all().all()
    assert "best hand-designed" not in stats.markdown(df, baseline)


def test_markdown_tables_and_csv_round_trip(tmp_path):
    import pandas as pd

    df = stats.table(ACC, "ce", SPECS)
    path = tmp_path / "welch.csv"
    path.write_text(df.to_csv(index=False))
    md = stats.markdown(pd.read_csv(path), "ce")  # the report renders the CSV read back
    assert md == stats.markdown(df, "ce")
    assert "| tg | 10 | 0.9133 (0.0076) | +0.0248 [+0.0166, +0.0330] | +2.72 |" in md
    assert "| ce | 10 | 0.8885 (0.0097) | – | – | – | – | baseline |" in md
    assert "Δ vs ce [95% CI]" in md and "Holm p" in md and "raw one-tailed Welch p" in md
    assert "family-wise error" in md
    assert "**vs best hand-designed loss (ls)**" in md
    second = md.split("best hand-designed loss (ls)")[1]
    assert "| ls |" not in second and "| ce | -0.0238 [-0.0320, -0.0156] | -2.63 | > 0.999 |" in second
    assert "nan" not in md.lower()


# --------------------------------------------------------------------------- constant samples
# issue 16 finding 8: ten seeds at 0.9951 have numpy variance ~1e-32, not 0 (0.9951 is not
# representable, so the mean of its copies is off by an ulp); the zero-variance contract must hold.

CONST10, CONST7 = [0.9951] * 10, [0.9951] * 7
VARYING = [0.990, 0.995, 0.9951, 0.996, 0.993]


def test_finding_08_identical_constant_arms_are_degenerate_not_significant():
    assert np.var(CONST10, ddof=1) > 0  # the round-off this guards against
    assert stats.moments(CONST10) == (10, 0.9951, 0.0) and math.isnan(stats.moments([0.5])[2])
    for a, b in ((CONST10, CONST7), (CONST7, CONST10)):
        for alt in ("greater", "less", "two-sided"):
            w = stats.welch(a, b, alt)
            assert math.isnan(w["t"]) and math.isnan(w["p"]) and math.isnan(w["df"])
        assert math.isnan(stats.hedges_g(a, b))
        assert all(math.isnan(v) for v in stats.diff_ci(a, b))
        assert stats.compare(a, b)["diff"] == 0.0
    df = stats.table({"ce": CONST10, "x": CONST7}, "ce").set_index("loss")
    assert df.loc["x", "std"] == 0.0 and df.loc["x", "mean"] == 0.9951 and df.loc["x", "sig"] == "ns"
    assert math.isnan(df.loc["x", "p"]) and math.isnan(df.loc["x", "p_holm"]) and math.isnan(df.loc["x", "hedges_g"])


def test_finding_08_one_constant_arm_is_a_welch_test_with_zero_variance_there():
    v = np.array(VARYING)
    for alt in ("greater", "less"):
        got = stats.welch(CONST10, VARYING, alt)
        ref = sps.ttest_ind_from_stats(0.9951, 0.0, 10, v.mean(), v.std(ddof=1), v.size,
                                       equal_var=False, alternative=alt)
        assert got["t"] == pytest.approx(ref.statistic, rel=1e-12) and got["p"] == pytest.approx(ref.pvalue, rel=1e-12)
        assert got["df"] == pytest.approx(v.size - 1, rel=1e-12)  # only the varying arm has variance
    assert stats.welch(VARYING, CONST10)["t"] == pytest.approx(-stats.welch(CONST10, VARYING)["t"])
    # an exactly representable constant already has numpy variance 0: scipy's own numbers, bit for bit
    with warnings.catch_warnings():  # scipy warns that one sample is constant
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = sps.ttest_ind([0.5] * 4, VARYING, equal_var=False, alternative="greater")
    assert stats.welch([0.5] * 4, VARYING) == {"t": ref.statistic, "df": ref.df, "p": ref.pvalue}
    pooled = math.sqrt((v.size - 1) * v.var(ddof=1) / (10 + v.size - 2))
    g = (0.9951 - v.mean()) / pooled * (1 - 3 / (4 * (10 + v.size - 2) - 1))
    assert stats.hedges_g(CONST10, VARYING) == pytest.approx(g, rel=1e-12)
    lo, hi = stats.diff_ci(CONST10, VARYING)
    half = sps.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    assert (lo, hi) == pytest.approx((0.9951 - v.mean() - half, 0.9951 - v.mean() + half), rel=1e-9)


def test_finding_08_different_constant_arms_follow_scipys_convention():
    lo_arm, hi_arm = [0.9951] * 7, [0.9952] * 10
    with warnings.catch_warnings():  # scipy warns that the samples are constant
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = {alt: sps.ttest_ind([1.0] * 3, [2.0] * 3, equal_var=False, alternative=alt)
               for alt in ("greater", "less", "two-sided")}  # exactly representable: scipy's own answer
    for alt, r in ref.items():
        w = stats.welch(lo_arm, hi_arm, alt)
        assert w["t"] == r.statistic == -math.inf and w["p"] == r.pvalue and math.isnan(w["df"])
    assert stats.welch(hi_arm, lo_arm, "greater")["p"] == 0.0
    assert math.isnan(stats.hedges_g(lo_arm, hi_arm))
    assert all(math.isnan(v) for v in stats.diff_ci(lo_arm, hi_arm))
    assert stats.compare(lo_arm, hi_arm)["diff"] == 0.9951 - 0.9952


def test_finding_08_analysis_summaries_of_a_constant_sample_are_exact():
    from lossevo.evaluate.analyses import _summary

    assert _summary(CONST10) == {"mean": 0.9951, "std": 0.0}
    assert _summary(VARYING)["std"] == pytest.approx(np.std(VARYING, ddof=1))
