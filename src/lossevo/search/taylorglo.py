"""TaylorGLO: CMA-ES over trimmed Taylor-polynomial losses (ICLR 2021 paper; dissertation ch. 5).

CMA-ES (pycma) starts at θ = 0 with σ = 1.2 and minimises 1 − validation accuracy after partial
training. Positive recombination weights only by default (``cma_active: false``), the paper's
(μ/μ_w, λ) variant. pycma gets its own ``randn`` from a seeded NumPy Generator and ``seed=nan``,
so it never reseeds NumPy's global generator (pycma issue 221) and its state pickles with it.

The search is split into functions that Snakemake runs as separate jobs and that :func:`run`
calls in a loop: :func:`step` (tell generation g−1, ask g), :func:`evaluate_shard`, :func:`finalize`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from lossevo import data as data_mod
from lossevo import parallel
from lossevo.config import Experiment
from lossevo.errors import LossevoError
from lossevo.io import read_json, write_bytes, write_json, write_text
from lossevo.losses import taylor
from lossevo.search import evaluate, state
from lossevo.training import trainer


class SeededRandn:
    """``randn(*shape)`` for pycma from a private, picklable NumPy Generator."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


def dimension(scfg: dict) -> int:
    return taylor.n_params(scfg["order"], scfg["variables"])


def spec_from_theta(scfg: dict, theta: list[float]) -> dict:
    """The loss spec of a candidate; θ is in the search's convention (paper by default)."""
    return {
        "kind": "taylor", "order": scfg["order"], "variables": list(scfg["variables"]),
        "convention": scfg["convention"], "class_reduction": scfg["class_reduction"],
        "theta": [float(t) for t in theta],
    }


def new_optimizer(scfg: dict):
    """A fresh pycma strategy at the origin with the search's σ, λ and seed."""
    import cma

    opts = {
        "popsize": scfg["popsize"], "seed": math.nan, "randn": SeededRandn(scfg["seed"]),
        "CMA_active": scfg["cma_active"], "CMA_mirrors": 0, "verbose": -9, "verb_log": 0,
        "verb_disp": 0, "signals_filename": "", "maxiter": scfg["generations"] + 1,
    }
    return cma.CMAEvolutionStrategy(np.zeros(dimension(scfg)), scfg["sigma"], opts)


