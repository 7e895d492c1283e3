"""Retrained losses compared with a baseline and with the best hand-designed loss (papers' App. A.5).

Every loss is compared with the baseline (``stats.baseline``) and, when the table holds
hand-designed losses (kinds in :data:`HAND_DESIGNED`), with the best of them (highest mean test
accuracy). Each comparison reports:

* the papers' one-tailed Welch t-test, H1 fixed before looking at the data: the loss's mean test
  accuracy is *greater* than the reference's (``alternative='greater'``), with stars from this raw
  p as the papers print them. ``p_less`` (vs baseline only) is the reverse one-tailed test, since
  the papers print the p-value in the direction of the observed difference;
* Holm's step-down adjustment of that p, so a claim "some loss beats the baseline" keeps its
  family-wise error rate at α however many losses the table holds. The families are: all the
  "vs baseline" tests of the table (one family), and separately all the "vs best hand-designed"
  tests (a second family);
* the mean difference (loss − reference) with a two-sided Welch confidence interval
  (Welch–Satterthwaite df; ``stats.confidence``, default 95 %): how large the gain is, not only
  whether it exists. The two-sided 95 % interval excludes 0 exactly when the two-sided Welch
  p < 0.05, a stricter criterion than the one-tailed p < 0.05;
* Hedges' g, the standardized mean difference with the pooled SD and the small-sample bias
  correction: an effect size comparable across datasets whose accuracies spread differently.

The best hand-designed loss is picked after seeing the data (max mean); that makes it look better
than it is (winner's curse), so "loss > best hand-designed" tests are conservative, not optimistic.

Constant samples (saturated accuracies: ten seeds at 0.9951) are detected exactly (every value
equal, ``np.ptp == 0``) and get variance exactly 0 and their value as mean, not numpy's round-off
(a variance of ~1e-32 would make t, g and the CI arbitrary). Then, following scipy's t-test
conventions: both constant and equal, t and p are NaN; both constant and different, t = ±inf and
p = 0 or 1 as the alternative says (scipy's ``ttest_ind``), df NaN (Welch–Satterthwaite is 0/0);
Hedges' g and the CI bounds are NaN whenever the pooled SD or the standard error is 0. One constant
arm and one varying arm is an ordinary Welch test whose constant arm contributes no variance.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

#: Loss-spec kinds that count as hand-designed competitors: label smoothing and the Baikal family.
HAND_DESIGNED = frozenset({"label_smoothing", "baikal", "baikal_cma", "fast_logit"})

#: The comparison columns of :func:`table`: NaN where a row is not compared (the reference itself).
VS_BASELINE = ("diff", "ci_low", "ci_high", "hedges_g", "t", "df", "p", "p_holm", "p_less")
VS_HAND = ("hd_diff", "hd_ci_low", "hd_ci_high", "hd_hedges_g", "hd_t", "hd_df", "hd_p", "hd_p_holm")


def stars(p: float) -> str:
    """Significance marks at 0.05 / 0.01 / 0.001."""
    if not math.isfinite(p):
        return "ns"
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "ns"


def moments(a: Sequence[float]) -> tuple[int, float, float]:
    """(n, mean, ddof-1 variance) of ``a``, exact for a constant sample (its value and 0).

    numpy's mean of ten copies of 0.9951 is not 0.9951, so its variance is ~1e-32, not 0; an exact
    test of constancy (``np.ptp == 0``, n ≥ 2) gives the zero-variance contract of the module. A
    single value has an undefined (NaN) variance.
    """
    a = np.asarray(a, float)
    if a.size >= 2 and np.ptp(a) == 0:
        return a.size, float(a[0]), 0.0
    return a.size, float(a.mean()) if a.size else math.nan, float(a.var(ddof=1)) if a.size > 1 else math.nan


def welch(a: Sequence[float], b: Sequence[float], alternative: str = "greater") -> dict[str, float]:
    """Welch's t-test of mean(a) vs mean(b) via scipy: t, Welch–Satterthwaite df, p.

    A constant arm enters with its exact mean and variance 0 (:func:`moments`; scipy's
    ``ttest_ind_from_stats``), so two constant arms give NaN (equal) or ±inf/p ∈ {0, 1} (different).
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    (na, ma, va), (nb, mb, vb) = moments(a), moments(b)
    # scipy on the samples unless a constant arm has round-off variance or both arms are constant
    # (scipy's df is then an artifact): the same bits as before wherever numpy was already exact.
    round_off = na >= 2 and nb >= 2 and ((va == 0 and a.var(ddof=1) != 0) or (vb == 0 and b.var(ddof=1) != 0))
    if na < 2 or nb < 2 or not (round_off or va == vb == 0):
        with warnings.catch_warnings():
            if va == 0 or vb == 0:  # scipy's "nearly identical data" warning: exactly constant here
                warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
            res = sps.ttest_ind(a, b, equal_var=False, alternative=alternative)
        return {"t": float(res.statistic), "df": float(res.df), "p": float(res.pvalue)}
    with np.errstate(divide="ignore", invalid="ignore"):
        res = sps.ttest_ind_from_stats(ma, math.sqrt(va), na, mb, math.sqrt(vb), nb, equal_var=False,
                                       alternative=alternative)
    sa, sb = va / na, vb / nb
    df = (sa + sb) ** 2 / (sa**2 / (na - 1) + sb**2 / (nb - 1)) if sa + sb > 0 else math.nan
    return {"t": float(res.statistic), "df": float(df), "p": float(res.pvalue)}


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order.

    With the m p-values sorted ascending, p_(i) is adjusted to max_{j<=i} min(1, (m − j + 1) p_(j)):
    uniformly more powerful than Bonferroni, valid under any dependence between the tests (here
    they share the reference's seeds). A NaN p (a degenerate test, e.g. two equal constant
    samples) stays NaN but still counts in m, as a test that cannot reject: conservative.
    """
    # Hand-written: statsmodels (multipletests 'holm') is not a dependency, and scipy's
    # false_discovery_control does Benjamini–Hochberg/Yekutieli (FDR), not Holm (FWER).
    p = np.asarray(p, dtype=float)
    q = np.where(np.isnan(p), 1.0, p)
    order = np.argsort(q, kind="stable")
    steps = np.maximum.accumulate((q.size - np.arange(q.size)) * q[order])
    out = np.empty_like(q)
    out[order] = np.minimum(1.0, steps)
    out[np.isnan(p)] = math.nan
    return out


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """Hedges' g of a over b: (mean(a) − mean(b)) / pooled SD, times the bias correction J.

    Pooled SD = sqrt(((na − 1) sa² + (nb − 1) sb²) / (na + nb − 2)) with ddof = 1 SDs; Cohen's d
    overestimates |δ| in small samples (10 seeds), J = 1 − 3 / (4 (na + nb − 2) − 1) corrects it
    (Hedges & Olkin 1985; 0.01 % above the exact Γ-form at 10 + 10 seeds, 0.3 % at 3 + 3).
    Positive when a's mean is higher; NaN when the pooled SD is 0 (both samples constant, exactly:
    :func:`moments`) or undefined.
    """
    (na, ma, va), (nb, mb, vb) = moments(a), moments(b)
    dof = na + nb - 2
    if na < 2 or nb < 2:
        return math.nan
    pooled = math.sqrt(((na - 1) * va + (nb - 1) * vb) / dof)
    if not pooled > 0:
        return math.nan
    return float((ma - mb) / pooled * (1 - 3 / (4 * dof - 1)))


def diff_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Welch confidence interval of mean(a) − mean(b).

    diff ± t_{(1+confidence)/2, ν} · sqrt(sa²/na + sb²/nb), ν the Welch–Satterthwaite df: the
    interval scipy's ``ttest_ind(a, b, equal_var=False).confidence_interval()`` gives. Unequal
    variances are the rule here (a bad loss can be far noisier than cross-entropy), hence Welch.
    NaN bounds when the standard error is 0 (both samples constant, exactly: :func:`moments`;
    scipy's interval then has zero width, which would read as certainty) or undefined.
    """
    (na, ma, va), (nb, mb, vb) = moments(a), moments(b)
    if na < 2 or nb < 2:
        return math.nan, math.nan
    va, vb = va / na, vb / nb
    se = math.sqrt(va + vb)
    if not se > 0:
        return math.nan, math.nan
    nu = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    half = float(sps.t.ppf((1 + confidence) / 2, nu)) * se
    d = ma - mb
    return d - half, d + half


