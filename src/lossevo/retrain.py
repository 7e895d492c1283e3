"""Retraining: each loss trained from scratch at full length over many seeds (test accuracy).

A loss is either a spec in params.yaml or ``{search: NAME}``, meaning that search's best.json.
"""

from __future__ import annotations

import time
from pathlib import Path

from lossevo import checkpoint, environment, parallel
from lossevo import data as data_mod
from lossevo.config import Experiment
from lossevo.errors import LossevoError
from lossevo.io import read_json, write_json
from lossevo.training import trainer
from lossevo.training.population import train_many


def resolve_spec(exp: Experiment, loss: str) -> dict:
    """The spec of a retrained loss: from params, or the best loss of the search it names."""
    losses = exp.cfg["retrain"]["losses"]
    if loss not in losses:
        raise LossevoError(f"loss {loss!r} is not in experiments.{exp.name}.retrain.losses (have {list(losses)})")
    entry = losses[loss]
    if "search" not in entry:
        return entry
    best = exp.search_dir(entry["search"]) / "best.json"
    if not best.exists():
        raise LossevoError(f"{best}: not found (run search {entry['search']!r} first)")
    return read_json(best)["spec"]


def seeds(exp: Experiment) -> list[int]:
    r = exp.cfg["retrain"]
    return list(range(r["seed_offset"], r["seed_offset"] + r["seeds"]))


def retrain(exp: Experiment, loss: str, device=None) -> Path:
    """Train ``loss`` once per retraining seed; write retrain/<loss>.json with per-seed results."""
    spec = resolve_spec(exp, loss)
    device = device or trainer.resolve_device(exp.cfg["device"])
    split = data_mod.load_prepared(exp.data_path).to(device)
    run_seeds = seeds(exp)
    t0 = time.perf_counter()
    every = exp.cfg["retrain"].get("curve_every")
    results = train_many(exp.cfg["model"], split, [spec] * len(run_seeds), exp.cfg["training"],
                         run_seeds, device=device, keep_models=True, curve_every=every)
    # The wall time is a log, not a result: retrain/<loss>.json must hash the same on a rerun.
    write_json(exp.root / "logs" / "retrain" / f"{loss}.timing.json",
               {"seconds": time.perf_counter() - t0, "device": str(device)})
    # The trained networks, for the evaluation stages (FGSM, basins, weight statistics).
    checkpoint.save(exp.model_path(loss), model_cfg=exp.cfg["model"], input_shape=list(split.input_shape),
                    n_classes=split.n_classes, spec=spec, recipe=exp.cfg["training"],
                    data_digest=checkpoint.file_digest(exp.data_path), seeds=run_seeds,
                    states=[r.get("state_dict") if r["status"] == "ok" else None for r in results])
    # What produced the directory: every retraining process of the stage writes the same record
    # (atomically), so concurrent Snakemake jobs and pool workers may race harmlessly.
    write_json(environment.stage_paths(exp)["retrain"], environment.record(device))
    record = {
        "loss": loss,
        "spec": spec,
        "device": str(device),
        "seeds": run_seeds,
        "status": [r["status"] for r in results],
        "reason": [r["reason"] for r in results],
        # A diverged run counts as accuracy 0: dropping it would flatter the loss.
        "test_accuracy": [float(r["test_accuracy"] or 0.0) for r in results],
        "val_accuracy": [float(r["val_accuracy"] or 0.0) for r in results],
    }
    if every:  # only when asked: records without it keep their bytes
        record["curve"] = curve(results, every, exp.cfg["training"]["steps"])
    return write_json(exp.retrain_path(loss), record)


def curve(results: list[dict], every: int, steps: int) -> dict:
    """Test accuracy per seed after every ``every`` steps; a run that stopped early (diverged or
    aborted) scores 0 from there on, as its final accuracy does."""
    points = (steps - 1) // every
    return {"steps": [every * (i + 1) for i in range(points)],
            "test_accuracy": [[float(a) for a in r.get("curve", [])] + [0.0] * (points - len(r.get("curve", [])))
                              for r in results]}


def retrain_all(exp: Experiment, names: list[str], workers: int = 1) -> list[Path]:
    """Retrain several losses, one per worker process at a time (``exp.threads`` threads each)."""
    with parallel.runner(min(workers, len(names)), exp.threads) as pool:
        return pool.map(retrain, [(exp, name) for name in names])
