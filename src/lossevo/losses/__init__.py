"""Loss specs (small JSON dicts) and ``build(spec) -> torch.nn.Module``.

Kinds: ``cross_entropy``; ``label_smoothing`` (alpha); ``baikal`` (GLO's
-(1/n) sum_i (log y_i - x_i / y_i)); ``taylor`` (TaylorGLO, see :mod:`lossevo.losses.taylor`);
``tree`` (a GLO expression tree, see :mod:`lossevo.losses.tree`) and the named trees
``baikal_cma`` (dissertation eq. 4.2) and ``fast_logit`` (eq. 4.5).
Every module is called as ``loss(logits, targets)`` with integer class targets and returns a
scalar, the mean over the batch, so it drops into any PyTorch training loop. Losses that use
training progress (``uses_progress``) read ``loss.progress`` (0..1), which the trainer sets each step.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lossevo.errors import LossevoError
from lossevo.losses import taylor, tree

KINDS = ("cross_entropy", "label_smoothing", "baikal", "taylor", "tree", "baikal_cma", "fast_logit")
CLASS_REDUCTIONS = ("sum", "mean")
_KEYS = {
    "cross_entropy": {"kind"},
    "label_smoothing": {"kind", "alpha"},
    "baikal": {"kind", "class_reduction"},
    "taylor": {"kind", "order", "theta", "convention", "variables", "class_reduction"},
    "tree": {"kind", "expr", "coefficients", "class_reduction", "leaves"},
    "baikal_cma": {"kind", "class_reduction"},
    "fast_logit": {"kind", "class_reduction"},
}
#: Default class reduction per kind: the Taylor and tree losses *sum* over classes as the
#: authors' TaylorGLO trainer does; the dissertation's fixed losses use its 1/n mean.
_DEFAULT_REDUCTION = {"baikal": "mean", "taylor": "sum", "tree": "sum", "baikal_cma": "mean",
                      "fast_logit": "mean"}
#: The named trees: (expression, coefficients, leaves).
NAMED_TREES = {
    "baikal_cma": (tree.BAIKAL, tree.BAIKAL_CMA_COEFFICIENTS, tree.DEFAULT_LEAVES),
    "fast_logit": (tree.FAST_LOGIT, None, tree.EXPANDED_LEAVES),
}
#: Softmax outputs are clamped below at this before a tree sees them (see :class:`TreeLoss`).
TREE_MIN_Y = 1e-30


def _class_reduce(per_class: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce [..., batch, classes] to a scalar per leading dim: classes by sum or mean, batch by mean."""
    red = per_class.sum(-1) if how == "sum" else per_class.mean(-1)
    return red.mean(-1)


class CrossEntropy(nn.Module):
    """Plain cross-entropy, -sum_c x_c log y_c averaged over the batch."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)


class LabelSmoothing(nn.Module):
    """Cross-entropy against (1 - alpha) one-hot + alpha / n_classes (PyTorch's convention)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.alpha)


class Baikal(nn.Module):
    """GLO's Baikal loss, -(1/n) sum_i (log y_i - x_i / y_i) (dissertation eq. 4.1).

    log y comes from log_softmax (no log(0)); x/y is computed as x * exp(-log y) with log y
    clamped at -30 so a vanishing true-class probability gives a huge, finite loss, not inf.
    """

    def __init__(self, class_reduction: str = "mean"):
        super().__init__()
        self.class_reduction = class_reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, dim=-1)
        x = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
        per_class = -(logp - x * torch.exp(-logp.clamp(min=-30.0)))
        return _class_reduce(per_class, self.class_reduction)


def taylor_inputs(
    logits: torch.Tensor, target: torch.Tensor, variables: tuple[str, ...], progress: float | torch.Tensor
) -> dict[str, torch.Tensor]:
    """The tensors a Taylor loss's variables name: x one-hot, y softmax, logit, t progress."""
    out: dict[str, torch.Tensor] = {}
    if "x" in variables:
        out["x"] = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    if "y" in variables:
        out["y"] = torch.softmax(logits, dim=-1)
    if "logit" in variables:
        out["logit"] = logits
    if "t" in variables:
        out["t"] = torch.as_tensor(progress, dtype=logits.dtype, device=logits.device).expand_as(logits)
    return out


