"""Training recipes in the papers' units: epochs to steps, and how a partial run follows the schedule.

params.yaml may give a recipe in epochs (``training.epochs``, ``milestone_epochs``, a search's
``partial_epochs``) as the papers and the authors' configs do; :func:`resolve` turns them into
steps (one epoch = ceil(training examples / batch size) batches, the authors' loaders keeping the
last partial batch) before anything trains, so every stage sees steps only. The number of training
examples is computed from the data settings without reading the data, so that validating or
dry-running a paper preset needs no dataset on disk.
"""

from __future__ import annotations

import math

from lossevo.errors import LossevoError

#: Training-set sizes before the validation split (torchvision's files; SVHN without "extra").
TRAIN_SET_SIZE = {"mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257}
#: How a partial run (a search candidate's ``partial_steps``) follows the full schedule.
PARTIAL_SCHEDULES = ("truncate", "rescale")


def fraction_size(n: int, fraction: float, classes: int) -> int:
    """Training examples kept by ``data.train_fraction`` (at least one per class)."""
    if fraction >= 1.0:
        return n
    return min(n, max(int(round(fraction * n)), classes))


def train_size(data_cfg: dict) -> int:
    """Training examples the data settings give, without loading the torchvision datasets."""
    from lossevo import data
    from lossevo.data.torchvision_sets import N_CLASSES

    name = data_cfg["dataset"]
    if name == "digits":  # bundled with scikit-learn: loading it is instant and exact
        return len(data.load(data_cfg).y_train)
    if name not in TRAIN_SET_SIZE:
        raise LossevoError(f"data.dataset {name!r} is unknown (choose from {list(data.DATASETS)})")
    val = data_cfg.get("val_size")
    val = data.PAPER_VAL_SIZE[name] if val is None else val
    if val >= TRAIN_SET_SIZE[name]:
        raise LossevoError(f"data.val_size={val} leaves no training data for {name}")
    return fraction_size(TRAIN_SET_SIZE[name] - val, data_cfg.get("train_fraction", 1.0), N_CLASSES[name])


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(n_train / batch_size))


def resolve(exp: dict, where: str) -> None:
    """Fill ``training.steps``/``milestones`` and each search's ``partial_steps`` from epochs, in place.

    Exactly one of steps and epochs must be given (and of milestones and milestone_epochs, and of
    partial_steps and partial_epochs); errors name the key under ``where``.
    """
    tr = exp["training"]
    if ("steps" in tr) == ("epochs" in tr):
        raise LossevoError(f"{where}.training: give exactly one of steps and epochs")
    if tr.get("milestones") and "milestone_epochs" in tr:
        raise LossevoError(f"{where}.training: give milestones or milestone_epochs, not both")
    per_epoch = None
    if "epochs" in tr or "milestone_epochs" in tr or any("partial_epochs" in s for s in exp["search"].values()):
        try:
            per_epoch = steps_per_epoch(train_size(exp["data"]), tr["batch_size"])
        except LossevoError as exc:
            raise LossevoError(f"{where}: {exc}") from None
    if "epochs" in tr:
        tr["steps"] = tr["epochs"] * per_epoch
    if "milestone_epochs" in tr:
        tr["milestones"] = [m * per_epoch for m in tr["milestone_epochs"]]
    for sname, s in exp["search"].items():
        if ("partial_steps" in s) == ("partial_epochs" in s):
            raise LossevoError(f"{where}.search.{sname}: give exactly one of partial_steps and partial_epochs")
        if "partial_epochs" in s:
            s["partial_steps"] = max(1, round(s["partial_epochs"] * per_epoch))


def schedule(recipe: dict, steps: int | None) -> tuple[dict, int]:
    """(recipe with the milestones a run of ``steps`` uses, the length progress t is measured against).

    ``truncate`` (default; the authors' behaviour): a partial run is the first ``steps`` of the full
    schedule, milestones unchanged, t = step / full steps. ``rescale``: the milestones are scaled
    to the partial run and t = step / steps, so a partial run sees the whole shape of the schedule.
    """
    full = recipe["steps"]
    steps = steps or full
    if recipe.get("partial_schedule", "truncate") == "truncate":
        return recipe, full
    scale = steps / full
    return dict(recipe, milestones=[round(m * scale) for m in recipe.get("milestones", [])]), steps
