"""Generational search state on disk, like the dissertation's Lossferatu.

A search directory holds one ``gen_NNN/`` folder per generation:
``candidates.json`` (written last by the step that asked them; its presence marks the step
complete), ``optimizer.pkl`` (the optimizer right after asking), ``shard_SS.json`` (each shard's
evaluations) and ``summary.json`` (written when the next step told the optimizer the results).
Every file is written atomically, so a run killed at any moment resumes from what is complete.
"""

from __future__ import annotations

from pathlib import Path

from lossevo.errors import LossevoError
from lossevo.io import read_json


def gen_dir(root: Path, g: int) -> Path:
    return Path(root) / f"gen_{g:03d}"


def candidates_path(root: Path, g: int) -> Path:
    return gen_dir(root, g) / "candidates.json"


def optimizer_path(root: Path, g: int) -> Path:
    return gen_dir(root, g) / "optimizer.pkl"


def shard_path(root: Path, g: int, s: int) -> Path:
    return gen_dir(root, g) / f"shard_{s:02d}.json"


def summary_path(root: Path, g: int) -> Path:
    return gen_dir(root, g) / "summary.json"


def shard_indices(popsize: int, shards: int, s: int) -> list[int]:
    """Candidates of shard ``s``: contiguous, near-equal blocks (shard sizes differ by ≤ 1)."""
    if not 0 <= s < shards:
        raise LossevoError(f"shard {s} is outside 0..{shards - 1}")
    base, extra = divmod(popsize, shards)
    start = s * base + min(s, extra)
    return list(range(start, start + base + (1 if s < extra else 0)))


def load_results(root: Path, g: int, shards: int) -> list[dict]:
    """All evaluations of generation ``g``, in candidate order; a missing shard is an error.

    A ``duplicate`` record gets the fitness of the candidate it repeats (possibly in another shard).
    """
    out = []
    for s in range(shards):
        path = shard_path(root, g, s)
        if not path.exists():
            raise LossevoError(f"{path}: shard results missing (evaluate generation {g} shard {s} first)")
        out.extend(read_json(path)["results"])
    out.sort(key=lambda r: r["index"])
    for r in out:
        if r["status"] == "duplicate":
            r["fitness"] = out[r["same_as"]]["fitness"]
    return out