def taylor_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    centres: torch.Tensor,
    coefs: torch.Tensor,
    lay: taylor.TaylorLayout,
    class_reduction: str = "sum",
    progress: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Functional TaylorGLO loss -reduce_classes f(x, y, ...), batch mean; vmap-able over θ."""
    f = taylor.polynomial(taylor_inputs(logits, target, lay.variables, progress), centres, coefs, lay)
    return _class_reduce(-f, class_reduction)


class Taylor(nn.Module):
    """A TaylorGLO loss from a parameter vector in the ``paper`` or ``code`` convention.

    Reduction: mean over the batch and, by default, the *sum* over classes, as in the authors'
    released trainer (the paper writes a 1/n mean; ``class_reduction: mean`` gives that). The sum
    keeps the plain cross-entropy baseline and the Taylor losses on one gradient scale.
    """

    def __init__(
        self,
        theta: list[float],
        order: int = 3,
        convention: str = "paper",
        variables: tuple[str, ...] | list[str] = taylor.DEFAULT_VARIABLES,
        class_reduction: str = "sum",
    ):
        super().__init__()
        self.layout = taylor.layout(order, variables)
        centres, coefs = taylor.split_theta(theta, self.layout, convention)
        self.register_buffer("centres", torch.tensor(centres, dtype=torch.float32))
        self.register_buffer("coefs", torch.tensor(coefs, dtype=torch.float32))
        self.class_reduction = class_reduction
        self.progress = 0.0
        #: Whether the loss reads ``progress`` (the trainer only updates it then).
        self.uses_progress = "t" in self.layout.variables

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return taylor_loss(
            logits, target, self.centres.to(logits.dtype), self.coefs.to(logits.dtype),
            self.layout, self.class_reduction, self.progress,
        )


def tree_inputs(logits: torch.Tensor, target: torch.Tensor,
                variables: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors a loss tree's leaves name: x one-hot, y softmax clamped at TREE_MIN_Y, logit.

    ``logits`` is [..., B, C] and ``target`` [..., B] (or [B], shared). With no variable, the
    logits alone (a constant tree takes their shape).
    """
    out: dict[str, torch.Tensor] = {}
    if "x" in variables:
        out["x"] = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    if "y" in variables:
        out["y"] = torch.softmax(logits, dim=-1).clamp(min=TREE_MIN_Y)
    if "logit" in variables or not variables:
        out["logit"] = logits
    return out


