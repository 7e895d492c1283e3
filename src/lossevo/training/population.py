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
- ``torch.optim.SGD``'s math (weight decay added to the gradient, momentum buffer = gradient on
  the first step, dampening 0, Nesterov), ``trainer.lr_at`` with milestones scaled to a partial
  run, ``loss.progress = step / steps``;
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

Grouping and fallback: candidates are grouped by loss kind and its non-θ settings (for
``taylor``: order, variables, class reduction; θ and the convention live in the stacked
centres/coefficients; every GLO tree — kinds ``tree``, ``baikal_cma``, ``fast_logit`` — with one
class reduction and one leaf set is one group whatever its expression and coefficients: the
inputs x, y, logit are computed once for the stack and each candidate's compiled tree runs on
its own slice), and each group with more than one member is batched, in chunks of at
most ``max_population`` (default: up to :data:`DEFAULT_MAX_POPULATION`, fewer when
:func:`candidate_cost` says the model is big). On the CPU a compute-bound model (above
:data:`CPU_MAX_BATCHED_MACS`) gains nothing from batching and is trained one by one (logged
once). A model that cannot be batched (it has buffers, e.g. BatchNorm running statistics, or
fails a vmap probe), or a loss kind this module does not know, falls back to the sequential
trainer with one warning per process and reason.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from lossevo import losses, models
from lossevo.data import Split
from lossevo.errors import LossevoError
from lossevo.losses import tree
from lossevo.training import trainer

#: Candidates trained together in one batched pass unless ``max_population`` says otherwise.
DEFAULT_MAX_POPULATION = 32
#: Memory a batched pass may plan for (see :func:`candidate_cost`); on CUDA at least a quarter
#: of the device's memory.
STATE_BUDGET_BYTES = 2 << 30
#: On the CPU, batching pays where per-call overhead dominates a step; above this many forward
#: MACs per candidate-step (2 cores: MLP 64-100-100-10 at batch 32 is 0.6M and batches 5-10×
#: faster; small_cnn on 28×28 at 36M and the MNIST CNN at 56M+ batch slower) train one by one.
CPU_MAX_BATCHED_MACS = 10_000_000
#: Rows × candidates per batched evaluation chunk (``trainer.accuracy`` uses 2048 rows per model).
EVAL_ELEMENTS = 8192
#: Loss kinds whose modules this module knows how to batch.
BATCHABLE_KINDS = ("cross_entropy", "label_smoothing", "baikal", "taylor", "tree", "baikal_cma",
                   "fast_logit")
#: Kinds built as :class:`losses.TreeLoss`: they batch together across different trees.
TREE_KINDS = ("tree", "baikal_cma", "fast_logit")

_warned: set[str] = set()
_noted: set[str] = set()
log = logging.getLogger(__name__)
_model_checks: dict[str, str | None] = {}


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


def _note_once(message: str) -> None:
    """Log (info) once per process a deliberate choice not to batch."""
    if message not in _noted:
        _noted.add(message)
        log.info(message)


def loss_group(spec: dict) -> str | None:
    """The batching key of a loss spec (equal keys batch together); None if it cannot batch."""
    spec = losses.validate(spec)
    if spec["kind"] not in BATCHABLE_KINDS:
        return None
    if spec["kind"] in TREE_KINDS:
        leaves = (spec["leaves"] if spec["kind"] == "tree"
                  else list(losses.NAMED_TREES[spec["kind"]][2]))
        return json.dumps({"kind": "tree", "class_reduction": spec["class_reduction"],
                           "leaves": leaves}, sort_keys=True)
    return json.dumps({k: v for k, v in spec.items() if k not in ("theta", "convention")},
                      sort_keys=True)


def _vmap_probe(model: nn.Module, split: Split, device: torch.device) -> None:
    """Run a 2-candidate batched forward/backward on 2 examples; raises if it cannot."""
    params, _ = stack_module_state([model, model])
    forward = _population_forward(model)
    x = split.x_train[:2].to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        total = forward(params, x, True, True).float().square().sum()
        torch.autograd.grad(total, list(params.values()))
        with torch.no_grad():
            forward(params, x, True, False)


