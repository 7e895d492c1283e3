"""Population losses: one per-candidate loss vector ``[P]`` for stacked logits ``[P, B, C]``.

Which specs batch together (:func:`loss_group`), and the stacked loss functions
:func:`lossevo.training.population.train_population` calls: Taylor losses computed directly on
the stacked tensors, GLO trees (different or not) each on its own slice, other kinds vmapped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import vmap

from lossevo import losses
from lossevo.losses import tree

#: Loss kinds whose modules this module knows how to batch.
BATCHABLE_KINDS = ("cross_entropy", "label_smoothing", "baikal", "taylor", "tree", "baikal_cma",
                   "fast_logit")
#: Kinds built as :class:`losses.TreeLoss`: they batch together across different trees.
TREE_KINDS = ("tree", "baikal_cma", "fast_logit")


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
