"""Generational search state on disk, like the dissertation's Lossferatu, and its validation.

A search directory holds ``search.json`` (the fingerprint) and one ``gen_NNN/`` folder per
generation: ``candidates.json`` (written last by the step that asked them; its presence marks the
step complete), ``optimizer.pkl`` (the method right after asking), ``shard_SS.json`` (each shard's
evaluations) and ``summary.json`` (written when the next step told the method the results).
Every file is written atomically, so a run killed at any moment resumes from what is complete.

Every state file carries a SHA-256 of its content (a ``sha256`` key in JSON files, a header in
the pickle) and is checked for its expected structure when read, so a truncated, edited or
foreign file is a one-line :class:`StateError` naming it, never a traceback or a silently wrong
number; :func:`first_damaged` lets the driver recompute from the last complete generation.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lossevo.errors import LossevoError
from lossevo.io import read_json, write_bytes, write_json

#: First bytes of every optimizer/method checkpoint, then the payload's SHA-256 and a newline.
PICKLE_MAGIC = b"lossevo-state-v1\n"
STATUSES = ("ok", "nan", "failed", "rejected", "cached", "duplicate")


class StateError(LossevoError):
    """A state file that is damaged, foreign or of the wrong shape (names the file and the fix)."""

    def __init__(self, path: Path, problem: str):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}; run `lossevo search` to recompute it from the last "
                         f"complete generation (or delete it and rerun the step)")


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


# --------------------------------------------------------------------------- checksummed files


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, allow_nan=True).encode()).hexdigest()


def write_state(path: Path, obj: dict) -> Path:
    """Write a JSON state file with the SHA-256 of its content under ``sha256``."""
    return write_json(path, dict(obj, sha256=_digest(obj)))


def read_state(path: Path) -> dict:
    """Read a JSON state file and check its checksum (StateError when missing, damaged or foreign)."""
    path = Path(path)
    try:
        obj = read_json(path)
    except LossevoError as exc:
        problem = "missing" if not path.exists() else str(exc).split(": ", 1)[-1]
        raise StateError(path, problem) from None
    if not isinstance(obj, dict) or "sha256" not in obj:
        raise StateError(path, "not a lossevo state file (no checksum)")
    body = {k: v for k, v in obj.items() if k != "sha256"}
    if _digest(body) != obj["sha256"]:
        raise StateError(path, "content does not match its checksum (edited or damaged)")
    return body


def write_pickle(path: Path, obj: Any) -> Path:
    """Pickle ``obj`` behind a header with the payload's SHA-256."""
    payload = pickle.dumps(obj)
    return write_bytes(path, PICKLE_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def read_pickle(path: Path) -> Any:
    """Unpickle a checkpoint written by :func:`write_pickle`, checking header and checksum."""
    path = Path(path)
    if not path.exists():
        raise StateError(path, "missing")
    data = path.read_bytes()
    head = len(PICKLE_MAGIC)
    if not data.startswith(PICKLE_MAGIC) or data[head + 64 : head + 65] != b"\n":
        raise StateError(path, "not a lossevo checkpoint (foreign or truncated header)")
    digest, payload = data[head : head + 64].decode("ascii", "replace"), data[head + 65 :]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise StateError(path, "checkpoint does not match its checksum (truncated or damaged)")
    try:
        return pickle.loads(payload)
    except Exception as exc:  # noqa: BLE001 - e.g. a class that no longer exists
        raise StateError(path, f"checkpoint cannot be loaded ({type(exc).__name__})") from None


# --------------------------------------------------------------------------- typed readers


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _require(ok: bool, path: Path, problem: str) -> None:
    if not ok:
        raise StateError(path, problem)


def read_candidates(root: Path, g: int) -> dict:
    """Generation g's candidates.json, checked: indices 0..n-1, genomes, specs, training seeds."""
    path = candidates_path(root, g)
    gen = read_state(path)
    cands = gen.get("candidates")
    _require(gen.get("generation") == g, path, f"is not generation {g}'s")
    _require(isinstance(cands, list) and len(cands) > 0, path, "has no candidate list")
    for i, c in enumerate(cands):
        _require(isinstance(c, dict) and c.get("index") == i and "genome" in c
                 and isinstance(c.get("spec"), dict) and "kind" in c["spec"],
                 path, f"candidate {i} is malformed")
        _require(c.get("status") in (None, "rejected", "cached", "duplicate"), path,
                 f"candidate {i} has an unknown status {c.get('status')!r}")
    seeds = gen.get("train_seeds")
    _require(isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds), path,
             "train_seeds must be a list of integers")
    return gen


