"""Train many candidates (loss specs × seeds) of one architecture, batched where possible.

``train_many`` is the one entry point searches and retraining use. A loss search is hundreds of
short trainings of the same small model, and on small models most of a step is per-call
overhead, so candidates are trained as a *population*: their weights are stacked
(``torch.func.stack_module_state``), one batched forward/backward pass serves every candidate
(``vmap`` over ``functional_call``; plain MLPs take a direct ``baddbmm`` path with the same
arithmetic and less per-op cost) and one fused (``torch._foreach_*``) SGD update follows.

Semantics are those of :func:`lossevo.training.trainer.train`, candidate by candidate:

- initial weights from ``trainer.init_model(model_cfg, split, seed, device)``;
- batches from ``trainer.batch_indices`` per seed (candidates that share a seed share the
  batch; otherwise each gathers its own, ``x[idx]`` with ``idx`` of shape [P, B]);
- ``torch.optim.SGD``'s math (weight decay added to the gradient of the weights the model
  decays, :func:`lossevo.models.weight_decay_mask`; momentum buffer = gradient on
  the first step, dampening 0, Nesterov), ``trainer.lr_at`` with the partial-run schedule of
  :func:`lossevo.recipe.schedule` (truncated or rescaled), ``loss.progress = step / horizon``;
- the per-candidate stop rules: a non-finite loss stops *that* candidate (status ``nan``) before
  its update; validation accuracy below ``abort.min_accuracy`` after ``abort.epoch`` epochs stops
  it with status ``aborted``. Per-candidate losses are a [P] vector, masked with ``torch.where``
  before they are summed for the backward pass, and stopped candidates are dropped from the
  stacked tensors, so they never touch the others' numbers;
- the same result dicts (same keys per status) as ``trainer.train``.

The batched numbers agree with the sequential trainer's to rounding (slicewise the batched
kernels compute the same sums; on CPU they are usually bit-identical). Dropout masks are drawn
independently per candidate (``randomness="different"``) but from one generator stream, so
they differ from a sequential run's and depend on the population.

Buffers (BatchNorm running statistics) are per candidate: stacked like the weights and passed
with them to ``functional_call`` under ``vmap`` (in_dims 0). torch's batch rule for batch norm
takes batched running statistics and updates them in place, each slice from its own
candidate's batch statistics (it refuses only *unbatched* buffers with batched inputs), so the
modules' own ``F.batch_norm`` runs, not a re-implementation; evaluation runs in eval mode on
each candidate's own statistics. In float64 BN populations equal one-by-one training to 1e-15;
in float32 one [B, P·C, ...] normalisation rounds unlike P [B, C, ...] ones (at rounding level),
which training carries along like any rounding change (tests/test_population_bn.py).

Grouping and fallback: candidates are grouped by loss kind and its non-θ settings (for
``taylor``: order, variables, class reduction; θ and the convention live in the stacked
centres/coefficients; every GLO tree — kinds ``tree``, ``baikal_cma``, ``fast_logit`` — with one
class reduction and one leaf set is one group whatever its expression and coefficients: the
inputs x, y, logit are computed once for the stack and each candidate's compiled tree runs on
its own slice), and each group with more than one member is batched, in chunks of at
most ``max_population`` (default: up to :data:`.batch_plan.DEFAULT_MAX_POPULATION`, fewer when
:func:`.batch_plan.candidate_cost` says the model is big). On the CPU a compute-bound model (above
:data:`.batch_plan.CPU_MAX_BATCHED_MACS`) gains nothing from batching and is trained one by one (logged
once). A model that fails a 2-candidate vmap probe (training step and evaluation, buffers
included; e.g. BatchNorm with ``momentum=None``, whose cumulative average reads its step count
in Python), or a loss kind this module does not know, falls back to the sequential trainer with
one warning per process and reason.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lossevo import determinism, losses, models
from lossevo import recipe as recipe_mod
from lossevo.data import Split
from lossevo.errors import LossevoError
from lossevo.training import augment, batch_plan, precision, trainer
from lossevo.training.stacked_forward import _population_forward
from lossevo.training.stacked_loss import (  # noqa: F401 - re-exported
    BATCHABLE_KINDS,
    TREE_KINDS,
    _stacked_loss,
    loss_group,
)
from lossevo.training.stacked_state import _Population

#: Rows × candidates per batched evaluation chunk (``trainer.accuracy`` uses 2048 rows per model).
EVAL_ELEMENTS = 8192
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    """Say once per process and reason that training falls back to one candidate at a time."""
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"train_many: {reason}; training candidates one after another",
                  RuntimeWarning, stacklevel=3)


def _as_dict(spec: dict | str) -> dict:
    """A spec given as a JSON string, parsed (with :func:`losses.build`'s error)."""
    if not isinstance(spec, str):
        return spec
    try:
        return json.loads(spec)
    except json.JSONDecodeError as exc:
        raise LossevoError(f"loss spec is not valid JSON: {exc.msg}") from None


def _call_stacked(loss_fn: Callable, extra: list, progress, logits: torch.Tensor, target: torch.Tensor):
    """The stacked loss of a population step ([P] values) for one set of targets."""
    return loss_fn(logits, target, extra, progress)


def _chunks(items: list, cap: int) -> list[list]:
    """Split ``items`` into the fewest chunks of at most ``cap``, as equal in size as possible."""
    n = max(1, math.ceil(len(items) / cap))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


@torch.no_grad()
def _accuracies(forward: Callable, params: dict, x: torch.Tensor, y: torch.Tensor,
                device: torch.device) -> list[float]:
    """Top-1 accuracy of every stacked candidate (eval mode: BatchNorm uses each candidate's
    running statistics); non-finite logits count as wrong."""
    n_cand = next(iter(params.values())).shape[0]
    rows = max(1, min(2048, EVAL_ELEMENTS // n_cand))
    params = {k: v.detach() for k, v in params.items()}
    correct = torch.zeros(n_cand, dtype=torch.long, device=device)
    for i in range(0, len(y), rows):
        logits = forward(params, x[i : i + rows].to(device), True, False)
        ok = torch.isfinite(logits).all(dim=-1)
        correct += ((logits.argmax(dim=-1) == y[i : i + rows].to(device)) & ok).sum(dim=-1)
    return [c / max(1, len(y)) for c in correct.tolist()]


def train_population(
    model_cfg: dict,
    split: Split,
    loss_fns: list[nn.Module],
    recipe: dict,
    seeds: list[int],
    steps: int | None = None,
    abort: dict | None = None,
    device: torch.device | None = None,
    evaluate_test: bool = True,
    keep_models: bool = False,
    curve_every: int | None = None,
) -> list[dict]:
    """Train ``loss_fns[i]`` with ``seeds[i]`` for all i in one batched computation.

    The losses must be of one kind and setting, or all GLO trees with one class reduction (see
    :func:`loss_group`), and the model must be
    batchable (see :func:`.batch_plan.model_unbatchable`); :func:`train_many` checks both. Returns one
    :func:`trainer.train` result per candidate.
    """
    if len(loss_fns) != len(seeds):
        raise ValueError(f"{len(loss_fns)} losses but {len(seeds)} seeds")
    device = device or split.x_train.device
    determinism.configure_torch(device)
    steps = steps or recipe["steps"]
    sched, horizon = recipe_mod.schedule(recipe, steps)
    momentum = recipe.get("momentum", 0.0)
    weight_decay = recipe.get("weight_decay", 0.0)
    nesterov = recipe.get("nesterov", False)
    if nesterov and momentum <= 0:
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    abort_step = None
    if abort and abort.get("epoch") is not None:
        per_epoch = recipe_mod.steps_per_epoch(len(split.y_train), recipe["batch_size"])
        abort_step = abort["epoch"] * per_epoch

    n_cand = len(seeds)
    built: dict[int, nn.Module] = {}
    for seed in seeds:  # init_model depends on the seed alone: build each seed once
        if seed not in built:
            built[seed] = trainer.init_model(model_cfg, split, seed, device)
    loss_fns = [f.to(device) for f in loss_fns]
    loss_fn, extra = _stacked_loss(loss_fns, device)
    pop = _Population([built[s] for s in seeds], extra, seeds)
    forward = _population_forward(built[seeds[0]])
    decayed = dict(zip((n for n, _ in built[seeds[0]].named_parameters()),
                       models.weight_decay_mask(built[seeds[0]]), strict=True))
    decay_at = [i for i, n in enumerate(pop.names) if decayed[n]]  # stacked weights that decay
    del built

    results = [{"seed": s, "steps": steps, "status": "ok", "reason": None} for s in seeds]
    if curve_every:  # test accuracy every curve_every steps, as trainer.train records it
        for r in results:
            r["curve"] = []

    x, y = split.x_train, split.y_train
    streams = {s: trainer.batch_indices(len(y), recipe["batch_size"], steps, s) for s in set(seeds)}
    aug_cfg = augment.for_split(recipe.get("augment"), split)
    fill = getattr(split, "pixel_zero", None)
    augmenters = {s: augment.Augmenter(aug_cfg, s, fill=fill) for s in set(seeds)} if aug_cfg else None
    # On the CPU checking for non-finite losses every step costs nothing; on an accelerator the
    # check (a host sync) runs every few steps, the step of the first non-finite loss being
    # tracked on the device, so a late check only costs a few steps of wasted compute.
    on_device = torch.device(device).type != "cpu"
    sync_every = 16 if on_device else 1
    active = torch.ones(n_cand, dtype=torch.bool, device=device)
    bad_step = torch.full((n_cand,), -1, dtype=torch.long, device=device)
    bad_loss = torch.zeros(n_cand, device=device)
    last_loss = None

    def stop_nonfinite() -> None:
        """Record the candidates whose loss went non-finite and drop them."""
        if bool(active.all()):
            return
        for j, (st, val) in enumerate(zip(bad_step.tolist(), bad_loss.tolist(), strict=True)):
            if st >= 0:
                results[pop.live[j]].update(
                    status="nan", reason=f"loss became {val} at step {st}", steps_done=st,
                    val_accuracy=0.0, test_accuracy=0.0,
                )
        compact([j for j, st in enumerate(bad_step.tolist()) if st < 0])

    def compact(slices: list[int]) -> None:
        nonlocal active, bad_step, bad_loss, last_loss
        if len(slices) == len(pop.live):
            return
        pop.keep(slices)
        sel = torch.tensor(slices, dtype=torch.long, device=device)
        active, bad_step, bad_loss = active[sel], bad_step[sel], bad_loss[sel]
        if last_loss is not None:
            last_loss = last_loss[sel]

    for step in range(steps):
        if not pop.live:
            break
        lr = trainer.lr_at(step, sched)
        batch = {s: next(streams[s]) for s in set(pop.seeds)}  # stopped seeds' streams idle
        shared = len(set(pop.seeds)) == 1
        if augmenters:  # each seed's batch augmented by its own stream, as trainer.train does
            aug = {s: augmenters[s](x[i.to(x.device)].to(device), y[i.to(x.device)].to(device))
                   for s, i in batch.items()}
            b = aug[pop.seeds[0]] if shared else augment.stack([aug[s] for s in pop.seeds])
        elif shared:
            idx = batch[pop.seeds[0]].to(x.device)
            b = augment.Batch(x[idx].to(device), y[idx].to(device))
        else:
            idx = torch.stack([batch[s] for s in pop.seeds]).to(x.device)
            b = augment.Batch(x[idx].to(device), y[idx].to(device))
        progress = step / horizon
        if on_device:  # a CPU tensor of t would not mix with the device's tensors
            progress = torch.tensor(progress, device=device)
        with precision.autocast(device, recipe):
            logits = forward(pop.as_dict(), b.x, shared, True)
            loss = augment.mixed_loss(functools.partial(_call_stacked, loss_fn, pop.extra, progress), logits, b)
        if loss.dtype in (torch.float16, torch.bfloat16):
            loss = loss.float()
        finite = torch.isfinite(loss)
        newly = active & ~finite
        bad_step = torch.where(newly, step, bad_step)
        bad_loss = torch.where(newly, loss.detach().to(bad_loss.dtype), bad_loss)
        active = active & finite
        # Mask before summing: a stopped candidate's NaN must not reach the total.
        total = torch.where(active, loss, torch.zeros_like(loss)).sum()
        grads = list(torch.autograd.grad(total, pop.params))
        with torch.no_grad():
            if weight_decay != 0 and len(decay_at) == len(grads):
                grads = torch._foreach_add(grads, pop.params, alpha=weight_decay)
            elif weight_decay != 0:  # the model decays only some weights (models.weight_decay_mask)
                for i, g in zip(decay_at, torch._foreach_add([grads[i] for i in decay_at],
                                                             [pop.params[i] for i in decay_at],
                                                             alpha=weight_decay), strict=True):
                    grads[i] = g
            if momentum != 0:
                if pop.momentum is None:
                    pop.momentum = [g.detach().clone() for g in grads]
                else:
                    torch._foreach_mul_(pop.momentum, momentum)
                    torch._foreach_add_(pop.momentum, grads)
                if nesterov:
                    grads = torch._foreach_add(grads, pop.momentum, alpha=momentum)
                else:
                    grads = pop.momentum
            torch._foreach_add_(pop.params, grads, alpha=-lr)
        last_loss = loss.detach()
        check_abort = abort_step is not None and step + 1 == abort_step < steps
        check_curve = bool(curve_every) and (step + 1) % curve_every == 0 and step + 1 < steps
        if check_abort or check_curve or (step + 1) % sync_every == 0 or step + 1 == steps:
            stop_nonfinite()
        if check_curve and pop.live:
            accs = _accuracies(forward, pop.as_dict(), split.x_test, split.y_test, device)
            for j, acc in enumerate(accs):
                results[pop.live[j]]["curve"].append(acc)
        if check_abort and pop.live:
            accs = _accuracies(forward, pop.as_dict(), split.x_val, split.y_val, device)
            keep = []
            for j, acc in enumerate(accs):
                if acc < abort["min_accuracy"]:
                    results[pop.live[j]].update(
                        status="aborted", steps_done=step + 1, val_accuracy=acc,
                        test_accuracy=None,
                        reason=f"validation accuracy {acc:.4f} < {abort['min_accuracy']} "
                               f"at epoch {abort['epoch']}",
                    )
                else:
                    keep.append(j)
            compact(keep)

    if pop.live:
        final = last_loss.tolist()
        val = _accuracies(forward, pop.as_dict(), split.x_val, split.y_val, device)
        test = (_accuracies(forward, pop.as_dict(), split.x_test, split.y_test, device)
                if evaluate_test else [None] * len(pop.live))
        for j, i in enumerate(pop.live):
            results[i]["steps_done"] = steps
            results[i]["final_loss"] = float(final[j])
            results[i]["val_accuracy"] = val[j]
            results[i]["test_accuracy"] = test[j]
            if keep_models:  # candidate j's slice of the weights and buffers
                results[i]["state_dict"] = pop.state_dict(j)
    return results


def train_many(
    model_cfg: dict,
    split: Split,
    specs: list[dict],
    recipe: dict,
    seeds: list[int],
    steps: int | None = None,
    abort: dict | None = None,
    device: torch.device | None = None,
    evaluate_test: bool = True,
    *,
    max_population: int | None = None,
    batched: bool | None = None,
    keep_models: bool = False,
    curve_every: int | None = None,
) -> list[dict]:
    """Train ``specs[i]`` with ``seeds[i]``; return one :func:`trainer.train` result per pair.

    ``keep_models``: each successful result also holds the final weights (``state_dict``, on
    the CPU), e.g. for retraining, whose networks the evaluation stages reuse.
    ``curve_every``: each result's ``curve`` holds the test accuracy every that many steps
    (:func:`trainer.train`), for the accuracy-during-training figures.

    Candidates whose losses batch together (:func:`loss_group`) are trained as populations of at
    most ``max_population`` (default :data:`.batch_plan.DEFAULT_MAX_POPULATION`, lowered for big models);
    the rest, and everything when the model cannot be batched, one after another.
    ``batched=False`` forces the sequential trainer; None (default) batches where possible and
    worthwhile; ``True`` also batches models :data:`.batch_plan.CPU_MAX_BATCHED_MACS` keeps sequential.
    """
    if len(specs) != len(seeds):
        raise ValueError(f"{len(specs)} specs but {len(seeds)} seeds")
    dev = torch.device(device) if device is not None else split.x_train.device
    specs = [_as_dict(s) for s in specs]

    def sequential(i: int) -> dict:
        return trainer.train(model_cfg, split, losses.build(specs[i]), recipe, seeds[i],
                             steps=steps, abort=abort, device=device,
                             evaluate_test=evaluate_test, keep_model=keep_models, curve_every=curve_every)

    results: list[dict | None] = [None] * len(specs)
    groups: dict[str, list[int]] = {}
    solo: list[int] = []
    if batched is False or len(specs) < 2:
        solo = list(range(len(specs)))
    else:
        for i, spec in enumerate(specs):
            key = loss_group(spec)
            if key is None:
                _warn_once(f"loss kind {spec['kind']!r} cannot be batched")
                solo.append(i)
            else:
                groups.setdefault(key, []).append(i)
        if any(len(g) > 1 for g in groups.values()):
            reason = precision.batchable(recipe) or batch_plan.model_unbatchable(model_cfg, split, dev)
            if reason is not None:
                _warn_once(reason)
                solo += [i for g in groups.values() for i in g]
                groups = {}
    if any(len(g) > 1 for g in groups.values()):
        cap = batch_plan.population_cap(model_cfg, split, recipe["batch_size"], dev, max_population,
                                        forced=batched is True)
    for members in groups.values():
        if len(members) == 1:
            solo += members
            continue
        members = sorted(members, key=lambda i: seeds[i])  # equal seeds share batches
        for chunk in _chunks(members, cap):
            if len(chunk) == 1:
                solo += chunk
                continue
            out = train_population(
                model_cfg, split, [losses.build(specs[i]) for i in chunk], recipe,
                [seeds[i] for i in chunk], steps=steps, abort=abort, device=device,
                evaluate_test=evaluate_test, keep_models=keep_models, curve_every=curve_every,
            )
            for i, r in zip(chunk, out, strict=True):
                results[i] = r
    for i in sorted(solo):
        results[i] = sequential(i)
    return results