def model_unbatchable(model_cfg: dict, split: Split, device: torch.device) -> str | None:
    """Why ``model_cfg`` cannot be trained as a population on ``device`` (None if it can)."""
    key = json.dumps([model_cfg, list(split.input_shape), split.n_classes, device.type],
                     sort_keys=True, default=str)
    if key not in _model_checks:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model = trainer.init_model(model_cfg, split, 0, device)
        reason = None
        buffers = [name for name, _ in model.named_buffers()]
        if buffers:
            reason = (f"model {model_cfg['name']} has buffers ({buffers[0]}; e.g. BatchNorm "
                      f"running statistics) that a batched pass cannot update")
        else:
            try:
                _vmap_probe(model, split, device)
            except Exception as exc:  # noqa: BLE001 - any failure means "not batchable"
                first = (str(exc).splitlines() or [""])[0][:200]
                reason = (f"model {model_cfg['name']} fails as a batched population "
                          f"({type(exc).__name__}: {first})")
        _model_checks[key] = reason
    return _model_checks[key]


def _tree_population_source(loss_fns: list[losses.TreeLoss], live: tuple[int, ...],
                            shared_x: bool) -> str:
    """Source of ``_trees(inputs) -> [P, B, C]``: the trees of candidates ``live`` (in stacked
    order), each on its own slice of the shared inputs, then one stack.

    Per candidate the statements are those :meth:`losses.TreeLoss.forward` runs (same torch
    calls, same operand order), so batched and single values agree; candidate q's tree never
    touches p's slice (a NaN there would reach p's gradient through the backward pass).
    """
    used = {v for i in live for v in loss_fns[i].variables}
    need_logit = "logit" in used or any(not loss_fns[i].uses_prediction for i in live)
    lines = []
    if "x" in used:
        lines.append("x = inputs['x']" if shared_x else "xs = inputs['x'].unbind(0)")
    if "y" in used:
        lines.append("ys = inputs['y'].unbind(0)")
    if need_logit:
        lines.append("ls = inputs['logit'].unbind(0)")
    results = []
    for j, i in enumerate(live):
        fn = loss_fns[i]
        names = {"x": "x" if shared_x else f"x{j}", "y": f"y{j}", "logit": f"l{j}"}
        for v in fn.variables:
            if v != "x" or not shared_x:
                lines.append(f"{names[v]} = {v[0]}s[{j}]")
        if not fn.uses_prediction:
            lines.append(f"l{j} = ls[{j}]")
        body, out = tree.tree_source(fn.tree, fn.coefficients, names, prefix=f"_t{j}_")
        lines += body
        if not fn.variables:
            out = f"torch.full_like(l{j}, {out})"
        if not fn.uses_prediction:
            out = f"torch.add({out}, torch.mul(l{j}, 0.0))"
        lines.append(f"r{j} = {out}")
        results.append(f"r{j}")
    lines.append(f"return torch.stack([{', '.join(results)}])")
    return "def _trees(inputs):\n" + "".join(f"    {line}\n" for line in lines)


def _stacked_tree_loss(loss_fns: list[nn.Module],
                       device: torch.device | None) -> tuple[Callable, list[torch.Tensor]]:
    """The population loss of GLO trees that may all differ (see :func:`_stacked_loss`).

    x (one-hot), y (softmax) and logit are computed once for the stacked logits; one generated
    function runs every candidate's tree on its slice and stacks the values; one reduction
    follows. ``extra`` is the candidates' index vector, which ``_Population.keep`` shrinks with
    the stack, so the function knows whose trees are still running (regenerated on change).
    """
    if not all(isinstance(f, losses.TreeLoss) for f in loss_fns) or len(
            {f.class_reduction for f in loss_fns}) > 1:
        raise ValueError("a population's tree losses must share the class reduction")
    red = loss_fns[0].class_reduction
    variables = tuple(v for v in tree.VARIABLES if any(v in f.variables for f in loss_fns))
    if not all(f.uses_prediction for f in loss_fns) and "logit" not in variables:
        variables += ("logit",)  # the zero gradient of a tree without y or logit
    compiled: dict[tuple, Callable] = {}
    current: list = [None, ()]  # the index tensor last seen, and its candidates

    def trees_for(live: tuple[int, ...], shared_x: bool) -> Callable:
        key = (live, shared_x)
        if key not in compiled:
            namespace = {"torch": torch, "_nan": math.nan, "_inf": math.inf}
            source = _tree_population_source(loss_fns, live, shared_x)
            exec(compile(source, "<population loss trees>", "exec"), namespace)  # noqa: S102
            compiled[key] = namespace["_trees"]
        return compiled[key]

    def tree_fn(logits, y, extra, progress):
        (index,) = extra
        if current[0] is not index:  # the population shrank (or first call): one host sync
            current[:] = [index, tuple(index.tolist())]
        inputs = losses.tree_inputs(logits, y, variables)
        f = trees_for(current[1], y.dim() == 1)(inputs)
        return losses._class_reduce(-f, red)

    return tree_fn, [torch.arange(len(loss_fns), device=device)]


