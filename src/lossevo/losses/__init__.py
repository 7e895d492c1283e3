"""Loss specs (small JSON dicts) and ``build(spec) -> torch.nn.Module``.

Kinds: ``cross_entropy``; ``label_smoothing`` (alpha); ``baikal`` (GLO's
-(1/n) sum_i (log y_i - x_i / y_i)); ``taylor`` (TaylorGLO, see :mod:`lossevo.losses.taylor`).
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
from lossevo.losses import taylor

KINDS = ("cross_entropy", "label_smoothing", "baikal", "taylor")
CLASS_REDUCTIONS = ("sum", "mean")
_KEYS = {
    "cross_entropy": {"kind"},
    "label_smoothing": {"kind", "alpha"},
    "baikal": {"kind", "class_reduction"},
    "taylor": {"kind", "order", "theta", "convention", "variables", "class_reduction"},
}


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
    if kind in ("baikal", "taylor"):
        default = "mean" if kind == "baikal" else "sum"
        out["class_reduction"] = spec.get("class_reduction", default)
        if out["class_reduction"] not in CLASS_REDUCTIONS:
            raise LossevoError(
                f"loss spec {kind}.class_reduction must be one of {list(CLASS_REDUCTIONS)}, "
                f"got {out['class_reduction']!r}"
            )
    if kind == "taylor":
        out["order"] = spec.get("order", 3)
        out["convention"] = spec.get("convention", "paper")
        out["variables"] = list(spec.get("variables", taylor.DEFAULT_VARIABLES))
        theta = spec.get("theta")
        if not isinstance(theta, list) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in theta
        ):
            raise LossevoError(f"loss spec taylor.theta must be a list of numbers, got {theta!r}")
        lay = taylor.layout(out["order"], out["variables"])
        taylor.split_theta(theta, lay, out["convention"])  # checks length and convention
        out["theta"] = [float(t) for t in theta]
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
    return {"cross_entropy": "cross-entropy", "baikal": "Baikal"}[kind]
