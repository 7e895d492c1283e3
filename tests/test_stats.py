"""Welch's t-test and the results table, against hand formulas and scipy."""

import math

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
