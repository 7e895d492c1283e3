"""The report's evaluation sections: FGSM robustness, accuracy basins and weight statistics.

Reads ``eval/fgsm.json``, ``eval/basins.json`` and ``eval/weights.json`` (written by
:mod:`lossevo.evaluate.analyses`), draws their figures and formats their tables; the metrics
they add to ``metrics.json`` are keyed by analysis (``fgsm``, ``basins``, ``weights``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lossevo.config import Experiment
from lossevo.errors import LossevoError
from lossevo.io import read_json
from lossevo.report.figures import _figure, _save

ANALYSES = {"fgsm": "lossevo fgsm", "basins": "lossevo basins", "weights": "lossevo weights"}


def load(exp: Experiment) -> dict[str, dict]:
    """The three analyses' results, checked to cover the losses being reported."""
    out = {}
    for name, cmd in ANALYSES.items():
        path = exp.root / "eval" / f"{name}.json"
        if not path.exists():
            raise LossevoError(f"{path}: not found (run `{cmd}` first)")
        out[name] = read_json(path)
        have = set(out[name]["accuracy"] if name == "fgsm" else out[name]["losses"])
        if have != set(exp.loss_names()):
            raise LossevoError(f"{path}: covers other losses than experiments.{exp.name}.retrain "
                               f"(rerun `{cmd}`)")
    return out


def _ms(s: dict) -> str:
    if s["mean"] is None or not math.isfinite(s["mean"]):
        return "–"
    std = s.get("std")
    return f"{s['mean']:.4f} ({std:.4f})" if std is not None and math.isfinite(std) else f"{s['mean']:.4f}"


def _sig(test: dict | None) -> str:
    return "" if not test else f" {test['sig']}" if test["sig"] != "ns" else ""


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _eps_units(f: dict) -> str:
    """``pixel`` or ``normalized``: the unit of eval/fgsm.json's ε (older files: pixel)."""
    return f.get("epsilon_space", "pixel")


def draw(ev: dict, fdir: Path) -> dict[str, Path]:
    """FGSM curves, 1-D and 2-D basins and weight histograms; returns {key: path}."""
    out = {}
    f = ev["fgsm"]
    fig, (ax,) = _figure()
    for name, per_seed in f["accuracy"].items():
        a = np.asarray(per_seed, float)
        ax.errorbar(f["epsilons"], a.mean(0), yerr=a.std(0, ddof=1) if len(a) > 1 else None,
                    marker="o", ms=3, capsize=2, label=name)
    ax.set(xlabel=f"FGSM ε ({_eps_units(f)} units)", ylabel="test accuracy",
           title=f"FGSM: attacker differentiates {f['attack_loss'].replace('_', '-')}")
    ax.legend(fontsize=7)
    out["fgsm"] = _save(fig, fdir / "fgsm.png")

    b = ev["basins"]
    fig, axes = _figure(2)
    for name, rows in b["losses"].items():
        curves = [c for seed in rows["curves"] if seed for c in seed]
        if curves:
            axes[0].plot(b["alphas_1d"], np.mean(curves, 0), label=name)
    axes[0].set(xlabel="α (filter-normalised direction)", ylabel="test accuracy",
                title=f"1-D basins, mean over seeds × {b['directions']} directions")
    axes[0].legend(fontsize=7)
    base = b["losses"][b["baseline"]]["grid_2d"]
    if base:
        grid = np.asarray(base["accuracy"], float)
        cs = axes[1].contourf(b["alphas_2d"], b["alphas_2d"], grid.T, levels=12, cmap="viridis")
        fig.colorbar(cs, ax=axes[1], label="test accuracy")
        axes[1].set(xlabel="α (direction 1)", ylabel="β (direction 2)",
                    title=f"2-D basin of {b['baseline']} (seed {base['seed']})")
    out["basins"] = _save(fig, fdir / "basins.png")

    grids = [(n, r["grid_2d"]) for n, r in b["losses"].items() if r["grid_2d"]]
    if grids:  # none with a single direction per seed (a 2-D grid needs two)
        fig, axes = _figure(len(grids), width=3.2, height=3.0)
        for ax, (name, g) in zip(axes, grids):
            ax.contourf(b["alphas_2d"], b["alphas_2d"], np.asarray(g["accuracy"], float).T,
                        levels=np.linspace(0, 1, 11), cmap="viridis")
            ax.set(title=name, xlabel="α")
        out["basins_2d"] = _save(fig, fdir / "basins_2d.png")

    w = ev["weights"]
    fig, (ax,) = _figure()
    centres = 0.5 * (np.asarray(w["hist_edges"][:-1]) + np.asarray(w["hist_edges"][1:]))
    for name, rows in w["losses"].items():
        counts = np.asarray(rows["hist_counts"], float)
        if counts.sum() > 0:
            ax.step(centres, counts / counts.sum(), where="mid", label=name)
    ax.set(xlabel="parameter value" if w.get("parameters") == "all" else "weight value",
           ylabel="fraction of values (log)", yscale="log",
           title=f"Weight histograms ({w['bins']} shared bins, all seeds)")
    ax.legend(fontsize=7)
    out["weights"] = _save(fig, fdir / "weights.png")
    return out


