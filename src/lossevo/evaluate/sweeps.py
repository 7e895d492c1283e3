"""The sweep stages: reduced data, learning-rate sensitivity and Taylor approximations of CE.

Unlike the analyses of :mod:`lossevo.evaluate.analyses` (which reuse the networks retraining
kept), each sweep trains new networks with the experiment's full retraining recipe
(``training``) through :func:`lossevo.training.population.train_many`, on the prepared split
(``data.pt``), and writes ``eval/NAME.json``:

- :func:`data_sweep` (``evaluate.data_sweep``; dissertation §4.2.1, §5.4.3; TaylorGLO paper
  §6.3): every retrained loss (or ``losses``) on stratified fractions of the training split;
- :func:`lr_sweep` (``evaluate.lr_sweep``; dissertation §5.4.5; TaylorGLO paper App. E): the
  baseline over a grid of learning rates, against every other retrained loss at the standard
  rate, to ask whether a learned loss's gain is more than a better effective step size;
- :func:`taylor_ce` (``evaluate.taylor_ce``; dissertation Table 5.2; TaylorGLO paper Table 2):
  order-k Taylor expansions of cross-entropy, trained as ``taylor`` losses.

Seeds: a sweep with ``seeds: N`` uses ``retrain.seed_offset + 0..N-1``, the first N retraining
seeds. A setting equal to the retraining's (fraction 1, lr factor 1) would repeat those runs
(same seeds, data and recipe), so their results are read from ``retrain/LOSS.json`` and only
seeds it lacks are trained. A run that diverges (non-finite loss) is retried with seed + 1000 ×
attempt, up to ``attempts`` tries in all (:func:`train_runs`, one retry helper for both sweeps; the
papers retried failed runs); one that fails every try counts as accuracy 0, as in retraining
(dropping it would flatter the loss), and the data sweep also reports the mean over the runs that
trained with their count (dissertation §5.4.3: "only four out of ten ... trained"). Every loss
is the spec in ``retrain/LOSS.json`` (what was retrained): a searched loss is not searched again
on reduced data or at another learning rate. Tests are the papers'
one-tailed Welch tests vs ``stats.baseline``.

Work is split into jobs (one population per fraction and loss group, per learning rate, per
order) fanned out over ``workers`` processes (:mod:`lossevo.parallel`); a job's trainings do not
depend on how many workers there are, so neither do the results.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from lossevo import data as data_mod
from lossevo import losses, parallel
from lossevo.config import Experiment
from lossevo.data import Split
from lossevo.errors import LossevoError
from lossevo.evaluate import stats
from lossevo.evaluate.analyses import _setup, _summary, _tests, eval_path
from lossevo.io import read_json, write_json
from lossevo.losses import taylor
from lossevo.training import trainer
from lossevo.training.population import loss_group, train_many

#: A diverged sweep run is retried with seed + RETRY_STRIDE × attempt (attempt 0: the seed).
RETRY_STRIDE = 1000
#: What a sweep keeps of a training result.
RESULT_KEYS = ("status", "reason", "test_accuracy")


def _seeds(exp: Experiment, n: int) -> list[int]:
    """The first ``n`` retraining seeds (``retrain.seed_offset`` onwards)."""
    offset = exp.cfg["retrain"]["seed_offset"]
    return list(range(offset, offset + n))


def _record(exp: Experiment, name: str) -> dict:
    """retrain/NAME.json (its spec and test accuracies), with the CLI hint when it is missing."""
    path = exp.retrain_path(name)
    if not path.exists():
        raise LossevoError(f"{path}: not found (run `lossevo retrain -l {name}` first)")
    return read_json(path)


def _accuracy(result: dict) -> float:
    """A run's test accuracy; a diverged run counts as 0, as in the retraining table."""
    return float(result["test_accuracy"] or 0.0) if result["status"] == "ok" else 0.0


def _reused(record: dict, seeds: list[int]) -> dict[int, dict]:
    """The retraining's own results for those of ``seeds`` it ran, keyed by seed."""
    have = dict(zip(record["seeds"], zip(record["status"], record["reason"], record["test_accuracy"])))
    return {s: dict(zip(RESULT_KEYS, have[s])) for s in seeds if s in have}