def read_shard(root: Path, g: int, s: int, n_candidates: int, shards: int) -> dict:
    """Shard s of generation g, checked against the candidates it must hold."""
    path = shard_path(root, g, s)
    shard = read_state(path)
    _require(shard.get("generation") == g and shard.get("shard") == s, path,
             f"is not generation {g} shard {s}")
    results = shard.get("results")
    _require(isinstance(results, list), path, "results must be a list")
    want = shard_indices(n_candidates, shards, s)
    _require([r.get("index") if isinstance(r, dict) else None for r in results] == want, path,
             f"results must be candidates {want[0] if want else '-'}..{want[-1] if want else '-'} in order")
    for r in results:
        i = r["index"]
        _require(r.get("status") in STATUSES, path, f"candidate {i}: unknown status {r.get('status')!r}")
        if r["status"] == "duplicate":
            _require(isinstance(r.get("same_as"), int) and 0 <= r["same_as"] < i, path,
                     f"candidate {i}: same_as must be an earlier candidate")
        else:
            _require(_number(r.get("fitness")), path, f"candidate {i}: fitness must be a finite number")
        _require(isinstance(r.get("attempts"), list), path, f"candidate {i}: attempts must be a list")
    return shard


def load_results(root: Path, g: int, shards: int) -> list[dict]:
    """All evaluations of generation ``g``, in candidate order; a missing shard is an error.

    A ``duplicate`` record gets the fitness of the candidate it repeats (possibly in another shard).
    """
    n = len(read_candidates(root, g)["candidates"])
    out = []
    for s in range(shards):
        path = shard_path(root, g, s)
        if not path.exists():
            raise LossevoError(f"{path}: shard results missing (evaluate generation {g} shard {s} first)")
        out.extend(read_shard(root, g, s, n, shards)["results"])
    for r in out:
        if r["status"] == "duplicate":
            r["fitness"] = out[r["same_as"]]["fitness"]
    return out


def read_summary(root: Path, g: int) -> dict:
    path = summary_path(root, g)
    summary = read_state(path)
    _require(summary.get("generation") == g and _number(summary.get("best_fitness")), path,
             f"is not a summary of generation {g}")
    return summary


def first_damaged(root: Path, generations: int, shards: int) -> tuple[int, StateError] | None:
    """The first generation with an existing state file that fails its checks, and the error."""
    for g in range(generations):
        d = gen_dir(root, g)
        if not d.exists():
            return None
        try:
            if optimizer_path(root, g).exists() or candidates_path(root, g).exists():
                read_pickle(optimizer_path(root, g))
                n = len(read_candidates(root, g)["candidates"])
                for s in range(shards):
                    if shard_path(root, g, s).exists():
                        read_shard(root, g, s, n, shards)
            if summary_path(root, g).exists():
                read_summary(root, g)
        except StateError as exc:
            return g, exc
    return None


# --------------------------------------------------------------------------- one run at a time

_held: dict[str, int] = {}


@contextlib.contextmanager
def search_lock(root: Path, log=sys.stderr) -> Iterator[None]:
    """Hold the search's exclusive lock (reentrant within a process); wait for another holder.

    The lock file sits beside the search directory (a fresh start deletes the directory). Shard
    evaluations take no lock: each writes only its own file, atomically and deterministically.
    """
    root = Path(root)
    key = str(root.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(root.parent / f".{root.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[{root.name}] another process is running this search; waiting for it",
                  file=log, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
