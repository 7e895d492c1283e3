"""Accuracy basins: accuracy along filter-normalised random directions in weight space.

Li et al. 2018 ("Visualizing the loss landscape of neural nets") plot a network's performance at
``θ + α·d`` for a random direction ``d``. Because ReLU networks are invariant to rescaling a
filter's incoming weights (and the next layer's), a raw Gaussian ``d`` would perturb small-norm
filters relatively more than large ones, so curves of different models would not compare.
*Filter normalisation* rescales every filter of ``d`` to the norm of the matching filter of θ.
The regularization paper (§V-B, Fig. 6) plots such accuracy curves over α ∈ [−1, 1] for models
trained with different losses: a wider, flatter basin at equal peak accuracy is read as a more
robust solution. The paper gives no numbers, so :func:`width` and :func:`drop_at` provide summary
values that compare in a table (across losses, over seeds, with a Welch test).

As in the authors' released code (``xignore='biasbn'``), parameters of dim ≤ 1 (biases,
normalisation scales/shifts) get a zero direction: only weight matrices and filters move.
Buffers (e.g. BatchNorm running statistics) are never perturbed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lossevo.training.trainer import accuracy

Direction = dict[str, torch.Tensor]

#: Mixed into the direction seeds so they never coincide with the trainer's seeded streams.
_SEED_TAG = 0xBA51


def random_direction(model: nn.Module, generator: torch.Generator) -> Direction:
    """A standard Gaussian direction for every parameter of ``model``, keyed by parameter name.

    Draws come from ``generator`` (a CPU generator) in ``named_parameters`` order and are then
    moved to each parameter's device and dtype, so the same generator state gives the same
    direction on CPU and CUDA, and for any two models of one architecture.
    """
    return {name: torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
            for name, p in model.named_parameters()}


def filter_normalize(direction: Direction, model: nn.Module, eps: float = 1e-10) -> Direction:
    """Li et al.'s filter normalisation of ``direction`` to ``model``'s weights (a new dict).

    For a parameter of dim ≥ 2, each filter, the slice along dim 0 (a conv output channel, or a
    linear layer's output row), becomes ``d_f · ‖θ_f‖ / (‖d_f‖ + eps)`` (``eps`` as in Li et al.'s
    code). Parameters of dim ≤ 1 get zeros (not perturbed). Names missing from ``direction`` are
    left out (not perturbed by :func:`basin_1d`/:func:`basin_2d`).
    """
    params = dict(model.named_parameters())
    out: Direction = {}
    for name, d in direction.items():
        w = params[name].detach()
        if w.dim() <= 1:
            out[name] = torch.zeros_like(w)
            continue
        d = d.to(w.device, w.dtype)
        d_norm = d.flatten(1).norm(dim=1)
        w_norm = w.flatten(1).norm(dim=1)
        scale = (w_norm / (d_norm + eps)).view(-1, *([1] * (w.dim() - 1)))
        out[name] = d * scale
    return out


def direction_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded by ``(seed, index)``: direction ``index`` of training seed ``seed``."""
    state = np.random.SeedSequence([_SEED_TAG, int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def directions_for_seed(model: nn.Module, seed: int, k: int = 1, normalize: bool = True) -> list[Direction]:
    """``k`` directions for a model trained with ``seed``: raw draws fixed by (seed, index).

    Every loss retrained with the same seed thus gets the same raw Gaussian draws, each then
    filter-normalised to its own weights (``normalize=False`` returns the raw draws): differences
    between the losses' basins are not differences between random directions.
    """
    raw = [random_direction(model, direction_generator(seed, i)) for i in range(k)]
    return [filter_normalize(d, model) for d in raw] if normalize else raw


def _evaluate_grid(model: nn.Module, dirs: Sequence[Direction], coords: Sequence[Sequence[float]],
                   x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[float]:
    """Accuracy at θ + Σ_j c_j·d_j for every coordinate tuple c; θ restored exactly afterwards."""
    params = dict(model.named_parameters())
    names = sorted(set().union(*dirs) if dirs else set())
    base = {n: params[n].detach().clone() for n in names}
    accs: list[float] = []
    try:
        for c in coords:
            with torch.no_grad():
                for n in names:
                    p = params[n]
                    p.copy_(base[n])
                    for coef, d in zip(c, dirs):
                        if n in d and coef != 0.0:
                            p.add_(d[n].to(p.device, p.dtype), alpha=float(coef))
            accs.append(accuracy(model, x, y, batch_size))
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(base[n])
    return accs


def basin_1d(model: nn.Module, direction: Direction, x: torch.Tensor, y: torch.Tensor,
             alphas: Sequence[float], batch_size: int = 2048) -> list[float]:
    """Accuracy at ``θ + α·direction`` for each α (in order); the weights are restored afterwards.

    Accuracy is ``trainer.accuracy`` (eval mode, batched on the data's device), so the point
    α = 0 equals the model's accuracy on ``(x, y)`` exactly.
    """
    return _evaluate_grid(model, [direction], [(a,) for a in alphas], x, y, batch_size)


def basin_2d(model: nn.Module, d1: Direction, d2: Direction, x: torch.Tensor, y: torch.Tensor,
             alphas: Sequence[float], betas: Sequence[float] | None = None,
             batch_size: int = 2048) -> list[list[float]]:
    """Accuracy grid ``acc[i][j]`` at ``θ + α_i·d1 + β_j·d2`` (``betas`` defaults to ``alphas``)."""
    betas = list(alphas) if betas is None else list(betas)
    flat = _evaluate_grid(model, [d1, d2], [(a, b) for a in alphas for b in betas], x, y, batch_size)
    return [flat[i * len(betas) : (i + 1) * len(betas)] for i in range(len(alphas))]


def _curve(alphas: Sequence[float], accs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (α, accuracy) arrays; the grid must be distinct and bracket α = 0."""
    a, v = np.asarray(alphas, dtype=float), np.asarray(accs, dtype=float)
    if a.ndim != 1 or a.shape != v.shape or len(a) < 2:
        raise ValueError("basin curve: alphas and accs must be 1-D of the same length >= 2")
    order = np.argsort(a)
    a, v = a[order], v[order]
    if np.any(np.diff(a) <= 0):
        raise ValueError("basin curve: alphas must be distinct")
    if not a[0] <= 0.0 <= a[-1]:
        raise ValueError("basin curve: alphas must bracket 0")
    return a, v


def _edge(a: np.ndarray, v: np.ndarray, threshold: float) -> float:
    """Distance from 0 to where the outward curve (a[0] = 0, |a| increasing) first drops below threshold."""
    for i in range(1, len(a)):
        if v[i] < threshold:
            t = (threshold - v[i - 1]) / (v[i] - v[i - 1])
            return float(abs(a[i - 1] + t * (a[i] - a[i - 1])))
    return float(abs(a[-1]))


def width(alphas: Sequence[float], accs: Sequence[float], frac: float = 0.9) -> float:
    """Basin width: length of the contiguous α-interval around 0 where accuracy ≥ frac × acc(0).

    Walking outwards from α = 0 on each side, the edge is where the piecewise-linear interpolation
    of the curve first falls below the threshold (a later recovery does not count: contiguous). If
    the curve never falls below it, the edge is the end of the grid, so the width is then a lower
    bound (widen the grid). acc(0) is interpolated when 0 is not a grid point. Wider is flatter.
    """
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"width: frac must be in (0, 1], got {frac}")
    a, v = _curve(alphas, accs)
    v0 = float(np.interp(0.0, a, v))
    threshold = frac * v0
    right, left = a > 0, a < 0
    r = _edge(np.r_[0.0, a[right]], np.r_[v0, v[right]], threshold)
    l_ = _edge(np.r_[0.0, a[left][::-1]], np.r_[v0, v[left][::-1]], threshold)
    return r + l_


def drop_at(alphas: Sequence[float], accs: Sequence[float], radius: float = 0.5) -> float:
    """acc(0) − mean(acc(−radius), acc(+radius)), linearly interpolated: the basin's sharpness.

    A robust, grid-independent number for a table: 0 for a flat basin, larger for a sharper one.
    ``radius`` must lie within the grid on both sides.
    """
    a, v = _curve(alphas, accs)
    if not 0.0 < radius <= min(-a[0], a[-1]):
        raise ValueError(f"drop_at: radius {radius} is outside the grid [{a[0]}, {a[-1]}]")
    at = np.interp([-radius, 0.0, radius], a, v)
    return float(at[1] - (at[0] + at[2]) / 2)
