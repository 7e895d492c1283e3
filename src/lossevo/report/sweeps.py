"""The report's sweep sections: reduced data, learning-rate sensitivity, Taylor approximations of CE.

Reads ``eval/data_sweep.json``, ``eval/lr_sweep.json`` and ``eval/taylor_ce.json`` (written by
:mod:`lossevo.evaluate.sweeps`), draws their figures and formats their tables; the metrics they
add to ``metrics.json`` are keyed by sweep (``data_sweep``, ``lr_sweep``, ``taylor_ce``).
Every number comes from those files except :data:`PAPER_TAYLOR_CE`, the papers' printed table
that the Taylor-CE section compares with (another task: AllCNN-C on CIFAR-10).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lossevo.config import Experiment
from lossevo.errors import LossevoError
from lossevo.io import read_json
from lossevo.report.evaluation import _ms, _sig, _table
from lossevo.report.figures import _figure, _save, mean_std_bands

SWEEPS = {"data_sweep": "lossevo data-sweep", "lr_sweep": "lossevo lr-sweep",
          "taylor_ce": "lossevo taylor-ce"}

#: Dissertation Table 5.2 = TaylorGLO paper Table 2, as printed: mean (std) test accuracy of ten
#: AllCNN-C runs on CIFAR-10 per order k of the CE approximation at (0.5, 0.5), and CE itself.
PAPER_TAYLOR_CE = {2: (0.1034, 0.0101), 3: (0.8451, 0.0043), 4: (0.8592, 0.0032),
                   5: (0.8649, 0.0042), "cross_entropy": (0.8965, 0.0021)}


def load(exp: Experiment) -> dict[str, dict]:
    """The three sweeps' results, checked to cover the losses and baseline being reported."""
    from lossevo.evaluate import sweeps

    out = {}
    baseline = exp.cfg["stats"]["baseline"]
    for name, cmd in SWEEPS.items():
        path = exp.root / "eval" / f"{name}.json"
        if not path.exists():
            raise LossevoError(f"{path}: not found (run `{cmd}` first)")
        out[name] = r = read_json(path)
        if name == "data_sweep":
            stale = r["losses"] != sweeps._sweep_losses(exp, exp.cfg["evaluate"]["data_sweep"]["losses"])
        elif name == "lr_sweep":
            stale = set(r["others"]) != set(exp.loss_names()) - {baseline}
        else:
            stale = r["baseline_accuracy"] != read_json(exp.retrain_path(baseline))["test_accuracy"]
        if stale or r["baseline"] != baseline:
            raise LossevoError(f"{path}: made for other losses or another baseline than "
                               f"experiments.{exp.name}'s (rerun `{cmd}`)")
    return out


def _p(test: dict | None) -> str:
    return f"{test['p']:.3g}" if test and math.isfinite(test["p"]) else "–"