def _train(exp: Experiment, specs: list[dict], recipe: dict, seeds: list[int],
           fraction: float | None = None, device: torch.device | None = None) -> list[dict]:
    """One job: train ``specs[i]`` with ``seeds[i]`` on the prepared split (or its
    :func:`subset` at ``fraction``); the results' :data:`RESULT_KEYS`, accuracy 0 if diverged."""
    if not specs:
        return []
    device = device or trainer.resolve_device(exp.cfg["device"])
    split = data_mod.load_prepared(exp.data_path)
    if fraction is not None:
        split = subset(split, fraction, exp.cfg["data"]["split_seed"])
    results = train_many(exp.cfg["model"], split.to(device), specs, recipe, seeds, device=device)
    return [{"status": r["status"], "reason": r["reason"], "test_accuracy": _accuracy(r)} for r in results]


def retry_seed(seed: int, attempt: int) -> int:
    """The training seed of ``attempt`` (0 = the first try) of the run with ``seed``."""
    return seed + RETRY_STRIDE * attempt


def train_runs(exp: Experiment, specs: list[dict], recipe: dict, seeds: list[int], attempts: int,
               first: dict[int, dict] | None = None, fraction: float | None = None,
               device: torch.device | None = None) -> list[dict]:
    """Train run i (``specs[i]`` with ``seeds[i]``, on the :func:`subset` at ``fraction`` if given),
    retrying a failed run with :func:`retry_seed` up to ``attempts`` tries in all.

    ``first``: known first-attempt results by run index (the retraining's own), not trained again.
    Each retry round trains all still-failed runs of the job together. Returns per run ``{"seed",
    "attempts": [{"seed", "status", "reason", "test_accuracy"}...], "status", "test_accuracy"}``,
    the last attempt's status and accuracy (0 if every attempt failed).
    """
    first = first or {}
    runs = [{"seed": s, "attempts": [dict(first[i], seed=s)] if i in first else []}
            for i, s in enumerate(seeds)]
    for attempt in range(attempts):
        pending = [i for i, r in enumerate(runs) if len(r["attempts"]) == attempt
                   and (attempt == 0 or r["attempts"][-1]["status"] != "ok")]
        if not pending:
            continue
        tried = [retry_seed(seeds[i], attempt) for i in pending]
        out = _train(exp, [specs[i] for i in pending], recipe, tried, fraction, device)
        for i, s, r in zip(pending, tried, out):
            runs[i]["attempts"].append(dict(r, seed=s))
    for run in runs:
        last = run["attempts"][-1]
        run["status"], run["test_accuracy"] = last["status"], last["test_accuracy"]
    return runs


def _needs_training(n: int, first: dict[int, dict], attempts: int) -> bool:
    """Whether :func:`train_runs` of ``n`` runs with these known first attempts trains anything."""
    return any(i not in first or (attempts > 1 and first[i]["status"] != "ok") for i in range(n))


def train_with_retries(exp: Experiment, spec: dict, recipe: dict, seeds: list[int], attempts: int,
                       first: dict[int, dict] | None = None,
                       device: torch.device | None = None) -> list[dict]:
    """:func:`train_runs` of one ``spec`` over ``seeds``; ``first`` keyed by seed."""
    first = first or {}
    known = {i: first[s] for i, s in enumerate(seeds) if s in first}
    return train_runs(exp, [spec] * len(seeds), recipe, seeds, attempts, known, device=device)


def _map(exp: Experiment, func, jobs: list[tuple], workers: int) -> list:
    """``func(*job)`` for every job, over up to ``workers`` processes, in job order."""
    with parallel.runner(min(workers, len(jobs)), exp.threads) as pool:
        return pool.map(func, jobs)


# --------------------------------------------------------------------------- reduced data


def train_size(n_train: int, fraction: float, n_classes: int) -> int:
    """Training examples kept at ``fraction``: round(fraction × n), at least one per class."""
    return min(n_train, max(int(round(fraction * n_train)), n_classes))


