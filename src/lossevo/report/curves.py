"""The report's accuracy-during-training section (dissertation Fig. 4.3: test accuracy every 250
steps; Fig. 4.5: Baikal vs cross-entropy "across varying training steps").

Reads the ``curve`` that retraining records when ``retrain.curve_every`` is set: per seed, the
test accuracy after every that many steps, then the run's final test accuracy. A run cut short
(diverged, aborted) scores 0 from its stop on. A checkpoint's accuracy is what a run trained
for that many steps on the full schedule's rates gives (``partial_schedule: truncate``: the same
batches, the same updates), so one run per seed gives the whole figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lossevo.evaluate import stats
from lossevo.report.evaluation import _table
from lossevo.report.figures import _figure, _save, mean_std_bands

#: Checkpoints shown in the table (evenly spaced, the last always included); the figure has all.
TABLE_POINTS = 8


def load(records: dict[str, dict], steps: int) -> dict | None:
    """{steps: [...], accuracy: {loss: [point, seed]}} for the losses with a curve; None if none has."""
    have = {name: r for name, r in records.items() if "curve" in r}
    if not have:
        return None
    points = next(iter(have.values()))["curve"]["steps"] + [steps]
    acc = {name: np.column_stack([np.asarray(r["curve"]["test_accuracy"], float).reshape(len(r["seeds"]), -1),
                                  np.asarray(r["test_accuracy"], float)]).T
           for name, r in have.items()}
    return {"steps": points, "accuracy": acc}


def draw(cv: dict, fdir: Path) -> dict[str, Path]:
    """Test accuracy against training steps, mean ± std over seeds, per loss."""
    fig, (ax,) = _figure()
    mean_std_bands(ax, np.asarray(cv["steps"], float), cv["accuracy"])
    n = next(iter(cv["accuracy"].values())).shape[1]
    # The means set the range: one failed seed's band (±0.25 and more) would flatten them all.
    means = np.concatenate([a.mean(1) for a in cv["accuracy"].values()])
    ax.set_ylim(max(0.0, float(means.min()) - 0.05), min(1.0, float(means.max()) + 0.05))
    ax.set(xlabel="training steps", ylabel="test accuracy",
           title=f"Test accuracy during training: mean ± std over {n} seeds")
    ax.legend(fontsize=7)
    return {"curves": _save(fig, fdir / "training_curves.png")}


def section(cv: dict, baseline: str, fig: str) -> list[str]:
    """Means at evenly spaced checkpoints, each with a one-tailed Welch test against the baseline."""
    steps, acc = cv["steps"], cv["accuracy"]
    idx = sorted({round(i) for i in np.linspace(0, len(steps) - 1, min(TABLE_POINTS, len(steps)))})
    others = [n for n in acc if n != baseline]
    lines = ["## Test accuracy during training", "",
             f"Each retrained network's test accuracy every {steps[0]} steps, the same runs as the "
             f"Welch table above (dissertation Figs. 4.3 and 4.5). Per checkpoint: mean over seeds, "
             f"stars from a one-tailed Welch t-test against `{baseline}` at that checkpoint "
             f"(unadjusted: the checkpoints of one run are not independent tests). The figure's range "
             f"follows the means; a wide band (a failed seed) is cut at the axes.", ""]
    if baseline not in acc:
        lines += [f"`{baseline}` has no curve (retrain it with `retrain.curve_every` set): no tests.", ""]
    # One-tailed p per loss and checkpoint, computed once for the table's stars and the win count.
    pvals = ({n: [stats.welch(acc[n][i], acc[baseline][i])["p"] for i in range(len(steps))] for n in others}
             if baseline in acc else {})
    rows = []
    for name in [baseline, *others] if baseline in acc else others:
        cells = []
        for i in idx:
            s = stats.stars(pvals[name][i]) if name in pvals else "ns"
            cells.append(f"{float(acc[name][i].mean()):.4f}" + ("" if s == "ns" else f" {s}"))
        rows.append([f"`{name}`", *cells])
    lines += _table(["loss", *(f"step {steps[i]}" for i in idx)], rows)
    if pvals:
        wins = {n: sum(p < 0.05 for p in ps) for n, ps in pvals.items()}
        lines += ["", "Checkpoints (of " + str(len(steps)) + ") where the loss beats "
                  f"`{baseline}` at p < 0.05: " + ", ".join(f"`{n}` {k}" for n, k in wins.items()) + "."]
    return lines + ["", f"![test accuracy during training]({fig})", ""]
