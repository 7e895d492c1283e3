"""Report figures: data extraction (plain, testable functions) and drawing (matplotlib, Agg).

Extraction functions return numbers only; ``plot_*`` functions take those numbers and write one
PNG. Drawing uses ``matplotlib.figure.Figure`` directly (no pyplot), so it never touches a global
backend or leaks figures.

Loss shapes (TaylorGLO paper Fig. 3a; dissertation Fig. 5.3) are computed for any loss spec
through :func:`lossevo.losses.build`: the network's prediction is set to probability ``p`` for
the correct class (class 0) and ``(1 - p) / (n - 1)`` for each other class, the logits are
``log(probs)``, and the loss of that single example is evaluated. ``n = 2`` is the papers'
binary-classification plot; ``n`` = the dataset's classes is the effective n-class curve, which
is the more informative one for TaylorGLO losses: a large class-independent term that the
softmax cancels can dominate the binary curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lossevo.io import atomic_write, read_json
from lossevo.search import state

#: Default grid of correct-class probabilities: ends exactly at p = 1 (a perfect prediction).
DEFAULT_GRID = np.linspace(0.0025, 1.0, 400)


# --------------------------------------------------------------------------- data extraction


@dataclass(frozen=True)
class ShapeCurve:
    """A loss along the correct-class probability ``p``, shifted by ``offset``.

    ``reference`` says how: ``"p=1"`` (loss(p = 1) is 0, the papers' convention) or, where the
    loss is infinite at p = 1 (e.g. label smoothing, Baikal: they take the log of the wrong
    classes' probability), ``"minimum"`` (the curve's minimum is 0). Non-finite values are NaN.
    """

    p: np.ndarray
    loss: np.ndarray
    offset: float
    reference: str
    n_classes: int

    @property
    def argmin(self) -> int:
        return int(np.nanargmin(self.loss))

    @property
    def p_min(self) -> float:
        return float(self.p[self.argmin])

    @property
    def loss_min(self) -> float:
        return float(self.loss[self.argmin])


def prediction_probs(p: np.ndarray, n_classes: int) -> torch.Tensor:
    """[len(p), n] float64 probabilities: p for class 0, (1 - p) / (n - 1) for each other."""
    p = torch.as_tensor(np.asarray(p, dtype=np.float64))
    rest = ((1.0 - p) / (n_classes - 1)).unsqueeze(1).expand(-1, n_classes - 1)
    return torch.cat([p.unsqueeze(1), rest], dim=1)


def raw_shape(spec: dict, n_classes: int = 2, p: np.ndarray | None = None) -> np.ndarray:
    """The unshifted loss of one example with target class 0 at each ``p`` (NaN if non-finite)."""
    from lossevo import losses

    p = DEFAULT_GRID if p is None else np.asarray(p, dtype=np.float64)
    if n_classes < 2:
        raise ValueError(f"a loss shape needs at least 2 classes, got {n_classes}")
    loss_fn = losses.build(spec).double()
    with torch.no_grad(), np.errstate(divide="ignore"):
        logits = torch.log(prediction_probs(p, n_classes))
        target = torch.zeros(1, dtype=torch.long)
        out = np.array([float(loss_fn(row.unsqueeze(0), target)) for row in logits])
    out[~np.isfinite(out)] = np.nan
    return out


def shape_curve(spec: dict, n_classes: int = 2, p: np.ndarray | None = None) -> ShapeCurve:
    """The loss shape of ``spec``: shifted so loss(p = 1) = 0 (or its minimum = 0, see above)."""
    p = DEFAULT_GRID if p is None else np.asarray(p, dtype=np.float64)
    raw = raw_shape(spec, n_classes, p)
    if np.all(np.isnan(raw)):
        return ShapeCurve(p, raw, math.nan, "none", n_classes)
    at_one = np.flatnonzero(p == 1.0)
    if at_one.size and np.isfinite(raw[at_one[0]]):
        offset, reference = float(raw[at_one[0]]), "p=1"
    else:
        offset, reference = float(np.nanmin(raw)), "minimum"
    return ShapeCurve(p, raw - offset, offset, reference, n_classes)


def logit_gradient_norm(spec: dict, n_classes: int) -> float:
    """|dL/dlogits| of one example at the uniform prediction (all logits 0), target class 0.

    The scale of the loss's gradient where training starts; with plain SGD it multiplies the
    learning rate (cross-entropy: sqrt((n - 1) / n)).
    """
    from lossevo import losses

    loss_fn = losses.build(spec).double()
    logits = torch.zeros(1, n_classes, dtype=torch.float64, requires_grad=True)
    loss_fn(logits, torch.zeros(1, dtype=torch.long)).backward()
    return float(logits.grad.norm())


def candidate_points(root: Path, generations: int, shards: int) -> list[dict]:
    """Every candidate of a search: generation, index, fitness (partial val. accuracy), status."""
    out = []
    for g in range(generations):
        for r in state.load_results(root, g, shards):
            out.append({"generation": g, "index": r["index"], "fitness": float(r["fitness"]),
                        "status": r["status"]})
    return out


def generation_summaries(root: Path, generations: int) -> list[dict]:
    """The ``summary.json`` of each generation (best/mean fitness, counts, best θ)."""
    return [read_json(state.summary_path(root, g)) for g in range(generations)]


def search_curve(points: list[dict], summaries: list[dict]) -> dict:
    """The numbers of the search-curve figure, split by what is drawn how."""
    def sel(*statuses):
        return [(p["generation"], p["index"], p["fitness"])
                for p in points if p["status"] in statuses]

    return {
        "ok": sel("ok"),
        "failed": sel("failed", "nan"),
        "rejected": sum(p["status"] == "rejected" for p in points),
        "generation": [s["generation"] for s in summaries],
        "best": [s["best_fitness"] for s in summaries],
        "mean": [s["mean_fitness"] for s in summaries],
        "popsize": max((p["index"] for p in points), default=0) + 1,
    }


def retrain_accuracies(records: dict[str, dict]) -> dict[str, dict]:
    """Per loss: the test accuracy of each seed and which seeds diverged (status not ok)."""
    return {name: {"test_accuracy": [float(a) for a in r["test_accuracy"]],
                   "diverged": [s != "ok" for s in r["status"]]}
            for name, r in records.items()}


# --------------------------------------------------------------------------- drawing


def _figure(ncols: int = 1, width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def mean_std_bands(ax, x, series: dict[str, np.ndarray]) -> None:
    """One line per series (mean over seeds of a [point, seed] array) with a ± std band."""
    for name, a in series.items():
        a = np.asarray(a, float)
        mean, std = a.mean(1), a.std(1, ddof=1)
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=name)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)


def _save(fig, path: Path) -> Path:
    # No "Software" metadata: the same numbers give the same bytes across matplotlib versions.
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110,
                                                    metadata={"Software": None}))


def _ylim(curves: list[ShapeCurve], p_from: float = 0.1) -> tuple[float, float] | None:
    """A y-range showing every curve for p >= p_from (losses blow up as p -> 0)."""
    vals = np.concatenate([c.loss[c.p >= p_from] for c in curves]) if curves else np.array([])
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return None
    lo, hi = float(vals.min()), float(vals.max())
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    return lo - pad, hi + pad


def plot_search(curve: dict, out: Path, title: str, n_classes: int,
                picks: dict[str, tuple[int, float]] | None = None) -> Path:
    """Dissertation Fig. 5.2: every candidate's partial-training val. accuracy per generation."""
    fig, (ax,) = _figure(width=10.0, height=4.5)
    width = 0.5 / max(1, curve["popsize"] - 1)

    def xs(pts):
        return [g - 0.25 + i * width for g, i, _ in pts]

    if curve["ok"]:
        ax.scatter(xs(curve["ok"]), [f for *_, f in curve["ok"]], s=14, color="tab:blue",
                   alpha=0.6, label=f"trained candidate ({len(curve['ok'])})")
    if curve["failed"]:
        ax.scatter(xs(curve["failed"]), [f for *_, f in curve["failed"]], s=18, marker="x",
                   color="tab:gray", label=f"failed: aborted or NaN ({len(curve['failed'])})")
    if curve["rejected"]:
        ax.plot([], [], " ", label=f"rejected without training, not plotted ({curve['rejected']})")
    ax.plot(curve["generation"], curve["best"], "-o", color="tab:red", ms=4, label="best")
    ax.plot(curve["generation"], curve["mean"], "--", color="tab:orange",
            label="mean (trained candidates)")
    ax.axhline(1.0 / n_classes, color="k", lw=0.8, ls=":", label=f"chance (1/{n_classes})")
    for (label, (g, f)), marker in zip((picks or {}).items(), ("*", "D")):
        ax.scatter([g], [f], s=150 if marker == "*" else 60, marker=marker, facecolor="none",
                   edgecolor="k", linewidth=1.4, zorder=5, label=label)
    ax.set(xlabel="generation", ylabel="validation accuracy after partial training",
           title=title, ylim=(0, 1.02))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_shapes(curves: dict[str, tuple[ShapeCurve, ShapeCurve]], out: Path) -> Path:
    """Each loss's shape, binary (left) and n-class effective (right), minima marked."""
    fig, axes = _figure(ncols=2, width=5.6, height=5.2)
    n = next(iter(curves.values()))[1].n_classes if curves else 2
    for k, ax in enumerate(axes):
        drawn = []
        for j, (label, pair) in enumerate(curves.items()):
            c = pair[k]
            if c.reference == "none":
                continue
            color = f"C{j}"
            shift = "" if c.reference == "p=1" else "; infinite at p=1, shifted to min 0"
            ax.plot(c.p, c.loss, color=color, label=f"{label}: min at p={c.p_min:.3f}{shift}")
            ax.plot([c.p_min], [c.loss_min], "o", color=color, mec="k", ms=6)
            drawn.append(c)
        lim = _ylim(drawn)
        if lim:
            ax.set_ylim(*lim)
        what = "binary: [p, 1-p]" if k == 0 else f"{n} classes: p, others (1-p)/{n - 1}"
        ax.set(xlabel="predicted probability of the correct class, p",
               ylabel="shifted loss (loss(p=1) = 0)", title=what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    return _save(fig, out)


def plot_generation_shapes(curves: list[tuple[ShapeCurve, ShapeCurve]], out: Path,
                           title: str) -> Path:
    """Dissertation Fig. 5.3: each generation's best loss, coloured by generation."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig, axes = _figure(ncols=2, width=5.2)
    cmap = colormaps["viridis"]
    norm = Normalize(0, max(1, len(curves) - 1))
    n = curves[0][1].n_classes if curves else 2
    for k, ax in enumerate(axes):
        drawn = []
        for g, pair in enumerate(curves):
            c = pair[k]
            if c.reference == "none":
                continue
            ax.plot(c.p, c.loss, color=cmap(norm(g)), lw=1.2)
            ax.plot([c.p_min], [c.loss_min], "o", color=cmap(norm(g)), ms=3)
            drawn.append(c)
        lim = _ylim(drawn)
        if lim:
            ax.set_ylim(*lim)
        what = "binary" if k == 0 else f"{n} classes (effective)"
        ax.set(xlabel="predicted probability of the correct class, p",
               ylabel="loss − loss(p=1)", title=f"{title}: {what}")
        ax.grid(alpha=0.3)
    fig.colorbar(ScalarMappable(norm, cmap), ax=list(axes), label="generation")
    return _save(fig, out)


def plot_retrain(accs: dict[str, dict], baseline: str, out: Path) -> Path:
    """Test accuracy per seed per loss: box plot with every seed as a point."""
    fig, (ax,) = _figure(width=1.3 * max(4, len(accs)) + 1.5, height=4.2)
    names = list(accs)
    data = [accs[n]["test_accuracy"] for n in names]
    ax.boxplot(data, widths=0.5, showfliers=False)
    ax.scatter(range(1, len(names) + 1), [np.mean(d) for d in data], marker="D", s=36,
               color="k", zorder=4, label="mean")
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right")
    rng = np.random.default_rng(0)  # fixed jitter: the same figure every run
    labelled = False
    for i, name in enumerate(names, start=1):
        a = np.asarray(accs[name]["test_accuracy"])
        bad = np.asarray(accs[name]["diverged"], dtype=bool)
        x = i + rng.uniform(-0.12, 0.12, len(a))
        ax.scatter(x[~bad], a[~bad], s=16, color="tab:blue", alpha=0.7, zorder=3,
                   label=None if i > 1 else "one seed")
        if bad.any():
            ax.scatter(x[bad], a[bad], s=30, marker="x", color="tab:red", zorder=3,
                       label=None if labelled else "diverged seed (counted as 0)")
            labelled = True
    if baseline in accs:
        ax.axhline(float(np.mean(accs[baseline]["test_accuracy"])), color="k", ls=":", lw=0.8,
                   label=f"{baseline} mean")
    n = sorted({len(d) for d in data})
    ax.set(ylabel="test accuracy",
           title=f"Retraining: test accuracy per seed ({'/'.join(map(str, n))} seeds per loss)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, out)