def subset(split: Split, fraction: float, seed: int) -> Split:
    """``split`` with a stratified ``fraction`` of its training set; validation and test unchanged.

    Subsetting the prepared split (rather than reloading with a smaller ``data.train_fraction``)
    keeps every subset inside the experiment's training data and its validation and test sets
    identical, so fraction 1 is exactly the retraining's data. The subset is
    :mod:`lossevo.data`'s stratified splitter with ``seed`` (``data.split_seed``); subsets of
    different fractions are not necessarily nested.
    """
    y = split.y_train.cpu().numpy()
    size = train_size(len(y), fraction, len(np.unique(y)))
    keep = torch.as_tensor(data_mod._stratified_subset(y, size, seed), device=split.y_train.device)
    return dataclasses.replace(split, x_train=split.x_train[keep], y_train=split.y_train[keep])


def _sweep_losses(exp: Experiment, names: list[str] | None) -> list[str]:
    """The losses to sweep, in params order, the baseline always among them."""
    have = exp.loss_names()
    baseline = exp.cfg["stats"]["baseline"]
    unknown = [n for n in names or [] if n not in have]
    if unknown:
        raise LossevoError(f"experiments.{exp.name}.evaluate.data_sweep.losses: {unknown[0]!r} is "
                           f"not a retrained loss (have {have})")
    wanted = set(names or have) | {baseline}
    return [n for n in have if n in wanted]


def data_sweep(exp: Experiment, device: torch.device | None = None, workers: int = 1) -> Path:
    """Test accuracy per training fraction × loss × seed; Welch test vs the baseline per fraction.

    One job per fraction and loss group (the losses that train as one population), so the
    populations are those one ``train_many`` call over all losses would form; a diverged run is
    retried within its job (:func:`train_runs`, ``attempts`` tries in all). Per fraction, the
    summary and tests score a run that failed every try as 0 (the retraining's rule); ``trained``
    and ``summary_trained`` give the count of runs that trained and their mean alone.
    """
    cfg = exp.cfg["evaluate"]["data_sweep"]
    _, split = _setup(exp, torch.device("cpu"))
    names = _sweep_losses(exp, cfg["losses"])
    records = {n: _record(exp, n) for n in names}
    seeds = _seeds(exp, cfg["seeds"])
    baseline = exp.cfg["stats"]["baseline"]
    attempts = cfg["attempts"]
    fractions = sorted(float(f) for f in cfg["fractions"])
    sizes = [len(subset(split, f, exp.cfg["data"]["split_seed"]).y_train) for f in fractions]
    results: dict[tuple[float, str], dict[int, dict]] = {}  # (fraction, loss) -> seed -> run
    jobs, keys = [], []
    for frac, size in zip(fractions, sizes):
        groups: dict[str | None, list[tuple[str, int, dict | None]]] = {}
        for n in names:
            known = _reused(records[n], seeds) if size == len(split.y_train) else {}
            groups.setdefault(loss_group(records[n]["spec"]), []).extend((n, s, known.get(s)) for s in seeds)
        for runs in groups.values():
            first = {i: r for i, (_, _, r) in enumerate(runs) if r is not None}
            job = (exp, [records[n]["spec"] for n, _, _ in runs], exp.cfg["training"],
                   [s for _, s, _ in runs], attempts, first, frac, device)
            key = [(frac, n, s) for n, s, _ in runs]
            if _needs_training(len(runs), first, attempts):
                jobs.append(job)
                keys.append(key)
            else:  # every run known from the retraining: nothing to train
                for (f, n, s), r in zip(key, train_runs(*job)):
                    results.setdefault((f, n), {})[s] = r
    order = sorted(range(len(jobs)), key=lambda j: -len(keys[j]))  # big populations first
    jobs, keys = [jobs[j] for j in order], [keys[j] for j in order]
    for key, out in zip(keys, _map(exp, train_runs, jobs, workers)):
        for (frac, n, s), r in zip(key, out):
            results.setdefault((frac, n), {})[s] = r
    grid = {n: [[results[f, n][s] for s in seeds] for f in fractions] for n in names}
    acc = {n: [[r["test_accuracy"] for r in per] for per in grid[n]] for n in names}
    per_fraction = []
    for i, (frac, size) in enumerate(zip(fractions, sizes)):
        values = {n: acc[n][i] for n in names}
        ok = {n: [r["test_accuracy"] for r in grid[n][i] if r["status"] == "ok"] for n in names}
        per_fraction.append({"fraction": frac, "train_size": size,
                             "reused_retraining": size == len(split.y_train),
                             "summary": {n: _summary(v) for n, v in values.items()},
                             "tests": _tests(values, baseline, "greater"),
                             "trained": {n: len(v) for n, v in ok.items()},
                             "summary_trained": {n: _summary(v) for n, v in ok.items()},
                             "retried_runs": {n: sum(len(r["attempts"]) > 1 for r in grid[n][i])
                                              for n in names}})
    return write_json(eval_path(exp, "data_sweep"), {
        "fractions": fractions, "train_sizes": sizes,
        "full_train_size": len(split.y_train), "split_seed": exp.cfg["data"]["split_seed"],
        "seeds": seeds, "losses": names, "baseline": baseline, "alpha": exp.cfg["stats"]["alpha"],
        "attempts": attempts, "retry_stride": RETRY_STRIDE, "accuracy": acc,
        "status": {n: [[r["status"] for r in per] for per in grid[n]] for n in names},
        "tries": {n: [[len(r["attempts"]) for r in per] for per in grid[n]] for n in names},
        "per_fraction": per_fraction,
    })