def _stacked_loss(loss_fns: list[nn.Module],
                  device: torch.device | None = None) -> tuple[Callable, list[torch.Tensor]]:
    """A population loss ``f(logits, y, extra, progress) -> [P]`` and its stacked ``extra``.

    ``logits`` is [P, B, C]; ``y`` is [B] (a shared batch) or [P, B]. Taylor losses are computed
    directly on the stacked tensors (θ broadcast as [P, 1, 1, n]: elementwise the same
    arithmetic as one candidate's, without vmap's per-op cost); GLO trees, different or not, by
    :func:`_stacked_tree_loss`; other kinds, which hold no per-candidate tensors, are vmapped.
    """
    first = loss_fns[0]
    if isinstance(first, losses.TreeLoss):
        return _stacked_tree_loss(loss_fns, device)
    if isinstance(first, losses.Taylor):
        settings = {(f.layout, f.class_reduction) for f in loss_fns}
        if len(settings) > 1 or not all(isinstance(f, losses.Taylor) for f in loss_fns):
            raise ValueError("a population's Taylor losses must share order, variables, reduction")
        centres = torch.stack([f.centres for f in loss_fns])[:, None, None, :]
        coefs = torch.stack([f.coefs for f in loss_fns])[:, None, None, :]
        lay, red = first.layout, first.class_reduction

        def taylor_fn(logits, y, extra, progress):
            c, k = extra
            return losses.taylor_loss(logits, y, c.to(logits.dtype), k.to(logits.dtype), lay, red,
                                      progress)

        return taylor_fn, [centres, coefs]

    def settings(f: nn.Module) -> tuple:
        return (type(f), *(v for k, v in sorted(vars(f).items()) if not k.startswith("_")))

    if len({settings(f) for f in loss_fns}) > 1 or any(
        next(f.parameters(), None) is not None or next(f.buffers(), None) is not None
        for f in loss_fns
    ):
        raise ValueError("a population's losses must be one kind with one setting and no state")
    shared = vmap(first, in_dims=(0, None))
    gathered = vmap(first, in_dims=(0, 0))

    def fixed_fn(logits, y, extra, progress):
        return (gathered if y.dim() == 2 else shared)(logits, y)

    return fixed_fn, []


def _mlp_forward(model: nn.Module) -> Callable | None:
    """A batched forward for a plain MLP (Flatten/Linear/ReLU/Dropout), else None.

    ``f(params, x, shared, training)`` takes the stacked parameters and x of [B, ...] (shared)
    or [P, B, ...] and returns [P, B, C], using ``baddbmm`` directly: the same per-candidate
    arithmetic as ``vmap(functional_call)``, with a fraction of its per-op cost.
    """
    if type(model) is not nn.Sequential:
        return None
    plan: list[tuple] = []
    for name, m in model.named_children():
        if type(m) is nn.Linear:
            bias = f"{name}.bias" if m.bias is not None else None
            plan.append(("linear", f"{name}.weight", bias))
        elif type(m) is nn.ReLU:
            plan.append(("relu",))
        elif type(m) is nn.Dropout:
            plan.append(("dropout", m.p))
        elif type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
            plan.append(("flatten",))
        elif type(m) is not nn.Identity:
            return None
    if not any(op[0] == "linear" for op in plan):
        return None

    def forward(params: dict, x: torch.Tensor, shared: bool, training: bool) -> torch.Tensor:
        n_cand = next(iter(params.values())).shape[0]
        h, batched = x, not shared
        for op in plan:
            if op[0] == "flatten":
                h = h.flatten(2 if batched else 1)
            elif op[0] == "relu":
                h = torch.relu(h)
            elif op[0] == "dropout":
                if training and op[1] > 0:
                    if not batched:
                        h, batched = h.expand(n_cand, *h.shape), True
                    h = F.dropout(h, op[1], training=True)
            else:
                w = params[op[1]]
                if not batched:
                    h, batched = h.expand(n_cand, *h.shape), True
                if op[2] is None:
                    h = torch.bmm(h, w.transpose(1, 2))
                else:
                    h = torch.baddbmm(params[op[2]].unsqueeze(1), h, w.transpose(1, 2))
        return h

    return forward


