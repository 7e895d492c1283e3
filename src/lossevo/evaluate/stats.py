"""One-tailed Welch t-tests of each retrained loss against a baseline (papers' App. A.5).

H1 is fixed before looking at the data: the loss's mean test accuracy is *greater* than the
baseline's (``alternative='greater'``). The papers print the p-value in the direction of the
observed difference; ``p_less`` gives the reverse one-tailed test so either can be read off.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps


def stars(p: float) -> str:
    """Significance marks at 0.05 / 0.01 / 0.001."""
    if not math.isfinite(p):
        return "ns"
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "ns"


def welch(a: list[float], b: list[float], alternative: str = "greater") -> dict:
    """Welch's t-test of mean(a) vs mean(b) via scipy: t, Welch–Satterthwaite df, p."""
    res = sps.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=False,
                        alternative=alternative)
    return {"t": float(res.statistic), "df": float(res.df), "p": float(res.pvalue)}


def table(accuracies: dict[str, list[float]], baseline: str) -> pd.DataFrame:
    """One row per loss: n, mean, std (ddof=1), and the Welch test against ``baseline``."""
    base = accuracies[baseline]
    rows = []
    for name, acc in accuracies.items():
        row = {"loss": name, "n": len(acc), "mean": float(np.mean(acc)), "std": float(np.std(acc, ddof=1))}
        if name == baseline:
            row.update(t=math.nan, df=math.nan, p=math.nan, p_less=math.nan, sig="baseline")
        else:
            g = welch(acc, base, "greater")
            row.update(t=g["t"], df=g["df"], p=g["p"], p_less=welch(acc, base, "less")["p"],
                       sig=stars(g["p"]))
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame, baseline: str) -> str:
    """The table as Markdown, mean (std) formatted like the papers' tables."""
    lines = [
        f"| loss | n | test accuracy, mean (std) | t | df | p (H1: loss > {baseline}) | sig. "
        f"| p (H1: loss < {baseline}) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def num(v: float, fmt: str) -> str:
        return "–" if not math.isfinite(v) else format(v, fmt)

    for r in df.itertuples():
        lines.append(
            f"| {r.loss} | {r.n} | {r.mean:.4f} ({r.std:.4f}) | {num(r.t, '.3f')} | {num(r.df, '.1f')} "
            f"| {num(r.p, '.3g')} | {r.sig} | {num(r.p_less, '.3g')} |"
        )
    return "\n".join(lines) + "\n"


def write(exp) -> pd.DataFrame:
    """Stats stage: read every retrained loss, write stats/welch.csv and stats/welch.md."""
    from lossevo.io import read_json, write_text

    acc = {name: read_json(exp.retrain_path(name))["test_accuracy"] for name in exp.loss_names()}
    baseline = exp.cfg["stats"]["baseline"]
    df = table(acc, baseline)
    write_text(exp.stats_dir / "welch.csv", df.to_csv(index=False))
    write_text(exp.stats_dir / "welch.md", markdown(df, baseline))
    return df