class TreeLoss(nn.Module):
    """A GLO loss tree f: loss = -reduce_classes f(x, y, logit), mean over the batch.

    ``y`` is the softmax clamped below at :data:`TREE_MIN_Y`: a probability that underflows to 0
    is float32's doing, not the tree's, and without the clamp x/y would be 0/0 = NaN for every
    such class. Nothing else is guarded: log of a negative or 0/0 inside the tree gives NaN and
    the trainer records the run as failed (GLO: NaN -> fitness 0). A tree without y or logit
    has no gradient; it gets a zero one (``+ 0 * logits``) so that training runs, and learns
    nothing. Class reduction: ``sum`` (default for kind ``tree``, as the authors' Taylor code) or
    ``mean`` (the dissertation's 1/n).
    """

    def __init__(self, expr: str, coefficients: list[float] | None = None, class_reduction: str = "sum",
                 leaves: tuple[str, ...] | list[str] = tree.DEFAULT_LEAVES):
        super().__init__()
        self.tree = tree.parse(expr, leaves)
        self.expr = tree.format_tree(self.tree)
        self.coefficients = None if coefficients is None else tuple(float(c) for c in coefficients)
        self.fn = tree.compile_tree(self.tree, self.coefficients)
        self.variables = tree.variables_used(self.tree)
        #: Whether the loss has a gradient of its own (else a zero one is attached).
        self.uses_prediction = any(v in tree.PREDICTIONS for v in self.variables)
        self.class_reduction = class_reduction

    def per_class(self, inputs: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """The tree's value [..., B, C] on ``inputs`` (see :func:`tree_inputs`)."""
        f = self.fn(inputs)
        return f if self.uses_prediction else f + logits * 0.0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        f = self.per_class(tree_inputs(logits, target, self.variables), logits)
        return _class_reduce(-f, self.class_reduction)


def _number(spec: dict, key: str, lo: float | None = None, hi: float | None = None) -> float:
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LossevoError(f"loss spec {spec.get('kind')}.{key} must be a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise LossevoError(f"loss spec {spec.get('kind')}.{key}={value} is outside [{lo}, {hi}]")
    return float(value)


def validate(spec: Any) -> dict:
    """Check a spec's kind, keys and values; return it normalised (defaults filled in)."""
    if not isinstance(spec, dict):
        raise LossevoError(f"loss spec must be a mapping, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise LossevoError(f"loss spec kind {kind!r} is unknown (choose from {list(KINDS)})")
    extra = set(spec) - _KEYS[kind]
    if extra:
        raise LossevoError(f"loss spec {kind} has unknown key {sorted(extra)[0]!r}")
    out = dict(spec)
    if kind == "label_smoothing":
        out["alpha"] = _number(spec, "alpha", 0.0, 1.0)
    if kind in _DEFAULT_REDUCTION:
        out["class_reduction"] = spec.get("class_reduction", _DEFAULT_REDUCTION[kind])
        if out["class_reduction"] not in CLASS_REDUCTIONS:
            raise LossevoError(
                f"loss spec {kind}.class_reduction must be one of {list(CLASS_REDUCTIONS)}, "
                f"got {out['class_reduction']!r}"
            )
    if kind == "taylor":
        out["order"] = spec.get("order", 3)
        if isinstance(out["order"], bool) or not isinstance(out["order"], int) or not 1 <= out["order"] <= 8:
            raise LossevoError(f"loss spec taylor.order must be an integer in 1..8, got {out['order']!r}")
        out["convention"] = spec.get("convention", "paper")
        variables = spec.get("variables", list(taylor.DEFAULT_VARIABLES))
        if not isinstance(variables, (list, tuple)) or not all(isinstance(v, str) for v in variables):
            raise LossevoError(f"loss spec taylor.variables must be a list of names, got {variables!r}")
        out["variables"] = list(variables)
        theta = spec.get("theta")
        if not isinstance(theta, list) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in theta
        ):
            raise LossevoError(f"loss spec taylor.theta must be a list of numbers, got {theta!r}")
        lay = taylor.layout(out["order"], out["variables"])
        taylor.split_theta(theta, lay, out["convention"])  # checks length and convention
        out["theta"] = [float(t) for t in theta]
    if kind == "tree":
        leaves = tree.check_leaves(spec.get("leaves", tree.DEFAULT_LEAVES))
        if not isinstance(spec.get("expr"), str):
            raise LossevoError(f"loss spec tree.expr must be a string in prefix syntax such as "
                               f"{tree.BAIKAL!r}, got {spec.get('expr')!r}")
        parsed = tree.parse(spec["expr"], leaves)
        coefficients = spec.get("coefficients")
        if coefficients is not None:
            coefficients = tree.check_coefficients(parsed, coefficients)
        out.update(expr=tree.format_tree(parsed), coefficients=coefficients, leaves=list(leaves))
    return out


def build(spec: dict | str) -> nn.Module:
    """Turn a loss spec (dict or JSON string) into a ``torch.nn.Module``."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise LossevoError(f"loss spec is not valid JSON: {exc.msg}") from None
    spec = validate(spec)
    kind = spec["kind"]
    if kind == "cross_entropy":
        return CrossEntropy()
    if kind == "label_smoothing":
        return LabelSmoothing(spec["alpha"])
    if kind == "baikal":
        return Baikal(spec["class_reduction"])
    if kind == "tree":
        return TreeLoss(spec["expr"], spec["coefficients"], spec["class_reduction"], spec["leaves"])
    if kind in NAMED_TREES:
        expr, coefficients, leaves = NAMED_TREES[kind]
        return TreeLoss(expr, coefficients, spec["class_reduction"], leaves)
    return Taylor(
        spec["theta"], spec["order"], spec["convention"], spec["variables"], spec["class_reduction"]
    )


def describe(spec: dict) -> str:
    """A short human-readable label for tables and plots."""
    kind = spec["kind"]
    if kind == "label_smoothing":
        return f"label smoothing (alpha={spec['alpha']:g})"
    if kind == "taylor":
        return f"Taylor k={spec.get('order', 3)}"
    if kind == "tree":
        return describe_tree(spec)
    return {"cross_entropy": "cross-entropy", "baikal": "Baikal", "baikal_cma": "BaikalCMA",
            "fast_logit": "FastLogit"}[kind]


def describe_tree(spec: dict, width: int = 48) -> str:
    """A tree spec's label: its infix formula (sympy's str), cut to ``width`` characters;
    ``(tuned)`` when it has coefficients."""
    parsed = tree.parse(spec["expr"], spec.get("leaves", tree.DEFAULT_LEAVES))
    text = tree.infix(parsed)
    if len(text) > width:
        text = text[: width - 3] + "..."
    return f"tree {text}" + (" (tuned)" if spec.get("coefficients") is not None else "")