def _population_forward(model: nn.Module) -> Callable:
    """``f(params, x, shared, training) -> [P, B, C]`` for stacked copies of ``model``.

    ``shared``: x is one batch [B, ...] for every candidate, else [P, B, ...]. Plain MLPs use
    :func:`_mlp_forward`; anything else ``vmap(functional_call)`` with independent randomness.
    """
    fast = _mlp_forward(model)
    if fast is not None:
        return fast
    base = copy.deepcopy(model).to("meta")

    def one(p: dict, xx: torch.Tensor) -> torch.Tensor:
        return functional_call(base, p, (xx,))

    on_shared = vmap(one, in_dims=(0, None), randomness="different")
    on_own = vmap(one, in_dims=(0, 0), randomness="different")

    def forward(params: dict, x: torch.Tensor, shared: bool, training: bool) -> torch.Tensor:
        base.train(training)
        return (on_shared if shared else on_own)(params, x)

    return forward


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


class _Population:
    """Stacked weights, momentum buffers and loss tensors of the still-running candidates."""

    def __init__(self, models: list[nn.Module], extra: list[torch.Tensor], seeds: list[int]):
        params, _ = stack_module_state(models)
        self.names = list(params)
        self.params = [params[k] for k in self.names]
        self.bufs: list[torch.Tensor] | None = None
        self.extra = extra
        self.seeds = list(seeds)
        self.live = list(range(len(models)))  # candidate index of each stacked slice

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.params, strict=True))

    def keep(self, slices: list[int]) -> None:
        """Drop every stacked slice not in ``slices`` (stopped candidates)."""
        sel = torch.tensor(slices, dtype=torch.long, device=self.params[0].device)
        self.params = [p.detach()[sel].requires_grad_() for p in self.params]
        if self.bufs is not None:
            self.bufs = [b[sel] for b in self.bufs]
        self.extra = [e[sel] for e in self.extra]
        self.seeds = [self.seeds[j] for j in slices]
        self.live = [self.live[j] for j in slices]


@torch.no_grad()
def _accuracies(forward: Callable, params: dict, x: torch.Tensor, y: torch.Tensor,
                device: torch.device) -> list[float]:
    """Top-1 accuracy of every stacked candidate; non-finite logits count as wrong."""
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
) -> list[dict]:
    """Train ``loss_fns[i]`` with ``seeds[i]`` for all i in one batched computation.

    The losses must be of one kind and setting, or all GLO trees with one class reduction (see
    :func:`loss_group`), and the model must be
    batchable (see :func:`model_unbatchable`); :func:`train_many` checks both. Returns one
    :func:`trainer.train` result per candidate.
    """
    if len(loss_fns) != len(seeds):
        raise ValueError(f"{len(loss_fns)} losses but {len(seeds)} seeds")
    device = device or split.x_train.device
    full = recipe["steps"]
    steps = steps or full
    scale = steps / full
    sched = dict(recipe, milestones=[round(m * scale) for m in recipe.get("milestones", [])])
    momentum = recipe.get("momentum", 0.0)
    weight_decay = recipe.get("weight_decay", 0.0)
    nesterov = recipe.get("nesterov", False)
    if nesterov and momentum <= 0:
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    abort_step = None
    if abort and abort.get("epoch") is not None:
        per_epoch = trainer.steps_per_epoch(len(split.y_train), recipe["batch_size"])
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
    del built

    results = [{"seed": s, "steps": steps, "status": "ok", "reason": None} for s in seeds]

    x, y = split.x_train, split.y_train
    streams = {s: trainer.batch_indices(len(y), recipe["batch_size"], steps, s) for s in set(seeds)}
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
        if len(set(pop.seeds)) == 1:
            idx, shared = batch[pop.seeds[0]].to(x.device), True
        else:
            idx, shared = torch.stack([batch[s] for s in pop.seeds]).to(x.device), False
        xb, yb = x[idx].to(device), y[idx].to(device)
        progress = step / steps
        if on_device:  # a CPU tensor of t would not mix with the device's tensors
            progress = torch.tensor(progress, device=device)
        loss = loss_fn(forward(pop.as_dict(), xb, shared, True), yb, pop.extra, progress)
        finite = torch.isfinite(loss)
        newly = active & ~finite
        bad_step = torch.where(newly, step, bad_step)
        bad_loss = torch.where(newly, loss.detach().to(bad_loss.dtype), bad_loss)
        active = active & finite
        # Mask before summing: a stopped candidate's NaN must not reach the total.
        total = torch.where(active, loss, torch.zeros_like(loss)).sum()
        grads = list(torch.autograd.grad(total, pop.params))
        with torch.no_grad():
            if weight_decay != 0:
                grads = torch._foreach_add(grads, pop.params, alpha=weight_decay)
            if momentum != 0:
                if pop.bufs is None:
                    pop.bufs = [g.detach().clone() for g in grads]
                else:
                    torch._foreach_mul_(pop.bufs, momentum)
                    torch._foreach_add_(pop.bufs, grads)
                if nesterov:
                    grads = torch._foreach_add(grads, pop.bufs, alpha=momentum)
                else:
                    grads = pop.bufs
            torch._foreach_add_(pop.params, grads, alpha=-lr)
        last_loss = loss.detach()
        check_abort = abort_step is not None and step + 1 == abort_step < steps
        if check_abort or (step + 1) % sync_every == 0 or step + 1 == steps:
            stop_nonfinite()
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
    return results


