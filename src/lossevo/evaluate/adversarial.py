"""FGSM robustness: test accuracy under the fast gradient sign attack.

FGSM (Goodfellow et al. 2015, "Explaining and harnessing adversarial examples"; the
regularization paper §V-A, which calls it the "Fixed Gradient Sign Method"; dissertation §7.3)
moves every input one step of size ε along the sign of the loss gradient with respect to the
input, ``x_adv = clamp(x + ε·sign(∇_x L(f(x), y)), 0, 1)``, and measures accuracy on ``x_adv``. It
is a white-box, single-step attack: a loss whose models are more accurate under it has learned a
function that is less sensitive to small worst-case input changes.

Inputs are stored already normalised (:mod:`lossevo.data`): ``x = (x_pix − mean) / std`` per
channel. The step and the clamp live in **pixel space**, ``x_pix ∈ [0, 1]``; the perturbed image
is then normalised again for the model. ε has two units (``epsilon_space``): ``pixel``, a step of ε
on [0, 1] pixels (Goodfellow et al.; comparable across datasets), or ``normalized``, a step of ε on
the normalised input, i.e. ε·std pixels per channel: the unit of the authors' released code and of
its ε grid (on CIFAR-10, std ≈ 0.25, so ε = 0.1 normalised ≈ 0.025 pixels, and 0.1 pixels ≈ 0.4
normalised). That code also clamps the *normalised* inputs to [0, 1] (every pixel below its
channel mean is set to the mean and every one above mean + std to mean + std, attacked or not): a
known bug, not reproduced here; the clamp is always to the valid pixel range. For data stored
without normalisation (digits, MNIST and ``normalize: none``: mean 0, std 1) the two units agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lossevo.data import DATASETS, torchvision_sets
from lossevo.errors import LossevoError

#: The FGSM strengths of the authors' released code (its commented-out grid; 0.1 is its default),
#: in normalised units (``epsilon_space: normalized``).
AUTHORS_EPSILONS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
#: The units ε can be given in (see the module docstring).
EPSILON_SPACES = ("pixel", "normalized")

Stat = torch.Tensor | float


def pixel_stats(data_cfg: str | dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, std)`` in [0, 1] pixel units, each of shape [C, 1, 1].

    These invert the normalisation :func:`lossevo.data.load` applied for ``data_cfg`` (the
    ``data`` block, or a dataset name with its default normalisation): CIFAR and SVHN use
    ``CHANNEL_STATS / 255`` unless ``normalize: none``; digits and MNIST are stored as raw pixels
    (mean 0, std 1).
    """
    cfg = {"dataset": data_cfg} if isinstance(data_cfg, str) else data_cfg
    name = cfg["dataset"]
    if name not in DATASETS:
        raise LossevoError(f"pixel_stats: dataset {name!r} is unknown (choose from {', '.join(DATASETS)})")
    stats = torchvision_sets.normalization(name, cfg.get("normalize")) if name != "digits" else None
    if stats is None:
        return torch.zeros(1, 1, 1), torch.ones(1, 1, 1)
    mean, std = (torch.from_numpy(v).view(-1, 1, 1) / 255.0 for v in stats)
    return mean, std


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate in eval mode (no dropout, BN running statistics); restore the caller's flag after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _stat(v: Stat, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=x.dtype, device=x.device)


def gradient_sign(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  attack_loss: nn.Module | None = None) -> torch.Tensor:
    """``sign(∇_x L(model(x), y))`` for one batch, in the model's current train/eval mode.

    ``L`` is cross-entropy by default, or ``attack_loss`` (any ``loss(logits, targets)`` module,
    e.g. the model's own training loss as in the authors' code). Only the input gradient is
    computed (``torch.autograd.grad``), so no parameter ``.grad`` is touched. The gradient with
    respect to the normalised input is the pixel gradient times ``1/std`` (std > 0), so both have
    the same sign. A batch-mean loss scales every sample's gradient by 1/B, which leaves signs alone
    (samples do not interact in eval mode). Non-finite gradient entries count as 0 (no step).
    """
    x_req = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_req)
        loss = F.cross_entropy(logits, y) if attack_loss is None else attack_loss(logits, y)
        (grad,) = torch.autograd.grad(loss, x_req)
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0).sign()