# --------------------------------------------------------------------------- learning rates


def lr_sweep(exp: Experiment, device: torch.device | None = None, workers: int = 1) -> Path:
    """The baseline over ``factors`` × training.lr (diverged runs retried; one job per rate),
    beside every other retrained loss at the standard rate (retrain/LOSS.json, not retrained).

    The best learning rate is the one with the highest mean test accuracy. Picked on the test
    set it flatters the baseline, so "beats the baseline at its best lr" is a conservative claim.
    """
    cfg = exp.cfg["evaluate"]["lr_sweep"]
    _, split = _setup(exp, torch.device("cpu"))
    chance = 1.0 / split.n_classes
    baseline = exp.cfg["stats"]["baseline"]
    record = _record(exp, baseline)
    seeds = _seeds(exp, cfg["seeds"])
    lr0 = float(exp.cfg["training"]["lr"])
    factors = sorted(float(f) for f in cfg["factors"])
    rates = {f: round(lr0 * f, 12) for f in factors}  # 0.30000000000000004 -> 0.3
    jobs = [(exp, record["spec"], dict(exp.cfg["training"], lr=rates[f]), seeds, cfg["attempts"],
             _reused(record, seeds) if f == 1.0 else None, device) for f in factors]
    grid = []
    for factor, runs in zip(factors, _map(exp, train_with_retries, jobs, workers)):
        accs = [r["test_accuracy"] for r in runs]
        grid.append({"factor": factor, "lr": rates[factor], "runs": runs,
                     "accuracy": accs, "summary": _summary(accs),
                     "failed_runs": sum(r["status"] != "ok" for r in runs),
                     "failed_attempts": sum(a["status"] != "ok" for r in runs for a in r["attempts"]),
                     "retried_runs": sum(len(r["attempts"]) > 1 for r in runs),
                     # Trained without diverging but not learning: the retry rule does not see it.
                     "near_chance_runs": sum(r["status"] == "ok" and r["test_accuracy"] < 1.5 * chance
                                             for r in runs)})
    best = max(range(len(grid)), key=lambda i: grid[i]["summary"]["mean"])
    best_acc = grid[best]["accuracy"]
    searched = {n for n, e in exp.cfg["retrain"]["losses"].items() if "search" in e}
    others = {}
    for name in exp.loss_names():
        if name == baseline:
            continue
        accs = [float(a) for a in _record(exp, name)["test_accuracy"]]
        others[name] = {"searched": name in searched, "accuracy": accs, "summary": _summary(accs)}
        if len(accs) >= 2:
            t = stats.welch(accs, best_acc, "greater")
            others[name]["vs_best_lr"] = {**t, "sig": stats.stars(t["p"]),
                                          "hedges_g": stats.hedges_g(accs, best_acc)}
    return write_json(eval_path(exp, "lr_sweep"), {
        "baseline": baseline, "lr": lr0, "seeds": seeds, "attempts": cfg["attempts"],
        "retry_stride": RETRY_STRIDE, "grid": grid, "best": {"factor": grid[best]["factor"],
                                                            "lr": grid[best]["lr"],
                                                            "summary": grid[best]["summary"]},
        "alpha": exp.cfg["stats"]["alpha"], "n_classes": split.n_classes, "others": others,
    })