def compare(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Everything one row reports about a vs b: diff, CI, Hedges' g, one-tailed Welch t/df/p."""
    lo, hi = diff_ci(a, b, confidence)
    w = welch(a, b, "greater")
    return {"diff": moments(a)[1] - moments(b)[1], "ci_low": lo, "ci_high": hi,
            "hedges_g": hedges_g(a, b), **w}


def best_hand_designed(means: Mapping[str, float], specs: Mapping[str, Mapping]) -> str | None:
    """The hand-designed loss (spec kind in :data:`HAND_DESIGNED`) with the highest mean, or None.

    Only losses in ``means`` (the table) are candidates; specs without a kind (``{search: ...}``,
    evolved losses) are not hand-designed. Ties go to the first in table order.
    """
    cands = [n for n, m in means.items()
             if math.isfinite(m) and (specs.get(n) or {}).get("kind") in HAND_DESIGNED]
    return max(cands, key=lambda n: means[n]) if cands else None


def table(accuracies: Mapping[str, Sequence[float]], baseline: str,
          specs: Mapping[str, Mapping] | None = None, confidence: float = 0.95) -> pd.DataFrame:
    """One row per loss: n, mean, std (ddof = 1), its comparison with ``baseline`` and with the best
    hand-designed loss.

    vs baseline: ``diff, ci_low, ci_high, hedges_g, t, df, p, p_holm, p_less, sig`` (NaN and
    ``sig = 'baseline'`` on the baseline row). vs best hand-designed (``hd_ref`` names it, chosen
    from ``specs`` by :func:`best_hand_designed`): the same with an ``hd_`` prefix, NaN and
    ``hd_sig = 'reference'`` on its own row; all NaN and ``hd_ref`` empty when the table has no
    hand-designed loss, or when the best one is the baseline (that comparison is the first one).
    ``confidence`` is the level of both intervals (a column, so :func:`markdown` can label them).
    """
    means = {n: moments(a)[1] for n, a in accuracies.items()}
    ref = best_hand_designed(means, specs or {})
    ref = None if ref == baseline else ref
    rows = []
    for name, acc in accuracies.items():
        row = {"loss": name, "n": len(acc), "mean": means[name], "std": math.sqrt(moments(acc)[2])}
        if name == baseline:
            row.update(dict.fromkeys(VS_BASELINE, math.nan), sig="baseline")
        else:
            row.update(compare(acc, accuracies[baseline], confidence),
                       p_less=welch(acc, accuracies[baseline], "less")["p"], p_holm=math.nan)
            row["sig"] = stars(row["p"])
        row.update(confidence=confidence, hd_ref=ref or "", **dict.fromkeys(VS_HAND, math.nan), hd_sig="")
        if ref is not None:
            if name == ref:
                row["hd_sig"] = "reference"
            else:
                row.update({f"hd_{k}": v for k, v in compare(acc, accuracies[ref], confidence).items()})
                row["hd_sig"] = stars(row["hd_p"])
        rows.append(row)
    cols = ["loss", "n", "mean", "std", *VS_BASELINE, "sig", "confidence", "hd_ref", *VS_HAND, "hd_sig"]
    df = pd.DataFrame(rows, columns=cols)
    # One Holm family per reference: every other row of the table.
    others = df["loss"] != baseline
    df.loc[others, "p_holm"] = holm(df.loc[others, "p"].to_numpy())
    if ref is not None:
        others = df["loss"] != ref
        df.loc[others, "hd_p_holm"] = holm(df.loc[others, "hd_p"].to_numpy())
    return df


def _num(v: float, fmt: str) -> str:
    return "–" if not math.isfinite(v) else format(v, fmt)


def _p(v: float) -> str:
    """A p-value to 3 significant digits; "> 0.999" rather than a bare 1 that reads as certainty."""
    return "> 0.999" if math.isfinite(v) and v > 0.999 else _num(v, ".3g")


def _diff(r, prefix: str = "") -> str:
    d, lo, hi = (getattr(r, prefix + k) for k in ("diff", "ci_low", "ci_high"))
    if not math.isfinite(d):
        return "–"
    return f"{d:+.4f} [{_num(lo, '+.4f')}, {_num(hi, '+.4f')}]"


def markdown(df: pd.DataFrame, baseline: str) -> str:
    """The :func:`table` as Markdown: mean (std) like the papers' tables, the difference from the
    baseline with its CI, Hedges' g, raw and Holm p, stars; then the vs-best-hand-designed table
    when the table has one (``hd_ref``). Works on the DataFrame read back from welch.csv.
    """
    conf = next((float(c) for c in df["confidence"] if math.isfinite(c)), 0.95)
    ci = f"{conf * 100:g}% CI"
    lines = [
        f"| loss | n | test accuracy, mean (std) | Δ vs {baseline} [{ci}] | Hedges' g "
        f"| p (H1: loss > {baseline}) | Holm p | sig. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples():
        lines.append(
            f"| {r.loss} | {r.n} | {r.mean:.4f} ({_num(r.std, '.4f')}) | {_diff(r)} "
            f"| {_num(r.hedges_g, '+.2f')} | {_p(r.p)} | {_p(r.p_holm)} | {r.sig} |"
        )
    lines += [
        "",
        "Stars (* p < 0.05, ** p < 0.01, *** p < 0.001) are from the raw one-tailed Welch p, as in "
        f"the papers. Holm p adjusts all the tests against `{baseline}` in this table as one family, "
        "so Holm p < α controls the family-wise error rate at α (the chance of any false claim "
        f"of beating `{baseline}`). Δ = loss mean − {baseline} mean with a two-sided Welch {ci}; "
        "Hedges' g = Δ / pooled SD, small-sample corrected.",
    ]
    refs = [r for r in df["hd_ref"] if isinstance(r, str) and r]
    if refs:
        ref = refs[0]
        lines += [
            "", f"**vs best hand-designed loss ({ref})**", "",
            f"| loss | Δ vs {ref} [{ci}] | Hedges' g | p (H1: loss > {ref}) | Holm p | sig. |",
            "|---|---|---|---|---|---|",
        ]
        for r in df[df["loss"] != ref].itertuples():
            lines.append(
                f"| {r.loss} | {_diff(r, 'hd_')} | {_num(r.hd_hedges_g, '+.2f')} | {_p(r.hd_p)} "
                f"| {_p(r.hd_p_holm)} | {r.hd_sig} |"
            )
        lines += [
            "",
            f"`{ref}`: the hand-designed loss (label smoothing, Baikal family) with the highest mean "
            "test accuracy. These tests are a second Holm family, adjusted apart from the baseline's.",
        ]
    return "\n".join(lines) + "\n"


def write(exp) -> pd.DataFrame:
    """Stats stage: read every retrained loss, write stats/welch.csv and stats/welch.md."""
    from lossevo.io import read_json, write_text

    acc = {name: read_json(exp.retrain_path(name))["test_accuracy"] for name in exp.loss_names()}
    baseline = exp.cfg["stats"]["baseline"]
    df = table(acc, baseline, exp.cfg["retrain"]["losses"], exp.cfg["stats"].get("confidence", 0.95))
    write_text(exp.stats_dir / "welch.csv", df.to_csv(index=False))
    write_text(exp.stats_dir / "welch.md", markdown(df, baseline))
    return df