def pixel_step(epsilon: float, std: torch.Tensor, epsilon_space: str = "pixel") -> torch.Tensor | float:
    """The FGSM step in [0, 1] pixel units: ε (``pixel``) or ε·std per channel (``normalized``)."""
    if epsilon_space not in EPSILON_SPACES:
        raise ValueError(f"fgsm: epsilon_space must be one of {EPSILON_SPACES}, got {epsilon_space!r}")
    return epsilon * std if epsilon_space == "normalized" else epsilon


def _perturb(x: torch.Tensor, sign: torch.Tensor, step: torch.Tensor | float, mean: torch.Tensor,
             std: torch.Tensor) -> torch.Tensor:
    """Un-normalise, step ``step``·sign (pixel units) and clamp to [0, 1], normalise again."""
    x_pix = (x * std + mean + step * sign).clamp_(0.0, 1.0)
    return (x_pix - mean) / std


def fgsm_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float,
                pixel_mean: Stat, pixel_std: Stat, attack_loss: nn.Module | None = None,
                epsilon_space: str = "pixel") -> torch.Tensor:
    """The FGSM-perturbed batch, normalised like ``x`` (ready for the model).

    ``x * std + mean`` of the result lies in [0, 1]. ``pixel_mean``/``pixel_std`` broadcast against
    ``x`` ([C, 1, 1] tensors from :func:`pixel_stats` for images, or scalars). ε is in
    ``epsilon_space`` units (:func:`pixel_step`). The gradient is taken in eval mode; the model's
    train/eval flag is restored afterwards.
    """
    if epsilon < 0:
        raise ValueError(f"fgsm: epsilon must be >= 0, got {epsilon}")
    mean, std = _stat(pixel_mean, x), _stat(pixel_std, x)
    step = pixel_step(float(epsilon), std, epsilon_space)
    with _eval_mode(model):
        sign = gradient_sign(model, x, y, attack_loss)
    return _perturb(x.detach(), sign, step, mean, std)


@torch.no_grad()
def _n_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Correct top-1 predictions; non-finite logits count as wrong (as ``trainer.accuracy``)."""
    logits = model(x)
    ok = torch.isfinite(logits).all(dim=1)
    return int(((logits.argmax(dim=1) == y) & ok).sum())


def fgsm_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: Sequence[float],
                  pixel_mean: Stat, pixel_std: Stat, attack_loss: nn.Module | None = None,
                  batch_size: int = 1000, epsilon_space: str = "pixel") -> list[float]:
    """Top-1 accuracy on FGSM-perturbed ``x`` for each ε in ``epsilons`` (same order), ε in
    ``epsilon_space`` units (:func:`pixel_step`).

    ``x``/``y`` are a normalised evaluation set (e.g. ``split.x_test``), processed in batches of
    ``batch_size`` on their own device (the model must live there too). Per batch the input
    gradient is computed once and reused for every ε (it does not depend on ε). ε = 0 evaluates
    the clean inputs unchanged, so it equals ``trainer.accuracy`` exactly (no un-/re-normalising
    round-off): the "no attack" point of the regularization paper's Fig. 5.

    The attacker differentiates cross-entropy by default (a fixed attack, the same for every
    loss compared), or ``attack_loss``: passing each model's own training loss reproduces the
    authors' code; the attack then differs between the losses compared, and a loss whose input
    gradient vanishes or saturates weakens its own attack (gradient masking). For losses that
    read ``progress``, set it (e.g. 1.0, the end of training) before calling. The model runs in
    eval mode, its train/eval flag is restored, and no parameter gradient is accumulated.
    """
    eps = [float(e) for e in epsilons]
    if any(e < 0 for e in eps):
        raise ValueError(f"fgsm: epsilons must be >= 0, got {eps}")
    if attack_loss is not None:
        attack_loss = attack_loss.to(x.device)
    mean, std = _stat(pixel_mean, x), _stat(pixel_std, x)
    steps = [pixel_step(e, std, epsilon_space) for e in eps]
    correct = [0] * len(eps)
    with _eval_mode(model):
        for i in range(0, len(y), batch_size):
            xb, yb = x[i : i + batch_size].detach(), y[i : i + batch_size]
            sign = None
            for k, e in enumerate(eps):
                if e == 0.0:
                    correct[k] += _n_correct(model, xb, yb)
                    continue
                if sign is None:
                    sign = gradient_sign(model, xb, yb, attack_loss)
                correct[k] += _n_correct(model, _perturb(xb, sign, steps[k], mean, std), yb)
    n = max(1, len(y))
    return [c / n for c in correct]