def draw(sw: dict, fdir: Path) -> dict[str, Path]:
    """Accuracy vs training fraction, baseline accuracy vs lr, accuracy per Taylor order."""
    out = {}
    d = sw["data_sweep"]
    fig, (ax,) = _figure()
    x = np.asarray(d["fractions"], float)
    mean_std_bands(ax, x, d["accuracy"])  # [fraction, seed] per loss
    ax.set_xticks(x, [f"{f:g}\n({n})" for f, n in zip(d["fractions"], d["train_sizes"])])
    ax.set(xlabel="fraction of the training split (examples)", ylabel="test accuracy",
           title=f"Reduced data: mean ± std over {len(d['seeds'])} seeds")
    ax.legend(fontsize=7)
    out["data_sweep"] = _save(fig, fdir / "data_sweep.png")

    lr = sw["lr_sweep"]
    fig, axes = _figure(2)
    rates = [g["lr"] for g in lr["grid"]]
    a = np.asarray([g["accuracy"] for g in lr["grid"]], float)
    for ax in axes:
        ax.errorbar(rates, a.mean(1), yerr=a.std(1, ddof=1), marker="o", ms=4, capsize=3, color="k",
                    label=f"{lr['baseline']} (failed runs count as 0)")
        for i, (name, o) in enumerate(lr["others"].items()):
            ax.axhline(o["summary"]["mean"], lw=1, ls="-" if o["searched"] else ":", color=f"C{i % 10}",
                       label=f"{name} ({'searched' if o['searched'] else 'hand-designed'}, lr {lr['lr']:g})")
        ax.axvline(lr["lr"], color="grey", lw=0.5, ls="--")
        ax.set(xscale="log", xlabel="learning rate (log)", ylabel="test accuracy")
    for g in lr["grid"]:
        if g["failed_runs"]:
            axes[0].annotate(f"{g['failed_runs']} failed", (g["lr"], g["summary"]["mean"]), fontsize=7,
                             textcoords="offset points", xytext=(4, -10))
    # Right: zoomed on the means above halfway from chance to the best (the rates that train).
    means = [*a.mean(1), *(o["summary"]["mean"] for o in lr["others"].values())]
    means = [m for m in means if math.isfinite(m)]
    top = [m for m in means if m > (max(means) + 1.0 / lr["n_classes"]) / 2]
    axes[1].set_ylim(min(top) - 0.01, max(top) + 0.01)
    axes[0].set_title(f"{lr['baseline']} over learning rates vs the others at lr {lr['lr']:g}")
    axes[1].set_title("zoomed on the trained range")
    axes[1].legend(fontsize=6)
    out["lr_sweep"] = _save(fig, fdir / "lr_sweep.png")

    t = sw["taylor_ce"]
    fig, (ax,) = _figure()
    for i, k in enumerate(t["orders"]):
        accs = t["accuracy"][f"k{k}"]
        ax.scatter([k] * len(accs), accs, s=8, color="C0", alpha=0.5)
        s = t["summary"][f"k{k}"]
        ax.errorbar([k], [s["mean"]], yerr=[s["std"]] if math.isfinite(s["std"]) else None,
                    marker="o", color="C0", capsize=3, label="Taylor approximation of CE" if i == 0 else None)
    b = t["summary"][t["baseline"]]
    ax.axhline(b["mean"], color="k", lw=1, label=f"{t['baseline']} (retraining)")
    if min(min(v) for v in t["accuracy"].values()) < 1.5 / t["n_classes"]:  # else it squashes the plot
        ax.axhline(1.0 / t["n_classes"], color="grey", lw=0.5, ls=":", label="chance")
    ax.set_xticks(t["orders"])
    ax.set(xlabel="order k", ylabel="test accuracy",
           title=f"Taylor approximations of cross-entropy at (x, y) = ({t['centre'][0]:g}, {t['centre'][1]:g})")
    ax.legend(fontsize=7)
    out["taylor_ce"] = _save(fig, fdir / "taylor_ce.png")
    return out


def _data_cell(pf: dict, name: str, n: int) -> str:
    """mean (std) with diverged runs as 0, stars; then "k of n trained: mean" when some failed."""
    cell = _ms(pf["summary"][name]) + _sig(pf["tests"].get(name))
    trained = pf.get("trained", {}).get(name, n)
    if trained < n:
        ok = pf["summary_trained"][name]["mean"]
        cell += f"; {trained} of {n} trained" + (f": {ok:.4f}" if trained else "")
    return cell


def _data_section(d: dict, fig: str) -> list[str]:
    base = d["baseline"]
    n = len(d["seeds"])
    attempts = d.get("attempts", 1)
    retry = (f"a run that diverges is retried with seed + {d['retry_stride']} × attempt, up to "
             f"{attempts} attempts in all; " if attempts > 1 else "")
    lines = ["## Reduced training data", "",
             f"Each loss retrained from scratch (full recipe, the retrained spec, no new search) on "
             f"a stratified subset of the training split (data.split_seed {d['split_seed']}; "
             f"{d['full_train_size']} examples at fraction 1; validation and test sets unchanged), "
             f"seeds {d['seeds'][0]}–{d['seeds'][-1]}; {retry}a run that fails every attempt counts "
             f"as 0. Mean (std) test accuracy; stars: one-tailed Welch test, H1: more accurate than "
             f"`{base}` at that fraction. Where some runs failed, the cell adds how many of the {n} "
             f"trained and their mean alone (the dissertation's \"only four out of ten ... trained\", "
             f"§5.4.3): scoring failures as 0 pulls an unstable loss down, leaving them out flatters it.",
             ""]
    header = ["loss", *(f"{pf['fraction']:g} ({pf['train_size']})" for pf in d["per_fraction"])]
    rows = [[f"`{name}`", *(_data_cell(pf, name, n) for pf in d["per_fraction"])] for name in d["losses"]]
    lines += _table(header, rows)
    diverged = {name: sum(s != "ok" for per in d["status"][name] for s in per) for name in d["losses"]}
    retried = {name: sum(pf.get("retried_runs", {}).get(name, 0) for pf in d["per_fraction"])
               for name in d["losses"]}
    first, last = d["per_fraction"][0], d["per_fraction"][-1]
    gaps = {name: (first["summary"][name]["mean"] - first["summary"][base]["mean"],
                   last["summary"][name]["mean"] - last["summary"][base]["mean"])
            for name in d["losses"] if name != base}
    sig = [name for name, tst in first["tests"].items() if tst["p"] < d["alpha"]]
    text = (f"At the smallest fraction ({first['train_size']} examples) {len(sig)} of {len(gaps)} losses "
            f"beat `{base}` at p < {d['alpha']:g}" + (f" ({', '.join(f'`{x}`' for x in sig)})" if sig else "") + ".")
    if len(d["per_fraction"]) > 1 and gaps:
        grows = [name for name, (g0, g1) in gaps.items() if g0 > g1]
        text += (f" The mean gain over `{base}` is larger at {first['fraction']:g} than at "
                 f"{last['fraction']:g} for {len(grows)} of {len(gaps)} losses (the papers: the gap "
                 f"grows as the data shrinks).")
    if any(retried.values()):
        text += " Runs retried: " + ", ".join(f"`{k}` {v}" for k, v in retried.items() if v) + "."
    if any(diverged.values()):
        text += (" Runs that failed every attempt (scored 0): "
                 + ", ".join(f"`{k}` {v}" for k, v in diverged.items() if v) + ".")
    return lines + ["", text, "", f"![reduced data]({fig})", ""]


