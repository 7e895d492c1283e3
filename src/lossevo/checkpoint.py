"""Trained networks as self-describing checkpoints (nanoGPT style): weights plus what rebuilds them.

Retraining writes one file per loss holding every seed's final weights, the model settings, the
input shape and class count, the loss spec, the training recipe and a digest of the prepared
data, so an analysis (FGSM, basins, weight statistics) loads one file and needs nothing else.
A checkpoint made from other data is refused rather than evaluated on the wrong inputs.
"""

from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path

import torch
from torch import nn

from lossevo import models
from lossevo.errors import LossevoError
from lossevo.io import write_bytes

FORMAT = "lossevo-checkpoint-v1"


@functools.cache
def file_digest(path: str | Path) -> str:
    """SHA-256 (16 hex digits) of a file, e.g. the prepared data a network was trained on."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def save(path: str | Path, *, model_cfg: dict, input_shape: list[int], n_classes: int, spec: dict,
         recipe: dict, data_digest: str, seeds: list[int], states: list[dict | None]) -> Path:
    """Write the networks of one loss (``states[i]`` for ``seeds[i]``; None where a run diverged)."""
    payload = {"format": FORMAT, "model": model_cfg, "input_shape": list(input_shape),
               "n_classes": n_classes, "spec": spec, "recipe": recipe, "data": data_digest,
               "seeds": list(seeds), "states": states}
    return write_torch(path, payload)


def write_torch(path: str | Path, obj) -> Path:
    """``torch.save`` with stable bytes, atomically: torch names the archive inside the file after
    the file it writes to, so saving straight to a temporary file would make every save differ."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def load(path: str | Path, data_digest: str | None = None) -> dict:
    """Read a checkpoint; with ``data_digest``, refuse one trained on other data."""
    path = Path(path)
    if not path.exists():
        raise LossevoError(f"{path}: trained networks not found (run `lossevo retrain` first)")
    try:
        ck = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file
        raise LossevoError(f"{path}: not a readable checkpoint ({type(exc).__name__}); "
                           f"rerun `lossevo retrain`") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise LossevoError(f"{path}: not a lossevo checkpoint; rerun `lossevo retrain`")
    if data_digest is not None and ck["data"] != data_digest:
        raise LossevoError(f"{path}: trained on other data ({ck['data']}, now {data_digest}); "
                           f"rerun `lossevo retrain`")
    return ck


def network(ck: dict, i: int, device: torch.device | str = "cpu") -> nn.Module | None:
    """The i-th seed's trained network in eval mode (None if that run diverged)."""
    state = ck["states"][i]
    if state is None:
        return None
    kwargs = {k: v for k, v in ck["model"].items() if k != "name"}
    model = models.build(ck["model"]["name"], tuple(ck["input_shape"]), ck["n_classes"], **kwargs)
    model.load_state_dict(state)
    return model.to(device).eval()
