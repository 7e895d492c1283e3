"""The single-candidate trainer: SGD on in-memory tensors with a fixed step budget.

Batches come from a seeded stream of epoch permutations (tensor indexing, no DataLoader): batch
s is ``stream[s*B:(s+1)*B]``, so every batch is full and the order depends only on the seed. A
loss that turns NaN/Inf stops the run with status ``nan``; a run whose validation accuracy is
below ``abort.min_accuracy`` at ``abort.epoch`` stops with status ``aborted`` (the papers'
retry rule). Neither raises: a misbehaving candidate must never kill a search.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from lossevo import determinism, models
from lossevo import recipe as recipe_mod
from lossevo.data import Split
from lossevo.training import augment, precision


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_model(model_cfg: dict, split: Split, seed: int, device: torch.device) -> nn.Module:
    """Build the model with weights determined by ``seed`` alone."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    return models.build(model_cfg["name"], split.input_shape, split.n_classes, **kwargs).to(device)


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Yield ``steps`` index batches from concatenated seeded permutations of ``range(n)``."""
    gen = torch.Generator().manual_seed(seed)
    buf = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(buf) < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=gen)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def lr_at(step: int, recipe: dict) -> float:
    """Step-decay schedule: lr × gamma for every milestone (in steps) already passed."""
    passed = sum(1 for m in recipe.get("milestones", []) if step >= m)
    return recipe["lr"] * recipe.get("gamma", 0.1) ** passed


@torch.no_grad()
@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Top-1 accuracy; non-finite logits count as wrong (a diverged net scores as such). No
    autograd graph: at paper scale one 2048-image chunk's saved activations would be gigabytes."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i : i + batch_size])
        ok = torch.isfinite(logits).all(dim=1)
        correct += int(((logits.argmax(dim=1) == y[i : i + batch_size]) & ok).sum())
    model.train(was_training)
    return correct / max(1, len(y))


def train(
    model_cfg: dict,
    split: Split,
    loss_fn: nn.Module,
    recipe: dict,
    seed: int,
    steps: int | None = None,
    abort: dict | None = None,
    device: torch.device | None = None,
    evaluate_test: bool = True,
    keep_model: bool = False,
    curve_every: int | None = None,
) -> dict:
    """Train one model from scratch; return status, accuracies and where it stopped.

    ``keep_model``: a successful result also holds the final weights (``state_dict``, CPU).

    ``recipe`` holds lr, momentum, weight_decay, nesterov, batch_size, steps, milestones, gamma.
    ``steps`` overrides the recipe's budget (partial training); ``recipe['partial_schedule']``
    says how the run follows the full schedule (:func:`lossevo.recipe.schedule`).
    ``recipe['augment']`` augments every training batch (:mod:`lossevo.training.augment`; a
    stream of its own seeded by ``seed``); without it no random number is drawn for it.
    ``curve_every``: the result's ``curve`` holds the test accuracy after every ``curve_every``
    steps before the last (evaluation draws no random number, so training is unchanged).
    """
    device = device or split.x_train.device
    determinism.configure_torch(device)
    steps = steps or recipe["steps"]
    sched, horizon = recipe_mod.schedule(recipe, steps)
    model = init_model(model_cfg, split, seed, device)
    x, y = split.x_train, split.y_train
    if recipe.get("channels_last") and x.dim() == 4:
        model, x = precision.channels_last(model, x)
    loss_fn = loss_fn.to(device)
    scaler = precision.grad_scaler(device, recipe)
    weight_decay = recipe.get("weight_decay", 0.0)
    mask = models.weight_decay_mask(model)
    params = list(model.parameters())
    if all(mask):
        groups = [{"params": params}]
    else:  # the model decays only some weights (models.weight_decay_mask)
        groups = [{"params": [p for p, m in zip(params, mask, strict=True) if m]},
                  {"params": [p for p, m in zip(params, mask, strict=True) if not m], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe.get("momentum", 0.0),
                          weight_decay=weight_decay, nesterov=recipe.get("nesterov", False))
    abort_step = None
    if abort and abort.get("epoch") is not None:
        abort_step = abort["epoch"] * recipe_mod.steps_per_epoch(len(split.y_train), recipe["batch_size"])
    result = {"seed": seed, "steps": steps, "status": "ok", "reason": None}
    if curve_every:
        result["curve"] = []  # filled as training goes, kept whatever the run's end
    model.train()
    has_progress = getattr(loss_fn, "uses_progress", False)
    aug_cfg = augment.for_split(recipe.get("augment"), split)
    augmenter = augment.Augmenter(aug_cfg, seed, fill=getattr(split, "pixel_zero", None)) if aug_cfg else None
    value = math.nan
    for step, idx in enumerate(batch_indices(len(y), recipe["batch_size"], steps, seed)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, sched)
        if has_progress:
            loss_fn.progress = step / horizon
        idx = idx.to(device)
        with precision.autocast(device, recipe):
            if augmenter is None:
                loss = loss_fn(model(x[idx]), y[idx])
            else:
                batch = augmenter(x[idx], y[idx])
                loss = augment.mixed_loss(loss_fn, model(batch.x), batch)
        value = loss.item()
        if not math.isfinite(value):
            result.update(status="nan", reason=f"loss became {value} at step {step}",
                          steps_done=step, val_accuracy=0.0, test_accuracy=0.0)
            return result
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:  # fp16: dynamic loss scaling (a step whose gradients overflow is skipped)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if curve_every and (step + 1) % curve_every == 0 and step + 1 < steps:
            result["curve"].append(accuracy(model, split.x_test, split.y_test))
        if abort_step is not None and step + 1 == abort_step < steps:
            acc = accuracy(model, split.x_val, split.y_val)
            if acc < abort["min_accuracy"]:
                result.update(
                    status="aborted", steps_done=step + 1, val_accuracy=acc, test_accuracy=None,
                    reason=f"validation accuracy {acc:.4f} < {abort['min_accuracy']} at epoch {abort['epoch']}",
                )
                return result
    result["steps_done"] = steps
    result["final_loss"] = value
    result["val_accuracy"] = accuracy(model, split.x_val, split.y_val)
    result["test_accuracy"] = accuracy(model, split.x_test, split.y_test) if evaluate_test else None
    if keep_model:
        result["state_dict"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return result