def _lr_section(lr: dict, fig: str) -> list[str]:
    base, alpha = lr["baseline"], lr["alpha"]
    lines = ["## Learning-rate sensitivity", "",
             f"`{base}` retrained at multiples of the standard learning rate {lr['lr']:g} "
             f"({len(lr['seeds'])} seeds each); a run that diverges is retried with seed + "
             f"{lr['retry_stride']} × attempt, up to {lr['attempts']} attempts in all (the papers "
             f"retried too); a run that fails every attempt counts as 0.", ""]
    rows = [[f"{g['lr']:g}" + (" (standard)" if g["factor"] == 1.0 else ""), f"{g['factor']:g}",
             _ms(g["summary"]), f"{g['retried_runs']}", f"{g['failed_attempts']}", f"{g['failed_runs']}",
             f"{g['near_chance_runs']}"] for g in lr["grid"]]
    lines += _table(["lr", "× standard", "test accuracy, mean (std)", "runs retried",
                     "failed attempts", "runs failed every attempt",
                     "trained, but < 1.5 × chance"], rows)
    stuck = sum(g["near_chance_runs"] for g in lr["grid"])
    if stuck:
        lines += ["", f"{stuck} runs finished without diverging but stayed near chance "
                      f"(1/{lr['n_classes']}); only divergence (a non-finite loss) triggers a retry, "
                      f"so they count as they are."]
    best = lr["best"]
    lines += ["", f"Best learning rate (highest mean, picked on the test set, which flatters "
                  f"`{base}`): {best['lr']:g}, {_ms(best['summary'])}. The other losses at the "
                  f"standard rate (retraining results), one-tailed Welch test against `{base}` at "
                  f"that best rate:", ""]
    rows = []
    for name, o in lr["others"].items():
        t = o.get("vs_best_lr")
        rows.append([f"`{name}`", "searched" if o["searched"] else "hand-designed",
                     _ms(o["summary"]), _p(t), "yes" if t and t["p"] < alpha else "no"])
    lines += _table(["loss", "kind", f"test accuracy at lr {lr['lr']:g}",
                     f"p (H1: better than `{base}` at lr {best['lr']:g})", f"beats it (p < {alpha:g})"], rows)
    searched = [n for n, o in lr["others"].items() if o["searched"]]
    beat = [n for n in searched if (lr["others"][n].get("vs_best_lr") or {}).get("p", 1.0) < alpha]
    if not searched:
        answer = "No searched loss is retrained here, so the question stays open."
    elif beat:
        answer = (f"Is the gain more than a better effective step size? For {len(beat)} of "
                  f"{len(searched)} searched losses ({', '.join(f'`{n}`' for n in beat)}) yes: "
                  f"they beat `{base}` even at its best learning rate.")
    else:
        answer = (f"Is the gain more than a better effective step size? Not shown: none of the "
                  f"{len(searched)} searched losses beats `{base}` at its best learning rate "
                  f"(p < {alpha:g}).")
    return lines + ["", answer, "", f"![learning-rate sweep]({fig})", ""]


