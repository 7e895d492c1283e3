"""Candidate evaluation shared by every search: partial training, retries, failure records.

Fitness is the validation accuracy after partial training. Following the papers (TaylorGLO
App. A.6): a run below ``abort.min_accuracy`` at ``abort.epoch`` is aborted and retried with a new
seed, up to ``len(seeds)`` runs in all; if every attempt fails, the candidate keeps its last
measured accuracy (as in the authors' code). A NaN/Inf loss gives fitness 0 and is not retried:
the same loss diverges again. Nothing here raises for a misbehaving candidate.
"""

from __future__ import annotations

import numpy as np
import torch

from lossevo.data import Split
from lossevo.training.population import train_many

ATTEMPT_KEYS = ("seed", "status", "reason", "val_accuracy", "val_accuracy_clean", "steps_done")


def attempt_seed(base: int, generation: int, attempt: int) -> int:
    """Training seed for a generation's attempt: shared by its candidates (common random numbers)."""
    return int(np.random.SeedSequence([base, generation, attempt]).generate_state(1)[0] & 0x7FFFFFFF)


def rejected(index: int, reason: str) -> dict:
    """Record for a candidate given fitness 0 without training (e.g. the invariant failed)."""
    return {"index": index, "fitness": 0.0, "status": "rejected", "reason": reason, "attempts": []}


def untrained(cand: dict) -> dict:
    """Record for a candidate whose fitness is known without training it in this generation:
    ``rejected`` (fitness 0), ``cached`` (an equivalent loss was trained before) or ``duplicate``
    (an equal candidate of this generation trains; its fitness is copied when results are read)."""
    status = cand["status"]
    if status == "rejected":
        return rejected(cand["index"], cand["reason"])
    if status == "cached":
        return {"index": cand["index"], "fitness": float(cand["fitness"]), "status": "cached",
                "reason": cand.get("reason"), "attempts": []}
    if status == "duplicate":
        return {"index": cand["index"], "fitness": None, "status": "duplicate",
                "reason": f"same loss as candidate {cand['same_as']}", "same_as": cand["same_as"],
                "attempts": []}
    raise ValueError(f"candidate status {status!r} is not one the engine knows")


def evaluate(
    indexed_specs: list[tuple[int, dict]],
    split: Split,
    model_cfg: dict,
    recipe: dict,
    steps: int,
    seeds: list[int],
    abort: dict | None,
    device: torch.device,
    fitness: dict | None = None,
) -> list[dict]:
    """Partially train each (index, spec); ``seeds[a]`` is the seed of attempt ``a``.

    ``fitness`` (a search's ``fitness`` settings plus the ``dataset``): ``kind: fgsm`` scores a
    trained candidate by its validation accuracy under FGSM at ``epsilon`` instead of its clean
    validation accuracy (kept as ``val_accuracy_clean``).

    Each attempt round trains all still-pending candidates together (batched where possible).
    """
    records = {i: {"index": i, "attempts": []} for i, _ in indexed_specs}
    pending = list(indexed_specs)
    for seed in seeds:
        if not pending:
            break
        results = train_many(model_cfg, split, [s for _, s in pending], recipe, [seed] * len(pending),
                             steps=steps, abort=abort, device=device, evaluate_test=False,
                             keep_models=_adversarial(fitness))
        _score(results, [s for _, s in pending], split, model_cfg, fitness, device)
        retry = []
        for (i, spec), r in zip(pending, results):
            records[i]["attempts"].append({k: r.get(k) for k in ATTEMPT_KEYS})
            if r["status"] == "aborted":
                retry.append((i, spec))
        pending = retry
    out = []
    for i, _ in indexed_specs:
        rec = records[i]
        last = rec["attempts"][-1]
        status = {"ok": "ok", "nan": "nan", "aborted": "failed"}[last["status"]]
        rec.update(fitness=float(last["val_accuracy"]), status=status, reason=last["reason"])
        out.append(rec)
    return out


def repeated(
    indexed_specs: list[tuple[int, dict]],
    split: Split,
    model_cfg: dict,
    recipe: dict,
    steps: int,
    seeds: list[int],
    device: torch.device,
    fitness: dict | None = None,
) -> list[list[float | None]]:
    """Validation accuracy of each spec trained once per seed (None where the loss diverged)."""
    specs = [spec for _, spec in indexed_specs for _ in seeds]
    all_seeds = [seed for _ in indexed_specs for seed in seeds]
    results = train_many(model_cfg, split, specs, recipe, all_seeds, steps=steps, device=device,
                         evaluate_test=False, keep_models=_adversarial(fitness))
    _score(results, specs, split, model_cfg, fitness, device)
    accs = [r["val_accuracy"] if r["status"] == "ok" else None for r in results]
    return [accs[k * len(seeds) : (k + 1) * len(seeds)] for k in range(len(indexed_specs))]


def _adversarial(fitness: dict | None) -> bool:
    return bool(fitness) and fitness.get("kind") == "fgsm"


def _score(results: list[dict], specs: list[dict], split: Split, model_cfg: dict, fitness: dict | None,
           device: torch.device) -> None:
    """Replace each trained run's validation accuracy by its FGSM accuracy (``kind: fgsm``).

    The regularization paper's adversarial searches (its authors' configs use ε = 0.1): the
    attack's step and clamp are in pixel space; the attacker differentiates cross-entropy, or the
    candidate's own loss with ``attack_loss: training``. Runs that did not finish keep their
    (clean) accuracy, as the retry rule needs.
    """
    if not _adversarial(fitness):
        return
    from lossevo import losses
    from lossevo.evaluate import adversarial
    from lossevo.training import trainer

    mean, std = (t.to(device) for t in adversarial.pixel_stats(fitness["data"]))
    for r, spec in zip(results, specs):
        state = r.pop("state_dict", None)
        if r["status"] != "ok" or state is None:
            continue
        net = trainer.init_model(model_cfg, split, 0, device)
        net.load_state_dict(state)
        attack = losses.build(spec).to(device) if fitness["attack_loss"] == "training" else None
        if attack is not None and getattr(attack, "uses_progress", False):
            attack.progress = 1.0
        (acc,) = adversarial.fgsm_accuracy(net, split.x_val, split.y_val, [fitness["epsilon"]], mean, std,
                                           attack, epsilon_space=fitness.get("epsilon_space", "pixel"))
        r["val_accuracy_clean"], r["val_accuracy"] = r["val_accuracy"], acc