def candidate_cost(model_cfg: dict, split: Split, batch_size: int) -> tuple[int, int]:
    """(bytes, MACs) of one candidate's training step, estimated on the meta device.

    Bytes: weights ×4 (weights, gradients, momentum, update temporaries) plus activations ×3
    (forward, saved for backward, gradients), float32. MACs: forward multiply-accumulates of the
    linear and convolution layers for one batch.
    """
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    with torch.device("meta"):
        model = models.build(model_cfg["name"], split.input_shape, split.n_classes, **kwargs)
        acts, macs = [0], [0]

        def count(module, inputs, output):
            if isinstance(output, torch.Tensor) and not list(module.children()):
                acts[0] += output.numel()
                if isinstance(module, nn.Linear):
                    macs[0] += output.numel() * module.in_features
                elif isinstance(module, nn.modules.conv._ConvNd):
                    per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
                    macs[0] += output.numel() * per_out

        hooks = [m.register_forward_hook(count) for m in model.modules()]
        model(torch.empty(batch_size, *split.input_shape))
        for h in hooks:
            h.remove()
    n_params = sum(p.numel() for p in model.parameters())
    return 4 * (4 * n_params + 3 * acts[0]), macs[0]


def _population_cap(model_cfg: dict, split: Split, batch_size: int, device: torch.device,
                    max_population: int | None, forced: bool) -> int:
    """Candidates per batched pass: ``max_population``, else the default bounded by memory and,
    on the CPU (unless ``forced``), 1 for models whose compute, not overhead, dominates a step."""
    n_bytes, macs = candidate_cost(model_cfg, split, batch_size)
    if device.type == "cpu" and macs > CPU_MAX_BATCHED_MACS and not forced:
        _note_once(f"model {model_cfg['name']} is compute-bound on the CPU ({macs / 1e6:.0f}M "
                   f"MACs a step): training candidates one after another")
        return 1
    if max_population is not None:
        return max(1, max_population)
    budget = STATE_BUDGET_BYTES
    if device.type == "cuda":
        budget = max(budget, torch.cuda.get_device_properties(device).total_memory // 4)
    return max(1, min(DEFAULT_MAX_POPULATION, budget // max(1, n_bytes)))


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
) -> list[dict]:
    """Train ``specs[i]`` with ``seeds[i]``; return one :func:`trainer.train` result per pair.

    Candidates whose losses batch together (:func:`loss_group`) are trained as populations of at
    most ``max_population`` (default :data:`DEFAULT_MAX_POPULATION`, lowered for big models);
    the rest, and everything when the model cannot be batched, one after another.
    ``batched=False`` forces the sequential trainer; None (default) batches where possible and
    worthwhile; ``True`` also batches models :data:`CPU_MAX_BATCHED_MACS` keeps sequential.
    """
    if len(specs) != len(seeds):
        raise ValueError(f"{len(specs)} specs but {len(seeds)} seeds")
    dev = torch.device(device) if device is not None else split.x_train.device
    specs = [_as_dict(s) for s in specs]

    def sequential(i: int) -> dict:
        return trainer.train(model_cfg, split, losses.build(specs[i]), recipe, seeds[i],
                             steps=steps, abort=abort, device=device,
                             evaluate_test=evaluate_test)

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
            reason = model_unbatchable(model_cfg, split, dev)
            if reason is not None:
                _warn_once(reason)
                solo += [i for g in groups.values() for i in g]
                groups = {}
    if any(len(g) > 1 for g in groups.values()):
        cap = _population_cap(model_cfg, split, recipe["batch_size"], dev, max_population,
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
                evaluate_test=evaluate_test,
            )
            for i, r in zip(chunk, out, strict=True):
                results[i] = r
    for i in sorted(solo):
        results[i] = sequential(i)
    return results