def _taylor_section(t: dict, fig: str) -> list[str]:
    base, alpha = t["baseline"], t["alpha"]
    lines = ["## Taylor approximations of cross-entropy", "",
             f"The trimmed order-k Taylor expansion of f(x, y) = x·log y around (x, y) = "
             f"({t['centre'][0]:g}, {t['centre'][1]:g}) as a `taylor` loss (loss = −Σ over classes "
             f"of the polynomial, so it approximates cross-entropy; θ = centres, then ∂x^a ∂y^b f at "
             f"the centre per kept term), trained over seeds {t['seeds'][0]}–{t['seeds'][-1]}, beside "
             f"`{base}`'s retraining results. One-tailed Welch tests vs `{base}` in both directions.", ""]
    rows = []
    for k in t["orders"]:
        n = f"k{k}"
        paper = PAPER_TAYLOR_CE.get(k)
        rows.append([f"k = {k}", "[" + ", ".join(f"{v:.3g}" for v in t["specs"][n]["theta"]) + "]",
                     _ms(t["summary"][n]), f"{sum(s != 'ok' for s in t['status'][n])}",
                     _p(t["tests"]["greater"].get(n)), _p(t["tests"]["less"].get(n)),
                     f"{paper[0]:.4f} ({paper[1]:.4f})" if paper else "–"])
    paper = PAPER_TAYLOR_CE["cross_entropy"] if t["baseline_spec"]["kind"] == "cross_entropy" else None
    rows.append([f"`{base}`", "–", _ms(t["summary"][base]), "–", "–", "–",
                 f"{paper[0]:.4f} ({paper[1]:.4f})" if paper else "–"])
    lines += _table(["loss", "θ (paper convention)", "test accuracy, mean (std)", "diverged",
                     "p (better)", "p (worse)", "papers (AllCNN-C, CIFAR-10)"], rows)
    means = [t["summary"][f"k{k}"]["mean"] for k in t["orders"]]
    worse = [k for k in t["orders"] if (t["tests"]["less"].get(f"k{k}") or {}).get("p", 1.0) < alpha]
    chance = 1.0 / t["n_classes"]
    untrained = [k for k, m in zip(t["orders"], means) if m < 1.5 * chance]
    monotone = all(b >= a for a, b in zip(means, means[1:]))
    text = (f"Dissertation Table 5.2 / TaylorGLO paper Table 2 (AllCNN-C on CIFAR-10): k = 2 does "
            f"not train (chance), k ≥ 3 trains, accuracy rises with k, and every order stays below "
            f"cross-entropy. Here: {len(worse)} of {len(t['orders'])} orders are worse than `{base}` "
            f"at p < {alpha:g}" + (f" (k = {', '.join(map(str, worse))})" if worse else "")
            + "; " + (f"k = {', '.join(map(str, untrained))} stay near chance" if untrained
                      else "every order trains (mean above 1.5 × chance)")
            + "; the mean " + ("rises" if monotone else "does not rise monotonically")
            + " with k.")
    if 2 in t["orders"] and t["centre"] == [0.5, 0.5]:
        # f2 = (y - 1/2) - (y - x)^2 + (x - 1/2)^2, and the sum over classes of y is 1.
        text += (" At this centre the k = 2 loss is, up to a constant, Σ over classes of (y − x)², "
                 "the squared error of the softmax output (Brier score).")
    return lines + ["", text, "", f"![Taylor approximations of CE]({fig})", ""]


def sections(sw: dict, figs: dict[str, Path], rel) -> list[str]:
    """The Markdown of the three sweeps (``rel(path)`` makes figure links relative)."""
    return (_data_section(sw["data_sweep"], rel(figs["data_sweep"]))
            + _lr_section(sw["lr_sweep"], rel(figs["lr_sweep"]))
            + _taylor_section(sw["taylor_ce"], rel(figs["taylor_ce"])))


def metrics(sw: dict) -> dict:
    """Summaries for ``dvc metrics``: accuracy per fraction, per lr and the best, per order."""
    d, lr, t = sw["data_sweep"], sw["lr_sweep"], sw["taylor_ce"]
    return {
        "data_sweep": {n: {f"frac_{pf['fraction']:g}": pf["summary"][n]["mean"] for pf in d["per_fraction"]}
                       for n in d["losses"]},
        "lr_sweep": {
            "baseline": {f"lr_{g['lr']:g}": g["summary"]["mean"] for g in lr["grid"]},
            "failed_runs": {f"lr_{g['lr']:g}": g["failed_runs"] for g in lr["grid"]},
            "best_lr": lr["best"]["lr"], "best_mean": lr["best"]["summary"]["mean"],
            "p_vs_best_lr": {n: (o.get("vs_best_lr") or {}).get("p") for n, o in lr["others"].items()},
        },
        "taylor_ce": {f"k{k}": {"test_acc_mean": t["summary"][f"k{k}"]["mean"],
                                "p_worse": (t["tests"]["less"].get(f"k{k}") or {}).get("p")}
                      for k in t["orders"]},
    }