@functools.cache
def code_digest() -> str:
    """Hash of the library code a search's numbers depend on (everything but the report)."""
    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if not rel.startswith("report/"):
            h.update(rel.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(exp: Experiment, name: str) -> dict:
    """Everything a search's results depend on (settings and code); a mismatch means stale state."""
    cfg = exp.cfg
    keys = {"search": cfg["search"][name], "data": cfg["data"], "model": cfg["model"],
            "training": cfg["training"]}
    digest = hashlib.sha256(json.dumps([keys, code_digest()], sort_keys=True).encode()).hexdigest()[:16]
    return {"experiment": exp.name, "search": name, "digest": digest, "settings": keys,
            "code": code_digest()}


def _check_fingerprint(exp: Experiment, name: str, root: Path) -> None:
    path = root / "search.json"
    if not path.exists() or read_json(path)["digest"] != fingerprint(exp, name)["digest"]:
        raise LossevoError(f"{root}: search state is missing or was made with other settings or code "
                           f"(run generation 0's step first)")


def step(exp: Experiment, name: str, g: int) -> Path:
    """Tell the optimizer generation g−1's fitnesses (if g > 0) and ask generation g."""
    scfg = exp.search_cfg(name)
    root = exp.search_dir(name)
    if not 0 <= g < scfg["generations"]:
        raise LossevoError(f"generation {g} is outside 0..{scfg['generations'] - 1}")
    if g == 0:
        fp = fingerprint(exp, name)
        old = root / "search.json"
        if root.exists() and (not old.exists() or read_json(old)["digest"] != fp["digest"]):
            shutil.rmtree(root)  # stale state (other settings or code): start afresh
        write_json(root / "search.json", fp)
        es = new_optimizer(scfg)
    else:
        _check_fingerprint(exp, name, root)
        es = _tell(exp, name, g - 1)
    thetas = es.ask()
    write_bytes(state.optimizer_path(root, g), pickle.dumps(es))
    # The invariant needs the number of classes; read the prepared data only then (it can be large).
    n_classes = data_mod.load_prepared(exp.data_path).n_classes if scfg["invariant"] else None
    cands = []
    for i, th in enumerate(thetas):
        ok = taylor.invariant_holds(list(th), n_classes, scfg["convention"]) if scfg["invariant"] else True
        cands.append({"index": i, "theta": [float(t) for t in th], "invariant_ok": ok})
    return write_json(state.candidates_path(root, g), {
        "generation": g, "candidates": cands,
        "train_seeds": [evaluate.attempt_seed(scfg["seed"], g, a) for a in range(scfg["attempts"])],
    })


def _tell(exp: Experiment, name: str, g: int):
    """Load generation g's optimizer, tell it the results, write g's summary; return it."""
    scfg = exp.search_cfg(name)
    root = exp.search_dir(name)
    es = pickle.loads(state.optimizer_path(root, g).read_bytes())
    cands = read_json(state.candidates_path(root, g))["candidates"]
    results = state.load_results(root, g, scfg["shards"])
    es.tell([np.asarray(c["theta"]) for c in cands], [1.0 - r["fitness"] for r in results])
    write_json(state.summary_path(root, g), summarize(g, cands, results, es))
    return es


def summarize(g: int, cands: list[dict], results: list[dict], es) -> dict:
    """Per-generation statistics for the progress table and the report."""
    fit = np.array([r["fitness"] for r in results])
    trained = [r for r in results if r["status"] != "rejected"]
    tfit = np.array([r["fitness"] for r in trained]) if trained else np.array([np.nan])
    best = int(np.argmax(fit))
    return {
        "generation": g,
        "best_fitness": float(fit[best]),
        "best_index": best,
        "best_theta": cands[best]["theta"],
        "mean_fitness": float(np.mean(tfit)),
        "std_fitness": float(np.std(tfit)),
        "rejected": sum(r["status"] == "rejected" for r in results),
        "failed": sum(r["status"] in ("nan", "failed") for r in results),
        "retried": sum(len(r["attempts"]) > 1 for r in results),
        "evaluated": len(trained),
        "trainings": sum(len(r["attempts"]) for r in results),
        "sigma": float(es.sigma),
        "mean_theta": [float(v) for v in es.mean],
    }


def evaluate_shard(exp: Experiment, name: str, g: int, s: int, device=None) -> Path:
    """Evaluate shard ``s`` of generation ``g`` and write its results atomically."""
    scfg = exp.search_cfg(name)
    root = exp.search_dir(name)
    _check_fingerprint(exp, name, root)
    cpath = state.candidates_path(root, g)
    if not cpath.exists():
        raise LossevoError(f"{cpath}: candidates missing (run the step for generation {g} first)")
    gen = read_json(cpath)
    device = device or trainer.resolve_device(exp.cfg["device"])
    split = data_mod.load_prepared(exp.data_path).to(device)
    idx = state.shard_indices(scfg["popsize"], scfg["shards"], s)
    cands = [gen["candidates"][i] for i in idx]
    todo = [(c["index"], spec_from_theta(scfg, c["theta"])) for c in cands if c["invariant_ok"]]
    started, t0 = time.time(), time.perf_counter()
    done = evaluate.evaluate(todo, split, exp.cfg["model"], exp.cfg["training"], scfg["partial_steps"],
                             gen["train_seeds"], scfg["abort"], device)
    done += [evaluate.rejected(c["index"], "violates the TaylorGLO invariant")
             for c in cands if not c["invariant_ok"]]
    return write_json(state.shard_path(root, g, s), {
        "generation": g, "shard": s, "device": str(device),
        # Wall-clock span of the training (lets a user see shards running side by side).
        "started": started, "seconds": time.perf_counter() - t0,
        "results": sorted(done, key=lambda r: r["index"]),
    })


def progress_table(root: Path, generations: int) -> str:
    """CSV: one row per generation with best/mean/std fitness, rejections, failures, evaluations."""
    cols = ["generation", "best_fitness", "mean_fitness", "std_fitness", "rejected", "failed",
            "retried", "evaluated", "evaluations_so_far", "trainings_so_far", "sigma"]
    rows, evals, trainings = [",".join(cols)], 0, 0
    for g in range(generations):
        s = read_json(state.summary_path(root, g))
        evals += s["evaluated"]
        trainings += s["trainings"]
        s = dict(s, evaluations_so_far=evals, trainings_so_far=trainings)
        rows.append(",".join(f"{s[c]:.6g}" if isinstance(s[c], float) else str(s[c]) for c in cols))
    return "\n".join(rows) + "\n"


def finalize(exp: Experiment, name: str, device=None) -> dict:
    """Tell the last generation, write progress.csv, run the final selection, write best.json."""
    scfg = exp.search_cfg(name)
    root = exp.search_dir(name)
    _check_fingerprint(exp, name, root)
    last = scfg["generations"] - 1
    _tell(exp, name, last)
    write_text(root / "progress.csv", progress_table(root, scfg["generations"]))
    pool = []
    for g in range(scfg["generations"]):
        cands = read_json(state.candidates_path(root, g))["candidates"]
        for r in state.load_results(root, g, scfg["shards"]):
            if r["status"] == "ok":
                pool.append({"generation": g, "index": r["index"], "fitness": r["fitness"],
                             "theta": cands[r["index"]]["theta"]})
    if not pool:
        raise LossevoError(f"{root}: no candidate trained successfully; nothing to select")
    # Best partial fitness first; ties go to the earliest candidate (stable sort).
    pool.sort(key=lambda c: -c["fitness"])
    paper = pool[0]
    selection = final_selection(exp, name, pool, device)
    chosen = selection["chosen"] if selection else paper
    best = {
        "spec": spec_from_theta(scfg, chosen["theta"]),
        "picked_by": "final_selection" if selection else "partial_fitness",
        "paper_pick": dict(paper, spec=spec_from_theta(scfg, paper["theta"])),
        "final_selection": selection,
        "theta_code_convention": taylor.convert(
            chosen["theta"], taylor.layout(scfg["order"], scfg["variables"]), scfg["convention"], "code"),
    }
    write_json(root / "best.json", best)
    return best


def final_selection(exp: Experiment, name: str, pool: list[dict], device=None) -> dict | None:
    """Retrain the top-k partial-fitness candidates at full length; pick by mean validation accuracy.

    The papers keep the best partial-training candidate; a short-run winner can collapse at full
    length (cpu-calibration.md, run D), so this check is on by default (``top_k: 0`` turns it off).
    Only validation accuracy is used: the test set stays untouched until retraining.
    """
    scfg = exp.search_cfg(name)
    fs = scfg["final_selection"]
    if fs["top_k"] == 0:
        return None
    device = device or trainer.resolve_device(exp.cfg["device"])
    split = data_mod.load_prepared(exp.data_path).to(device)
    steps = fs.get("steps") or exp.cfg["training"]["steps"]
    seeds = [evaluate.attempt_seed(scfg["seed"], 10**6, k) for k in range(fs["seeds"])]
    top = pool[: fs["top_k"]]
    runs = evaluate.repeated(
        [(i, spec_from_theta(scfg, c["theta"])) for i, c in enumerate(top)], split, exp.cfg["model"],
        exp.cfg["training"], steps, seeds, device,
    )
    rows = []
    for c, accs in zip(top, runs):
        finite = [a for a in accs if a is not None]
        rows.append(dict(c, full_val_accuracies=accs,
                         full_val_mean=float(np.mean(finite)) if len(finite) == len(accs) else 0.0))
    chosen = max(rows, key=lambda r: r["full_val_mean"])  # first of equals: best partial fitness
    return {"steps": steps, "seeds": seeds, "candidates": rows, "chosen": chosen}


def run(exp: Experiment, name: str, workers: int = 1, log=sys.stderr) -> dict:
    """Single-process driver: the same step/evaluate/finalize functions in a resumable loop.

    Whatever is complete on disk is kept (a killed run resumes), and the result is the same as
    an uninterrupted run with the same seed. ``workers`` > 1 evaluates shards in parallel
    processes with ``exp.threads`` torch threads each.
    """
    scfg = exp.search_cfg(name)
    root = exp.search_dir(name)
    best_path = root / "best.json"
    fp = fingerprint(exp, name)
    fresh = not (root / "search.json").exists() or read_json(root / "search.json")["digest"] != fp["digest"]
    if not fresh and best_path.exists():
        print(f"[{name}] complete: {best_path}", file=log)
        return read_json(best_path)
    t0 = time.perf_counter()
    with parallel.runner(min(workers, scfg["shards"]), exp.threads) as pool:
        for g in range(scfg["generations"]):
            if fresh or not state.candidates_path(root, g).exists():
                step(exp, name, g)
                fresh = False
            pending = [s for s in range(scfg["shards"]) if not state.shard_path(root, g, s).exists()]
            pool.map(evaluate_shard, [(exp, name, g, s) for s in pending])
            if g > 0:
                s = read_json(state.summary_path(root, g - 1))
                print(f"[{name}] gen {g - 1:3d}: best {s['best_fitness']:.4f} mean {s['mean_fitness']:.4f} "
                      f"rejected {s['rejected']} failed {s['failed']} ({time.perf_counter() - t0:.0f}s)",
                      file=log, flush=True)
    best = finalize(exp, name)
    s = read_json(state.summary_path(root, scfg["generations"] - 1))
    print(f"[{name}] gen {scfg['generations'] - 1:3d}: best {s['best_fitness']:.4f} "
          f"mean {s['mean_fitness']:.4f}; picked {best['picked_by']} "
          f"({time.perf_counter() - t0:.0f}s)", file=log, flush=True)
    return best
