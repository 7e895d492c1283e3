"""Data augmentation of in-memory training batches: random crop, flip, brightness, contrast, Cutout, CutMix.

The ops run in that order on a batch ``x`` [B, C, H, W] as the data stage stored it
(``training.augment`` in params.yaml; :func:`for_split` turns it into settings, None meaning no
augmentation):

* **crop** (padding p, size h×w): pad by p with the black-pixel value per channel
  (``Split.pixel_zero``, 0 where unset: torchvision pads the raw image before normalising), take
  an h×w window at a uniform offset in [0, H + 2p − h] × [0, W + 2p − w] per sample. The window is
  the model's input size: H×W, or ``data.crop`` where the evaluation images are central crops
  (the TensorFlow CIFAR-10 tutorial's random 24×24 crops of the 32×32 images, no padding).
* **flip**: mirror each sample left-right with probability 1/2.
* **brightness** (max_delta d) and **contrast** (lower, upper): TensorFlow's ``random_brightness``
  (add one δ ~ U[−d, d) per image) and ``random_contrast`` (per image a factor f ~ U[lower, upper),
  each channel scaled by f about its spatial mean), unclipped as in the tutorial, which applies
  them to raw pixels: use them with ``data.normalize: none``. Followed by a per-image
  standardization (the GLO CNN's first layer), brightness changes nothing: the tutorial's, too.
* **Cutout** (DeVries & Taylor 2017): per sample and hole, a length × length square centred at a
  uniform pixel (rows c − ⌊L/2⌋ … c − ⌊L/2⌋ + L − 1, the reference code's for even L), clipped at
  the border, set to 0 (applied after normalisation, as the reference).
* **CutMix** (Yun et al. 2019, their code): with probability ``prob`` per batch, λ ~ Beta(α, α), a
  box of sides ⌊H√(1−λ)⌋ × ⌊W√(1−λ)⌋ at a uniform centre (rows c − ⌊h/2⌋ … c + ⌊h/2⌋ − 1), clipped,
  pasted from a random permutation of the batch; λ becomes 1 − box area/(H·W) and the loss
  λ·L(out, y) + (1−λ)·L(out, y[perm]) (:func:`mixed_loss`).

Every random number is drawn on the CPU from ``torch.Generator``\\ s seeded by the training seed,
one per op and salted (independent of :func:`lossevo.training.trainer.batch_indices`, which uses
the bare seed), a fixed count per batch; the draws are then applied with exact tensor ops
(indexing, ``where``, masks) on x's device. An augmented batch is thus a pure function of (seed,
settings, step, batch) and bit-identical on CPU and GPU; turning one op on or off leaves the
others' draws unchanged.

Populations: a candidate's augmentation stream, like its batch order, is a function of its
training seed alone. Candidates that share a seed (a generation's common random numbers) see the
same augmented batches, so their losses are compared on equal data; candidates with their own
seeds get their own streams; a candidate sees the same batches whether trained alone or in a
population (the batched trainer keeps one :class:`Augmenter` per distinct seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from scipy.special import betaincinv

from lossevo.errors import LossevoError

#: The ops in the order they are applied.
OPS = ("crop", "flip", "brightness", "contrast", "cutout", "cutmix")
#: Each op's index in its generator's seed: fixed, so adding an op leaves the others' streams alone.
_SEED_INDEX = {"crop": 0, "flip": 1, "cutout": 2, "cutmix": 3, "brightness": 4, "contrast": 5}
#: Mixed into every op's seed so the streams differ from the batch-order generator's.
_SALT = 0x6C6F7373_61756721


class Batch(NamedTuple):
    """An augmented batch; ``y_mix`` None and ``lam`` 1.0 unless CutMix fired."""

    x: torch.Tensor
    y: torch.Tensor
    y_mix: torch.Tensor | None = None
    lam: float | torch.Tensor = 1.0


def parse(cfg: dict | None) -> dict | None:
    """Normalised settings of a ``training.augment`` block (schema-validated); None when all off."""
    if not cfg:
        return None
    out: dict = {}
    crop = cfg.get("crop") or {}
    padding = int(crop.get("padding", 0))
    if padding > 0 or "size" in crop:  # size: set by for_split, never in params.yaml
        out["crop"] = {"padding": padding, **({"size": tuple(crop["size"])} if "size" in crop else {})}
    if cfg.get("flip"):
        out["flip"] = True
    if cfg.get("brightness") is not None:
        out["brightness"] = {"max_delta": float(cfg["brightness"]["max_delta"])}
    if cfg.get("contrast") is not None:
        c = cfg["contrast"]
        out["contrast"] = {"lower": float(c["lower"]), "upper": float(c["upper"])}
    if cfg.get("cutout") is not None:
        c = cfg["cutout"]
        out["cutout"] = {"holes": int(c.get("holes", 1)), "length": int(c.get("length", 16))}
    if cfg.get("cutmix") is not None and cfg["cutmix"].get("prob", 0.5) > 0:
        c = cfg["cutmix"]
        out["cutmix"] = {"prob": float(c.get("prob", 0.5)), "alpha": float(c.get("alpha", 1.0))}
    return out or None


def check(cfg: dict | None, where: str) -> None:
    """Cross-field checks of a (schema-valid) ``training.augment`` block; errors name the key."""
    c = (cfg or {}).get("contrast")
    if c is not None and c["lower"] > c["upper"]:
        raise LossevoError(f"{where}.contrast: lower {c['lower']} exceeds upper {c['upper']}")


def for_split(cfg: dict | None, split) -> dict | None:
    """:func:`parse` for training on ``split``: the crop's window is the model's input size, and a
    split whose evaluation images are smaller than its training images (``data.crop``) always
    gets the random crop that brings them to that size."""
    out = parse(cfg) or {}
    size = tuple(split.input_shape[-2:])
    if len(split.x_train.shape) == 4 and tuple(split.x_train.shape[-2:]) != size:
        out["crop"] = dict(out.get("crop", {"padding": 0}), size=size)
    return out or None


def op_seed(seed: int, op: str) -> int:
    """The 64-bit seed of ``op``'s generator for training seed ``seed``."""
    state = np.random.SeedSequence([seed % 2**64, _SALT, _SEED_INDEX[op]]).generate_state(2, np.uint32)
    return int(state[0]) | int(state[1]) << 32


