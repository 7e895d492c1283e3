"""Portable determinism: the same bits whatever kernels the machine is told to use.

A tiny experiment (prepare, one short TaylorGLO search, retraining of two losses) runs through
the CLI in subprocesses under several *outer* environments, each telling torch, MKL, oneDNN,
OpenBLAS and numpy to use other kernels, as a stand-in for other x86-64 CPUs. With
``determinism: portable`` every run must write byte-identical results (search state, best.json,
retrain JSONs, trained weights, environment record): what metrics.json and the report are
computed from. Two ``determinism: native`` runs show what the portable settings amount to and
that the comparison can fail: under the portable variables set by hand (what an AVX2-only CPU
computes natively, given MKL's COMPATIBLE branch) the results equal the portable ones; with
this CPU's own choices (AVX-512 where it has it) they differ.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from lossevo import data, determinism

EXP = "det"
#: Run the stages in one interpreter through the CLI's own entry point (one torch import per
#: run instead of one per stage), with the workers given (2: spawned pools, as in the pipeline).
DRIVER = """
import sys
from lossevo.cli import main
for stage in ("search", "retrain"):
    rc = main([stage, "--params", sys.argv[1], "--workers", sys.argv[2]])
    if rc:
        sys.exit(rc)
"""
#: Not compared byte for byte: pycma pickles its logger's wall-clock timers into the search's
#: optimizer checkpoints, so those differ between any two runs; the candidates each checkpoint
#: asks next (gen_*/candidates.json) are compared instead.
NOT_COMPARED = (".pkl",)


def _params(results: Path, mode: str) -> dict:
    return {
        "experiment": EXP, "results_dir": str(results), "threads": 1, "determinism": mode,
        "experiments": {EXP: {
            "device": "cpu",
            "data": {"dataset": "digits", "train_fraction": 0.1, "val_size": 297, "test_size": 500},
            "model": {"name": "mlp", "hidden": [16]},
            "training": {"lr": 0.1, "batch_size": 32, "steps": 40},
            "search": {"tg": {"method": "taylorglo", "popsize": 4, "generations": 2, "partial_steps": 20,
                              "shards": 2, "final_selection": {"top_k": 2, "seeds": 1}}},
            "retrain": {"seeds": 2, "losses": {"cross_entropy": {"kind": "cross_entropy"},
                                               "tg": {"search": "tg"}}},
        }},
    }


def _aten_values() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this CPU can run (the unset default is run as well)."""
    flags = determinism.cpu_flags() or set()
    values = ["default", "avx2"]
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        values.append("avx512")
    else:
        warnings.warn("this CPU has no AVX-512: ATEN_CPU_CAPABILITY=avx512 not tested", stacklevel=2)
    return values


def _outer_envs() -> list[dict[str, str]]:
    """Outer environments that each choose other kernels: every ATen kernel set this CPU runs and
    every MKL branch at least once, with OpenBLAS, numpy and oneDNN told otherwise too."""
    aten = _aten_values()
    return [
        {},  # this CPU's own choices
        {"ATEN_CPU_CAPABILITY": aten[0], "MKL_CBWR": "AVX2", "OPENBLAS_CORETYPE": "SkylakeX"},
        {"ATEN_CPU_CAPABILITY": aten[1], "MKL_CBWR": "AVX512", "OPENBLAS_NUM_THREADS": "2",
         "NPY_DISABLE_CPU_FEATURES": ""},
        {"ATEN_CPU_CAPABILITY": aten[-1], "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    ]


def _run(tmp: Path, name: str, mode: str, outer: dict[str, str], data_file: Path,
         workers: int = 1) -> dict[str, str]:
    """One run of the tiny experiment; returns {path: sha256} of its results (logs excluded)."""
    results = tmp / name / "results"
    (results / EXP).mkdir(parents=True)
    shutil.copy(data_file, results / EXP / "data.pt")
    params = tmp / name / "params.yaml"
    params.write_text(yaml.safe_dump(_params(results, mode)))
    env = {k: v for k, v in os.environ.items()
           if k not in determinism.PORTABLE_ENV and not k.startswith("LOSSEVO_DETERMINISM")}
    env |= outer
    out = subprocess.run([sys.executable, "-c", DRIVER, str(params), str(workers)], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, f"{name} ({mode}, {outer}): {out.stderr[-3000:]}"
    root = results / EXP
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "logs" not in p.relative_to(root).parts
            and p.name != "data.pt" and not p.name.startswith(".") and not p.name.endswith(NOT_COMPARED)}


def _differing(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, dict[str, str]]]:
    reason = determinism.portable_unavailable()
    if reason:
        pytest.skip(f"portable settings unavailable on this machine: {reason}")
    tmp = tmp_path_factory.mktemp("determinism")
    data_file = tmp / "data.pt"
    data.save(data.load({"dataset": "digits", "train_fraction": 0.1, "val_size": 297, "test_size": 500,
                         "split_seed": 0}), data_file)
    own = {} if "avx512" in _aten_values() else {"ATEN_CPU_CAPABILITY": "default"}
    jobs = [(f"portable{i}", "portable", outer) for i, outer in enumerate(_outer_envs())]
    jobs += [("native_avx2", "native", dict(determinism.PORTABLE_ENV)), ("native_own", "native", own)]
    # Two runs at a time (one core each); the last portable run fans out over spawned workers,
    # which must inherit the portable settings from their parent, not the outer environment.
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_run, tmp, name, mode, outer, data_file, 2 if name == "portable3" else 1)
                   for name, mode, outer in jobs}
    out = {name: (outer, futures[name].result()) for name, _, outer in jobs}
    return out


def test_portable_results_are_byte_identical_whatever_the_outer_environment(runs):
    first_env, first = runs["portable0"]
    assert any(k.startswith("search/tg/") for k in first) and "retrain/tg.json" in first
    assert any(k.startswith("models/") or k.endswith(".pt") for k in first), sorted(first)
    assert "search/tg/environment.json" in first and "retrain/environment.json" in first
    for name, (outer, files) in runs.items():
        if name.startswith("portable"):
            assert _differing(first, files) == [], f"{name} under {outer} differs from {first_env}"


def test_portable_equals_native_avx2_and_differs_from_this_cpus_native_kernels(runs):
    portable = runs["portable0"][1]
    # They name the mode: the environment records, and the search fingerprint (a search made in
    # one mode is not resumed in the other).
    records = {"search/tg/environment.json", "retrain/environment.json", "search/tg/search.json"}
    avx2 = runs["native_avx2"][1]
    assert _differing(portable, avx2) == sorted(records)
    own_env, own = runs["native_own"]
    differing = _differing(portable, own)
    assert set(differing) - records, f"native run under {own_env or 'this CPU'} equals the portable one"
    assert any(k.endswith(".pt") for k in differing), differing  # the trained weights themselves
