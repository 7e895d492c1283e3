"""The one search engine: generations on disk, resume, shard fan-out, retries, final selection.

A search method is a small picklable ask/tell object in pycma's spirit (see :mod:`.methods`):
``Method(settings)`` creates its state, ``ask(g, ctx)`` proposes generation g's candidates (each a
JSON genome, its loss spec, and optionally a fitness known without training: ``rejected`` with a
reason, or ``cached``), ``tell(g, candidates, fitnesses)`` takes the results. Everything else is
here, identical for every method: the fingerprint that discards stale state, the per-generation
files of :mod:`.state` (all written atomically, so SIGKILL at any moment is safe), shard
evaluation through ``train_many`` with the papers' retries, deduplication of equal candidates
within a generation, the progress table, the final selection and ``best.json``.

Snakemake runs :func:`step`, :func:`evaluate_shard` and :func:`finalize` as separate jobs; the
single-process driver :func:`run` calls the same functions in a loop.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from lossevo import data as data_mod
from lossevo import parallel
from lossevo.config import Experiment
from lossevo.errors import LossevoError
from lossevo.io import read_json, write_json, write_text
from lossevo.search import evaluate, methods, state
from lossevo.training import trainer

#: Statuses of candidates that were not trained in their generation.
UNTRAINED = ("rejected", "cached", "duplicate")
#: progress.csv columns every method has; a method appends its own (``Method.columns``).
BASE_COLUMNS = ("generation", "best_fitness", "mean_fitness", "std_fitness", "rejected", "failed",
                "retried", "evaluated", "evaluations_so_far", "trainings_so_far")


#: The library code a search's numbers depend on (the search stage's code deps in dvc.yaml).
SEARCH_CODE = ("search/", "losses/", "training/", "models/", "data/", "determinism.py")


@functools.cache
def code_digest() -> str:
    """Hash of the library code a search's numbers depend on (:data:`SEARCH_CODE`)."""
    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if rel.startswith(SEARCH_CODE):
            h.update(rel.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(exp: Experiment, name: str) -> dict:
    """Everything a search's results depend on (settings and code); a mismatch means stale state."""
    cfg = exp.cfg
    keys = {"search": cfg["search"][name], "data": cfg["data"], "model": cfg["model"],
            "training": cfg["training"], "device": cfg["device"], "numerics": exp.numerics}
    digest = hashlib.sha256(json.dumps([keys, code_digest()], sort_keys=True).encode()).hexdigest()[:16]
    return {"experiment": exp.name, "search": name, "digest": digest, "settings": keys,
            "code": code_digest()}


def generations(scfg: dict) -> int:
    """Total generations of a search (all phases of its method)."""
    return methods.get(scfg["method"]).generations(scfg)


class Context:
    """What a method may need from the experiment when it asks (read lazily: data can be large)."""

    def __init__(self, exp: Experiment):
        self.exp = exp

    @functools.cached_property
    def n_classes(self) -> int:
        return data_mod.load_prepared(self.exp.data_path).n_classes


def _stored_digest(root: Path) -> str | None:
    """The fingerprint digest a search directory was made with (None: missing or unreadable)."""
    try:
        return state.read_state(root / "search.json").get("digest")
    except state.StateError:
        return None


def _check_fingerprint(exp: Experiment, name: str, root: Path) -> None:
    if _stored_digest(root) != fingerprint(exp, name)["digest"]:
        raise LossevoError(f"{root}: search state is missing or was made with other settings or code "
                           f"(run generation 0's step first)")


def step(exp: Experiment, name: str, g: int) -> Path:
    """Tell the method generation g−1's fitnesses (if g > 0) and ask generation g."""
    scfg = exp.search_cfg(name)
    root = exp.search_dir(name)
    if not 0 <= g < generations(scfg):
        raise LossevoError(f"generation {g} is outside 0..{generations(scfg) - 1}")
    with state.search_lock(root):
        if g == 0:
            fp = fingerprint(exp, name)
            if root.exists() and _stored_digest(root) != fp["digest"]:
                shutil.rmtree(root)  # stale or unreadable state (other settings or code): start afresh
            state.write_state(root / "search.json", fp)
            method = methods.get(scfg["method"])(scfg)
        else:
            _check_fingerprint(exp, name, root)
            method = _tell(exp, name, g - 1)
        asked = method.ask(g, Context(exp))
        state.write_pickle(state.optimizer_path(root, g), method)
        return state.write_state(state.candidates_path(root, g), {
            "generation": g, "candidates": _dedupe(asked),
            "train_seeds": [evaluate.attempt_seed(scfg["seed"], g, a) for a in range(scfg["attempts"])],
        })


def _dedupe(asked: list[dict]) -> list[dict]:
    """Index the candidates; a trainable candidate whose ``key`` an earlier one has trains once."""
    first: dict[str, int] = {}
    out = []
    for i, c in enumerate(asked):
        c = dict(c, index=i)
        key = c.get("key")
        if key is not None and "status" not in c:
            if key in first:
                c.update(status="duplicate", same_as=first[key])
            else:
                first[key] = i
        out.append(c)
    return out


def _tell(exp: Experiment, name: str, g: int):
    """Load generation g's method, tell it the results, write g's summary; return the method."""
    root = exp.search_dir(name)
    method = state.read_pickle(state.optimizer_path(root, g))
    cands = state.read_candidates(root, g)["candidates"]
    results = state.load_results(root, g, exp.search_cfg(name)["shards"])
    method.tell(g, cands, [r["fitness"] for r in results])
    state.write_state(state.summary_path(root, g), summarize(g, cands, results, method))
    return method


def summarize(g: int, cands: list[dict], results: list[dict], method) -> dict:
    """Per-generation statistics for the progress table and the report."""
    fit = np.array([r["fitness"] for r in results])
    scored = [r for r in results if r["status"] != "rejected"]
    sfit = np.array([r["fitness"] for r in scored]) if scored else np.array([np.nan])
    best = int(np.argmax(fit))
    counts = {s: sum(r["status"] == s for r in results) for s in UNTRAINED}
    return {
        "generation": g,
        "best_fitness": float(fit[best]),
        "best_index": best,
        "best_genome": cands[best]["genome"],
        "best_spec": cands[best]["spec"],
        "mean_fitness": float(np.mean(sfit)),
        "std_fitness": float(np.std(sfit)),
        "rejected": counts["rejected"],
        "cached": counts["cached"],
        "duplicate": counts["duplicate"],
        "failed": sum(r["status"] in ("nan", "failed") for r in results),
        "retried": sum(len(r["attempts"]) > 1 for r in results),
        "evaluated": sum(r["status"] not in UNTRAINED for r in results),
        "trainings": sum(len(r["attempts"]) for r in results),
        **method.summary(),
    }


def evaluate_shard(exp: Experiment, name: str, g: int, s: int, device=None) -> Path:
    """Evaluate shard ``s`` of generation ``g`` and write its results atomically."""
    scfg = exp.search_cfg(name)
    root = exp.search_dir(name)
    _check_fingerprint(exp, name, root)
    cpath = state.candidates_path(root, g)
    if not cpath.exists():
        raise LossevoError(f"{cpath}: candidates missing (run the step for generation {g} first)")
    gen = state.read_candidates(root, g)
    device = device or trainer.resolve_device(exp.cfg["device"])
    cands = [gen["candidates"][i] for i in state.shard_indices(len(gen["candidates"]), scfg["shards"], s)]
    todo = [(c["index"], c["spec"]) for c in cands if "status" not in c]
    started, t0 = time.time(), time.perf_counter()
    done = []
    if todo:
        split = data_mod.load_prepared(exp.data_path).to(device)
        done = evaluate.evaluate(todo, split, exp.cfg["model"], exp.cfg["training"], scfg["partial_steps"],
                                 gen["train_seeds"], scfg["abort"], device,
                                 fitness_settings(exp, name))
    done += [evaluate.untrained(c) for c in cands if "status" in c]
    # Wall-clock span of the training (lets a user see shards running side by side): a log,
    # not state, so that the search directory hashes the same on a rerun.
    write_json(timing_path(exp, name, g, s), {"started": started, "seconds": time.perf_counter() - t0,
                                              "device": str(device)})
    return state.write_state(state.shard_path(root, g, s), {
        "generation": g, "shard": s, "device": str(device),
        "results": sorted(done, key=lambda r: r["index"]),
    })


def fitness_settings(exp: Experiment, name: str) -> dict:
    """A search's fitness settings with what scoring needs from the experiment (its data settings)."""
    return dict(exp.search_cfg(name)["fitness"], data=exp.cfg["data"])


def timing_path(exp: Experiment, name: str, g: int, s: int) -> Path:
    """Where a shard's wall-clock span goes (under the experiment's untracked logs)."""
    return exp.root / "logs" / "search" / name / f"timing_{g:03d}_{s:02d}.json"


def progress_table(root: Path, scfg: dict) -> str:
    """CSV: one row per generation with best/mean/std fitness, rejections, failures, evaluations."""
    cols = list(BASE_COLUMNS) + list(methods.get(scfg["method"]).columns)
    rows, evals, trainings = [",".join(cols)], 0, 0
    for g in range(generations(scfg)):
        s = state.read_summary(root, g)
        evals += s["evaluated"]
        trainings += s["trainings"]
        s = dict(s, evaluations_so_far=evals, trainings_so_far=trainings)
        rows.append(",".join(f"{s[c]:.6g}" if isinstance(s[c], float) else str(s[c]) for c in cols))
    return "\n".join(rows) + "\n"


def selection_pool(exp: Experiment, name: str) -> list[dict]:
    """Every successfully trained candidate the method lets compete, best partial fitness first."""
    scfg = exp.search_cfg(name)
    root = exp.search_dir(name)
    method = methods.get(scfg["method"])
    pool = []
    for g in range(generations(scfg)):
        if not method.selectable(scfg, g):
            continue
        cands = state.read_candidates(root, g)["candidates"]
        for r in state.load_results(root, g, scfg["shards"]):
            if r["status"] == "ok":
                c = cands[r["index"]]
                pool.append({"generation": g, "index": r["index"], "fitness": r["fitness"],
                             "genome": c["genome"], "spec": c["spec"]})
    # Best partial fitness first; ties go to the earliest candidate (stable sort).
    pool.sort(key=lambda c: -c["fitness"])
    return pool


def finalize(exp: Experiment, name: str, device=None) -> dict:
    """Tell the last generation, write progress.csv, run the final selection, write best.json."""
    exp.search_cfg(name)  # an unknown search name is a one-line error
    root = exp.search_dir(name)
    with state.search_lock(root):
        _check_fingerprint(exp, name, root)
        return _finalize(exp, name, device)


def _finalize(exp: Experiment, name: str, device=None) -> dict:
    scfg = exp.search_cfg(name)
    root = exp.search_dir(name)
    method = _tell(exp, name, generations(scfg) - 1)
    write_text(root / "progress.csv", progress_table(root, scfg))
    pool = selection_pool(exp, name)
    if not pool:
        raise LossevoError(f"{root}: no candidate trained successfully; nothing to select")
    paper = pool[0]
    selection = final_selection(exp, name, pool, device)
    chosen = selection["chosen"] if selection else paper
    best = {
        "spec": chosen["spec"],
        "method": scfg["method"],
        "picked_by": "final_selection" if selection else "partial_fitness",
        "paper_pick": paper,
        "final_selection": selection,
        **method.describe_best(chosen),
    }
    write_json(root / "best.json", best)
    from lossevo import environment  # what produced this directory (no timings, dates or hosts)

    write_json(root / environment.FILE, environment.record(device or trainer.resolve_device(exp.cfg["device"])))
    return best


def final_selection(exp: Experiment, name: str, pool: list[dict], device=None) -> dict | None:
    """Retrain the top-k partial-fitness candidates at full length; pick by mean validation accuracy.

    The papers keep the best partial-training candidate; a short-run winner can collapse at full
    length, so this check is on by default (``top_k: 0`` turns it off). Only validation accuracy
    is used: the test set stays untouched until retraining.
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
    runs = evaluate.repeated([(i, c["spec"]) for i, c in enumerate(top)], split, exp.cfg["model"],
                             exp.cfg["training"], steps, seeds, device,
                             fitness_settings(exp, name))
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
    an uninterrupted run with the same seed. A damaged state file is reported and recomputed
    from the last complete generation. A second driver on the same search waits for the first.
    ``workers`` > 1 evaluates shards in parallel processes with ``exp.threads`` torch threads each.
    """
    with state.search_lock(exp.search_dir(name), log):
        return _run(exp, name, workers, log)


def _run(exp: Experiment, name: str, workers: int, log) -> dict:
    scfg = exp.search_cfg(name)
    root = exp.search_dir(name)
    n_gen = generations(scfg)
    best_path = root / "best.json"
    fresh = _stored_digest(root) != fingerprint(exp, name)["digest"]
    if not fresh:
        damaged = state.first_damaged(root, n_gen, scfg["shards"])
        if damaged:
            g, exc = damaged
            print(f"[{name}] {exc.path}: {str(exc).split(': ', 1)[1].split(';')[0]}; recomputing "
                  f"from generation {g}", file=log, flush=True)
            discard_from(root, g, keep_candidates=exc.path.name.startswith("shard_")
                         or exc.path.name == "summary.json")
        elif best_path.exists():
            print(f"[{name}] complete: {best_path}", file=log)
            return read_json(best_path)
    t0 = time.perf_counter()
    with parallel.runner(min(workers, scfg["shards"]), exp.threads) as pool:
        for g in range(n_gen):
            if fresh or not state.candidates_path(root, g).exists():
                step(exp, name, g)
                fresh = False
            pending = [s for s in range(scfg["shards"]) if not state.shard_path(root, g, s).exists()]
            pool.map(evaluate_shard, [(exp, name, g, s) for s in pending])
            if g > 0:
                _log_generation(name, state.read_summary(root, g - 1), t0, log)
    best = _finalize(exp, name)
    _log_generation(name, state.read_summary(root, n_gen - 1), t0, log, f"; picked {best['picked_by']}")
    return best


def discard_from(root: Path, g: int, keep_candidates: bool) -> None:
    """Delete generation g's damaged state and everything after it (later generations, results).

    ``keep_candidates``: the damage is in a shard or the summary, so g's (checked) candidates and
    checkpoint stay and only its shards and summary are recomputed.
    """
    gdir = state.gen_dir(root, g)
    if keep_candidates:
        for p in list(gdir.glob("shard_*.json")) + [state.summary_path(root, g)]:
            p.unlink(missing_ok=True)
    elif gdir.exists():
        shutil.rmtree(gdir)
    later = g + 1
    while state.gen_dir(root, later).exists():
        shutil.rmtree(state.gen_dir(root, later))
        later += 1
    for name in ("best.json", "progress.csv"):
        (root / name).unlink(missing_ok=True)


def _log_generation(name: str, s: dict, t0: float, log, tail: str = "") -> None:
    extra = "".join(f" {k} {s[k]}" for k in ("cached", "duplicate") if s.get(k))
    print(f"[{name}] gen {s['generation']:3d}: best {s['best_fitness']:.4f} mean {s['mean_fitness']:.4f} "
          f"rejected {s['rejected']} failed {s['failed']}{extra}{tail} ({time.perf_counter() - t0:.0f}s)",
          file=log, flush=True)
