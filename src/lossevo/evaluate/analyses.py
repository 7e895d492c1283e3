"""The evaluation stages: FGSM robustness, accuracy basins and weight statistics of the retrained
networks (retrain/LOSS.pt), each written to ``eval/NAME.json`` with Welch tests across seeds.

Every analysis reads the checkpoints retraining kept (nothing is retrained), uses the test set,
and tests each loss against the baseline with the papers' one-tailed Welch test, in the direction
that means "better": higher accuracy under attack, wider basins, a smaller accuracy drop.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lossevo import checkpoint, losses
from lossevo import data as data_mod
from lossevo.config import Experiment
from lossevo.evaluate import adversarial, basins, stats, weights
from lossevo.io import write_json
from lossevo.training import trainer


def eval_path(exp: Experiment, name: str) -> Path:
    return exp.root / "eval" / f"{name}.json"


def _networks(exp: Experiment, device):
    """(loss name, checkpoint, [network or None per seed]) for every retrained loss."""
    digest = checkpoint.file_digest(exp.data_path)
    for name in exp.loss_names():
        ck = checkpoint.load(exp.model_path(name), digest)
        yield name, ck, [checkpoint.network(ck, i, device) for i in range(len(ck["seeds"]))]


def _tests(values: dict[str, list[float]], baseline: str, alternative: str) -> dict[str, dict]:
    """Welch test of every loss against the baseline (``alternative``: which side is better)."""
    out = {}
    for name, v in values.items():
        if name == baseline or len(v) < 2 or len(values[baseline]) < 2:
            continue
        finite = [x for x in v if math.isfinite(x)]
        base = [x for x in values[baseline] if math.isfinite(x)]
        if len(finite) < 2 or len(base) < 2:
            continue
        t = stats.welch(finite, base, alternative)
        out[name] = {**t, "sig": stats.stars(t["p"]), "hedges_g": stats.hedges_g(finite, base)}
    return out


def _summary(values: list[float]) -> dict:
    """Mean and ddof-1 std of the finite values (exact for a constant sample: stats.moments)."""
    n, mean, var = stats.moments([x for x in values if math.isfinite(x)])
    return {"mean": mean if n else math.nan, "std": math.sqrt(var) if n > 1 else math.nan}


def _setup(exp: Experiment, device):
    device = device or trainer.resolve_device(exp.cfg["device"])
    split = data_mod.load_prepared(exp.data_path).to(device)
    return device, split


def fgsm(exp: Experiment, device=None) -> Path:
    """Test accuracy under FGSM for every ε (in ``epsilon_space`` units), loss and seed; Welch test
    vs the baseline at each ε."""
    cfg = exp.cfg["evaluate"]["fgsm"]
    device, split = _setup(exp, device)
    mean, std = (t.to(device) for t in adversarial.pixel_stats(exp.cfg["data"]))
    eps = [float(e) for e in cfg["epsilons"]]
    acc: dict[str, list[list[float]]] = {}
    for name, ck, nets in _networks(exp, device):
        attack = losses.build(ck["spec"]).to(device) if cfg["attack_loss"] == "training" else None
        if attack is not None and getattr(attack, "uses_progress", False):
            attack.progress = 1.0  # the end of training, where the network was taken
        # A diverged run counts as accuracy 0 at every ε, as in the retraining table.
        acc[name] = [adversarial.fgsm_accuracy(n, split.x_test, split.y_test, eps, mean, std, attack,
                                               epsilon_space=cfg["epsilon_space"])
                     if n is not None else [0.0] * len(eps) for n in nets]
    baseline = exp.cfg["stats"]["baseline"]
    per_eps = []
    for k, e in enumerate(eps):
        values = {name: [seed[k] for seed in a] for name, a in acc.items()}
        per_eps.append({"epsilon": e, "summary": {n: _summary(v) for n, v in values.items()},
                        "tests": _tests(values, baseline, "greater")})
    return write_json(eval_path(exp, "fgsm"), {
        "epsilons": eps, "attack_loss": cfg["attack_loss"], "baseline": baseline,
        "epsilon_space": cfg["epsilon_space"], "accuracy": acc, "per_epsilon": per_eps,
    })


def basin_curves(exp: Experiment, device=None) -> Path:
    """1-D and 2-D accuracy basins along filter-normalised directions; width and drop per seed.

    Seed i's directions are drawn once (the same raw draws for every loss of that seed) and
    filter-normalised to each network's own weights.
    """
    cfg = exp.cfg["evaluate"]["basins"]
    device, split = _setup(exp, device)
    a1 = np.linspace(-1.0, 1.0, cfg["points_1d"]).tolist()
    a2 = np.linspace(-1.0, 1.0, cfg["points_2d"]).tolist()
    out: dict[str, dict] = {}
    for name, ck, nets in _networks(exp, device):
        rows = {"curves": [], "width": [], "drop": [], "grid_2d": None, "centre": []}
        for i, net in enumerate(nets):
            if net is None:
                rows["curves"].append(None)
                for key in ("width", "drop", "centre"):
                    rows[key].append(math.nan)
                continue
            dirs = basins.directions_for_seed(net, ck["seeds"][i], cfg["directions"])
            curves = [basins.basin_1d(net, d, split.x_test, split.y_test, a1) for d in dirs]
            rows["curves"].append(curves)
            rows["centre"].append(trainer.accuracy(net, split.x_test, split.y_test))
            rows["width"].append(float(np.mean([basins.width(a1, c, cfg["fraction"]) for c in curves])))
            rows["drop"].append(float(np.mean([basins.drop_at(a1, c, cfg["radius"]) for c in curves])))
            if rows["grid_2d"] is None and len(dirs) >= 2:  # the first trained seed, for the figure
                rows["grid_2d"] = {"seed": ck["seeds"][i],
                                   "accuracy": basins.basin_2d(net, dirs[0], dirs[1], split.x_test,
                                                               split.y_test, a2)}
        out[name] = rows
    baseline = exp.cfg["stats"]["baseline"]
    widths = {n: r["width"] for n, r in out.items()}
    drops = {n: r["drop"] for n, r in out.items()}
    return write_json(eval_path(exp, "basins"), {
        "alphas_1d": a1, "alphas_2d": a2, "fraction": cfg["fraction"], "radius": cfg["radius"],
        "directions": cfg["directions"], "baseline": baseline, "losses": out,
        "summary": {n: {"width": _summary(widths[n]), "drop": _summary(drops[n])} for n in out},
        "tests": {"width": _tests(widths, baseline, "greater"), "drop": _tests(drops, baseline, "less")},
    })


def weight_statistics(exp: Experiment, device=None) -> Path:
    """L2 norm, mean, histogram (shared bins across losses) and Laplace-vs-Gaussian fit per seed,
    over ``evaluate.weights.parameters`` (every trainable parameter by default)."""
    cfg = exp.cfg["evaluate"]["weights"]
    which = cfg["parameters"]
    device, _ = _setup(exp, device)
    nets = {name: ns for name, _, ns in _networks(exp, device)}
    top = max((float(weights.weight_vector(n, which).abs().max()) for ns in nets.values() for n in ns
               if n is not None), default=1.0)
    out = {}
    for name, ns in nets.items():
        per_seed = [weights.weight_stats(n, cfg["bins"], (-top, top), which) if n is not None else None
                    for n in ns]
        ok = [s for s in per_seed if s is not None]
        out[name] = {
            "per_seed": per_seed,
            "l2_norm": _summary([s["l2_norm"] for s in ok]),
            "mean": _summary([s["mean"] for s in ok]),
            "laplace_better": sum(s["better_fit"] == "laplace" for s in ok),
            "fitted": len(ok),
            "hist_counts": np.sum([s["hist_counts"] for s in ok], axis=0).tolist() if ok else [],
        }
    edges = torch.linspace(-top, top, cfg["bins"] + 1).tolist()
    return write_json(eval_path(exp, "weights"), {"bins": cfg["bins"], "parameters": which,
                                                  "range": [-top, top],
                                                  "hist_edges": edges, "losses": out})