# --------------------------------------------------------------------------- Taylor CE


def xlogy_partial(i: int, j: int, x: float, y: float) -> float:
    """∂x^i ∂y^j of f(x, y) = x log y at (x, y), j >= 1, in closed form.

    ∂y^j log y = (−1)^(j−1) (j−1)! / y^j, so ∂y^j f = x·that, ∂x ∂y^j f = that, and every
    higher x-derivative is 0 (f is linear in x).
    """
    if j < 1:
        raise ValueError("the trimmed expansion only keeps terms with a y-derivative (j >= 1)")
    dy = (-1) ** (j - 1) * math.factorial(j - 1) / y**j
    return {0: x * dy, 1: dy}.get(i, 0.0)


def ce_theta(order: int, centre: tuple[float, float] | list[float] = (0.5, 0.5)) -> list[float]:
    """θ (paper convention) of the trimmed order-``order`` Taylor expansion of x log y at
    ``centre``: [a_x, a_y, then ∂^α f(a) per kept multi-index α in layout order]; the loss
    divides each by α!, so −Σ_classes of the polynomial approximates cross-entropy."""
    ax, ay = (float(c) for c in centre)
    if ay <= 0:
        raise LossevoError(f"taylor_ce centre y must be > 0 (log y), got {ay}")
    lay = taylor.layout(order, ("x", "y"))
    return [ax, ay] + [xlogy_partial(i, j, ax, ay) for i, j in lay.exponents]


def ce_spec(order: int, centre: tuple[float, float] | list[float] = (0.5, 0.5)) -> dict:
    """The ``taylor`` loss spec approximating cross-entropy (sum over classes, as CE)."""
    return losses.validate({"kind": "taylor", "order": order, "theta": ce_theta(order, centre),
                            "convention": "paper", "variables": ["x", "y"], "class_reduction": "sum"})


def taylor_ce(exp: Experiment, device: torch.device | None = None, workers: int = 1) -> Path:
    """Each order's CE approximation trained over the seeds (one job per order); Welch tests vs
    the baseline's retraining results, both directions (the papers find low orders train worse)."""
    cfg = exp.cfg["evaluate"]["taylor_ce"]
    _, split = _setup(exp, torch.device("cpu"))
    baseline = exp.cfg["stats"]["baseline"]
    base = _record(exp, baseline)
    seeds = _seeds(exp, cfg["seeds"])
    orders = sorted(int(k) for k in cfg["orders"])
    specs = {f"k{k}": ce_spec(k, cfg["centre"]) for k in orders}
    jobs = [(exp, [spec] * len(seeds), exp.cfg["training"], seeds, None, device) for spec in specs.values()]
    out = dict(zip(specs, _map(exp, _train, jobs, workers)))
    acc = {n: [r["test_accuracy"] for r in rs] for n, rs in out.items()}
    status = {n: [r["status"] for r in rs] for n, rs in out.items()}
    values = {baseline: [float(a) for a in base["test_accuracy"]], **acc}
    return write_json(eval_path(exp, "taylor_ce"), {
        "orders": orders, "centre": [float(c) for c in cfg["centre"]], "seeds": seeds,
        "baseline": baseline, "baseline_spec": base["spec"], "baseline_accuracy": values[baseline],
        "alpha": exp.cfg["stats"]["alpha"], "n_classes": split.n_classes,
        "specs": specs, "accuracy": acc, "status": status,
        "summary": {n: _summary(v) for n, v in values.items()},
        "tests": {"greater": _tests(values, baseline, "greater"), "less": _tests(values, baseline, "less")},
    })