def sections(ev: dict, figs: dict[str, Path], rel) -> list[str]:
    """The Markdown of the three analyses (``rel(path)`` makes figure links relative)."""
    f, b, w = ev["fgsm"], ev["basins"], ev["weights"]
    base = f["baseline"]
    attacker = ("cross-entropy (the same attack for every loss)" if f["attack_loss"] == "cross_entropy"
                else "each network's own training loss (as the authors' code does; a loss with a "
                     "flat input gradient weakens its own attack)")
    step = ("ε on [0, 1] pixels" if _eps_units(f) == "pixel" else
            "ε in normalised units, i.e. ε·std pixels per channel (the authors' code's unit)")
    lines = ["## Adversarial robustness (FGSM)", "",
             f"Test accuracy under x ← clamp(x + ε·sign(∇ₓL), 0, 1) in pixel space before "
             f"normalisation, a step of {step}; the attacker differentiates {attacker}. "
             f"Mean (std) over the retraining seeds; stars: one-tailed Welch test, H1: more "
             f"accurate than `{base}` at that ε.", ""]
    header = ["loss", *(f"ε = {e:g}" for e in f["epsilons"])]
    rows = []
    for name in f["accuracy"]:
        rows.append([f"`{name}`", *(_ms(pe["summary"][name]) + _sig(pe["tests"].get(name))
                                    for pe in f["per_epsilon"])])
    lines += _table(header, rows) + ["", f"![FGSM]({rel(figs['fgsm'])})", ""]

    lines += ["## Accuracy basins", "",
              f"Test accuracy at θ + α·d along {b['directions']} random Gaussian directions per seed, "
              f"filter-normalised to each network's weights (Li et al. 2018; biases and "
              f"normalisation parameters not perturbed); every loss of a seed gets the same raw "
              f"directions. Width: length of the interval around α = 0 where accuracy stays ≥ "
              f"{b['fraction']:g} × the centre's; drop: centre minus the mean accuracy at α = "
              f"±{b['radius']:g}. Mean (std) over seeds; Welch tests vs `{base}` (H1: wider; "
              f"smaller drop).", ""]
    rows = []
    for name, s in b["summary"].items():
        tw, td = b["tests"]["width"].get(name), b["tests"]["drop"].get(name)
        rows.append([f"`{name}`", _ms(s["width"]) + _sig(tw), f"{tw['p']:.3g}" if tw else "–",
                     _ms(s["drop"]) + _sig(td), f"{td['p']:.3g}" if td else "–"])
    lines += _table(["loss", "width", "p (wider)", f"drop at ±{b['radius']:g}", "p (smaller)"], rows)
    lines += ["", f"![1-D and 2-D basins]({rel(figs['basins'])})", ""]
    if "basins_2d" in figs:
        lines += ["2-D basins of every loss (first trained seed; same colour scale, 0 to 1):", "",
                  f"![2-D basins]({rel(figs['basins_2d'])})", ""]
    else:
        lines += [f"No 2-D basins: they need two directions per seed (basins.directions is {b['directions']}).", ""]

    counted = ("every trainable parameter (weights, biases and normalisation scales and shifts, "
               "as the dissertation's Table 5.3 and Fig. 5.8)" if w.get("parameters", "weights") == "all"
               else "the weight matrices and filters (biases and normalisation parameters excluded)")
    lines += ["## Weight statistics", "",
              f"Values of {counted} of the retrained networks: L2 norm and mean, mean (std) over "
              "seeds, and whether a Laplace or a Gaussian fits them better (log-likelihood of the "
              "fitted distribution), per seed.", ""]
    rows = [[f"`{n}`", _ms(r["l2_norm"]), _ms(r["mean"]), f"{r['laplace_better']} of {r['fitted']}"]
            for n, r in w["losses"].items()]
    lines += _table(["loss", "L2 norm", "mean", "seeds where Laplace fits better"], rows)
    lines += ["", f"![weight histograms]({rel(figs['weights'])})", ""]
    return lines


def metrics(ev: dict) -> dict:
    """Summaries for ``dvc metrics``: accuracy per ε, basin width and drop, L2 norm, per loss."""
    f, b, w = ev["fgsm"], ev["basins"], ev["weights"]
    return {
        "fgsm": {name: {f"eps_{pe['epsilon']:g}": pe["summary"][name]["mean"] for pe in f["per_epsilon"]}
                 for name in f["accuracy"]},
        "basins": {name: {"width": s["width"]["mean"], "drop": s["drop"]["mean"]}
                   for name, s in b["summary"].items()},
        "weights": {name: {"l2_norm": r["l2_norm"]["mean"], "laplace_better": r["laplace_better"]}
                    for name, r in w["losses"].items()},
    }
