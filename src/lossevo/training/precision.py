"""Mixed precision and memory layout for training (``training.precision``, ``training.channels_last``).

``bf16`` and ``fp16`` run the forward pass and the loss under ``torch.autocast`` (weights, their
updates and the optimizer state stay float32); ``fp16`` also scales the loss dynamically
(``torch.amp.GradScaler``), which only the one-at-a-time trainer implements, so ``fp16`` candidates
train one after another (:func:`batchable`). ``channels_last`` stores images NHWC for cuDNN's
faster convolution kernels; the batched trainer's stacked [P, B, C, H, W] inputs have no such
layout, so it applies to the one-at-a-time trainer. ``fp32`` (default) changes nothing.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, recipe: dict) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the recipe's precision on ``device`` (a no-op context for fp32)."""
    mode = recipe.get("precision", "fp32")
    if mode == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[mode])


def grad_scaler(device: torch.device | str, recipe: dict) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (None otherwise): small fp16 gradients would underflow."""
    if recipe.get("precision", "fp32") != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def batchable(recipe: dict) -> str | None:
    """Why the batched trainer cannot train this recipe (None if it can)."""
    if recipe.get("precision", "fp32") == "fp16":
        return "precision fp16 needs a loss scaler per candidate"
    return None


def channels_last(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The model and the training images in NHWC memory layout (same values, other strides)."""
    return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