def _span(start: torch.Tensor, stop: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """Boolean [..., size]: whether index i lies in [start, stop) (bounds on the CPU, any shape)."""
    i = torch.arange(size, device=device)
    return (i >= start.to(device)[..., None]) & (i < stop.to(device)[..., None])


def crop(x: torch.Tensor, offsets: torch.Tensor, padding: int, fill: torch.Tensor | None = None,
         size: tuple[int, int] | None = None) -> torch.Tensor:
    """``size`` windows (default H×W) of x padded by ``padding`` (filled with ``fill`` [C], or 0)
    at ``offsets`` [B, 2] (row, col)."""
    b, c, h, w = x.shape
    sh, sw = size or (h, w)
    dev = x.device
    padded = x.new_zeros(b, c, h + 2 * padding, w + 2 * padding)
    if fill is not None:
        padded.copy_(fill.to(device=dev, dtype=x.dtype).view(1, c, 1, 1).expand_as(padded))
    padded[:, :, padding:padding + h, padding:padding + w] = x
    off = offsets.to(dev)
    rows = off[:, 0, None] + torch.arange(sh, device=dev)  # [B, h]
    cols = off[:, 1, None] + torch.arange(sw, device=dev)  # [B, w]
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def flip(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the samples whose ``bits`` [B] are set."""
    return torch.where(bits.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def brightness(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Add ``delta`` [B] to every value of each sample (TensorFlow's ``adjust_brightness``, float)."""
    return x + delta.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale each channel about its spatial mean by ``factor`` [B] (TensorFlow's ``adjust_contrast``)."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1) + mean


def cutout(x: torch.Tensor, centres: torch.Tensor, length: int) -> torch.Tensor:
    """Zero a ``length``-sided square, clipped at the border, per centre ([B, holes, 2] row, col)."""
    _, _, h, w = x.shape
    lo = centres - length // 2
    rows = _span(lo[..., 0].clamp(0, h), (lo[..., 0] + length).clamp(0, h), h, x.device)  # [B, K, H]
    cols = _span(lo[..., 1].clamp(0, w), (lo[..., 1] + length).clamp(0, w), w, x.device)  # [B, K, W]
    mask = (rows[..., :, None] & cols[..., None, :]).any(dim=1)  # [B, H, W]
    return x.masked_fill(mask[:, None], 0.0)


def cutmix_box(shape: tuple[int, ...], lam: float, centre: tuple[int, int]) -> tuple[int, int, int, int]:
    """Yun et al.'s box (row0, row1, col0, col1) for a Beta draw ``lam``: sides ⌊H√(1−λ)⌋, ⌊W√(1−λ)⌋."""
    h, w = shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = centre
    return (min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h),
            min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w))


def cutmix(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, box: tuple[int, int, int, int]) -> Batch:
    """Paste ``box`` from ``x[perm]``; λ = 1 − box area/(H·W), exactly the unpasted fraction."""
    _, _, h, w = x.shape
    r0, r1, c0, c1 = box
    area = (r1 - r0) * (c1 - c0)
    if area == 0:
        return Batch(x, y)
    rows = torch.zeros(h, dtype=torch.bool, device=x.device)
    cols = torch.zeros(w, dtype=torch.bool, device=x.device)
    rows[r0:r1] = True
    cols[c0:c1] = True
    perm = perm.to(x.device)
    mixed = torch.where(rows[:, None] & cols[None, :], x[perm], x)
    return Batch(mixed, y, y[perm.to(y.device)], 1.0 - area / (h * w))


class Augmenter:
    """A seeded stream of augmented batches: ``aug(x, y) -> Batch``, one call per training step."""

    def __init__(self, cfg: dict, seed: int, fill: torch.Tensor | None = None) -> None:
        self.cfg = parse(cfg) or {}
        self.seed = seed
        self.fill = fill
        self._gen = {op: torch.Generator().manual_seed(op_seed(seed, op)) for op in OPS if op in self.cfg}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        """Augment one batch (x [B, C, H, W] on any device, y [B]); draws a fixed count per op."""
        b, _, h, w = x.shape
        cfg, gen = self.cfg, self._gen
        if "crop" in cfg:
            p, g = cfg["crop"]["padding"], gen["crop"]
            sh, sw = cfg["crop"].get("size", (h, w))
            room = (h + 2 * p - sh, w + 2 * p - sw)
            if room[0] == room[1]:  # one draw for both axes (the square case: every paper's)
                offsets = torch.randint(0, room[0] + 1, (b, 2), generator=g)
            else:
                offsets = torch.stack([torch.randint(0, r + 1, (b,), generator=g) for r in room], dim=1)
            x = crop(x, offsets, p, self.fill, (sh, sw))
            h, w = sh, sw
        if "flip" in cfg:
            x = flip(x, torch.randint(0, 2, (b,), generator=gen["flip"]).bool())
        if "brightness" in cfg:
            d = cfg["brightness"]["max_delta"]
            x = brightness(x, (torch.rand(b, dtype=torch.float64, generator=gen["brightness"]) * 2 - 1) * d)
        if "contrast" in cfg:
            lo, hi = cfg["contrast"]["lower"], cfg["contrast"]["upper"]
            x = contrast(x, lo + (hi - lo) * torch.rand(b, dtype=torch.float64, generator=gen["contrast"]))
        if "cutout" in cfg:
            k, g = cfg["cutout"]["holes"], gen["cutout"]
            centres = torch.stack([torch.randint(0, h, (b, k), generator=g),
                                   torch.randint(0, w, (b, k), generator=g)], dim=-1)
            x = cutout(x, centres, cfg["cutout"]["length"])
        if "cutmix" in cfg:
            g = gen["cutmix"]
            u, v = torch.rand(2, dtype=torch.float64, generator=g).tolist()
            centre = (int(torch.randint(0, h, (), generator=g)), int(torch.randint(0, w, (), generator=g)))
            perm = torch.randperm(b, generator=g)
            if u < cfg["cutmix"]["prob"]:
                alpha = cfg["cutmix"].get("alpha", 1.0)
                lam = float(betaincinv(alpha, alpha, v))  # Beta(α, α) by its inverse CDF
                return cutmix(x, y, perm, cutmix_box(x.shape, lam, centre))
        return Batch(x, y)


def mixed_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
               batch: Batch) -> torch.Tensor:
    """λ·L(logits, y) + (1−λ)·L(logits, y_mix); just L(logits, y) without a mix.

    ``lam`` may be a float or a tensor broadcasting against the loss (a [P] λ for [P] stacked
    losses); a candidate without a mix then has λ = 1 and any y_mix (the term is multiplied by 0).
    """
    loss = loss_fn(logits, batch.y)
    if batch.y_mix is None:
        return loss
    lam = batch.lam
    if isinstance(lam, torch.Tensor):
        lam = lam.to(device=loss.device, dtype=loss.dtype)
    return lam * loss + (1 - lam) * loss_fn(logits, batch.y_mix)


def stack(batches: list[Batch]) -> Batch:
    """Per-candidate batches as one stacked batch for the population trainer: x [P, B, ...],
    y [P, B], λ [P]; a candidate without a mix gets λ = 1 and its own labels as y_mix (so its
    second term is its first, times 0: finite whenever its loss is)."""
    x = torch.stack([b.x for b in batches])
    y = torch.stack([b.y for b in batches])
    if all(b.y_mix is None for b in batches):
        return Batch(x, y)
    y_mix = torch.stack([b.y if b.y_mix is None else b.y_mix for b in batches])
    lam = torch.tensor([float(b.lam) for b in batches], dtype=torch.float64)
    return Batch(x, y, y_mix, lam)
