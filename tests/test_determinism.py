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


# --- CUDA: the flags torch needs for run-to-run identical GPU results, checkable without a GPU ---

#: aten ops that raise under ``torch.use_deterministic_algorithms(True)`` on CUDA tensors (torch's
#: documented list; forward or backward, whichever has no deterministic CUDA kernel). Conservative
#: where only some variants raise (cumsum: floating point; scatter_reduce: prod; median: with
#: indices; embedding bag: max mode).
CUDA_NONDETERMINISTIC_OPS = {
    "avg_pool3d_backward", "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward", "fractional_max_pool2d_backward", "fractional_max_pool3d_backward",
    "max_unpool2d", "max_unpool3d", "upsample_linear1d_backward", "upsample_bilinear2d_backward",
    "upsample_bicubic2d_backward", "upsample_trilinear3d_backward", "_upsample_bilinear2d_aa_backward",
    "_upsample_bicubic2d_aa_backward", "reflection_pad1d_backward", "reflection_pad2d_backward",
    "reflection_pad3d_backward", "nll_loss2d_forward", "_ctc_loss_backward", "_embedding_bag_backward",
    "_embedding_bag_dense_backward", "put_", "put", "histc", "bincount", "median", "nanmedian", "kthvalue",
    "grid_sampler_2d_backward", "grid_sampler_3d_backward", "cumsum", "cumsum_", "scatter_reduce",
    "scatter_reduce_", "index_reduce", "index_reduce_",
}


@pytest.fixture
def torch_flags_restored(monkeypatch):
    """torch's flags and the CUDA/determinism variables as they were, after the test."""
    for key in ("CUBLAS_WORKSPACE_CONFIG", determinism.ENV_MODE, determinism.ENV_FALLBACK, *determinism.PORTABLE_ENV):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    before = determinism.torch_flags()
    yield
    determinism.set_torch_flags(before)
    assert determinism.torch_flags() == before


def test_cuda_settings_are_the_ones_pytorch_documents_for_reproducibility():
    portable = determinism.torch_settings("portable")
    assert portable == {"cudnn_deterministic": True, "cudnn_benchmark": False, "deterministic_algorithms": True,
                        "deterministic_warn_only": False, "matmul_allow_tf32": False, "cudnn_allow_tf32": False,
                        "float32_matmul_precision": "highest"}
    native = determinism.torch_settings("native")
    assert native["cudnn_benchmark"] and native["matmul_allow_tf32"] and native["cudnn_allow_tf32"]
    assert not native["deterministic_algorithms"] and not native["cudnn_deterministic"]
    assert set(native) == set(portable)
    assert determinism.CUDA_ENV == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    with pytest.raises(determinism.LossevoError, match="not one of"):
        determinism.torch_settings("fast")
    doc = determinism.__doc__
    assert "not across GPU models" in doc and "same GPU model" in doc


def test_configure_torch_sets_the_flags_on_cuda_only_and_reads_them_back(torch_flags_restored, monkeypatch):
    import torch

    before = determinism.torch_flags()
    assert determinism.configure_torch("cpu", "portable") == {}  # the CPU's kernels stay as they are
    assert determinism.configure_torch(torch.device("cpu")) == {} and determinism.torch_flags() == before
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    # Without a GPU: setting the flags needs no CUDA context, so the CUDA branch runs here as well.
    assert determinism.configure_torch("cuda", "portable") == determinism.torch_settings("portable")
    assert determinism.torch_flags() == determinism.torch_settings("portable")
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert determinism.configure_torch("cuda:0", "native") == determinism.torch_settings("native")
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    assert not torch.are_deterministic_algorithms_enabled()
    # The mode asked for in this process (conftest applied portable) is the default.
    assert determinism.requested_mode() == "portable"
    assert determinism.configure_torch("cuda") == determinism.torch_settings("portable")
    monkeypatch.setenv(determinism.ENV_MODE, "unset")
    assert determinism.configure_torch("cuda") == {}  # apply() never ran: torch left alone
    # cuBLAS reads its workspace setting when CUDA starts: too late afterwards.
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(determinism.DeterminismError, match="CUBLAS_WORKSPACE_CONFIG"):
        determinism.configure_torch("cuda", "portable")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other deterministic setting is kept
    assert determinism.configure_torch("cuda", "portable")["deterministic_algorithms"]
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_apply_sets_the_cublas_workspace_for_portable_even_when_the_cpu_part_falls_back(
        torch_flags_restored, monkeypatch):
    for key in (determinism.ENV_MODE, determinism.ENV_FALLBACK, *determinism.PORTABLE_ENV):
        monkeypatch.setenv(key, os.environ.get(key, "x"))  # apply() writes them: restored after the test
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    determinism.apply("native")
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and determinism.requested_mode() == "native"
    monkeypatch.setattr(determinism, "portable_unavailable", lambda: "the CPU lacks avx2")
    with pytest.warns(determinism.DeterminismWarning):
        assert determinism.apply("portable") == {}
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert os.environ[determinism.ENV_MODE] == "native" and determinism.requested_mode() == "portable"


def test_describe_adds_the_cuda_flags_only_for_a_cuda_device():
    cpu = determinism.describe()
    assert determinism.describe("cpu") == cpu and "cuda" not in cpu
    cuda = determinism.describe("cuda")
    assert {k: v for k, v in cuda.items() if k != "cuda"} == cpu
    assert cuda["cuda"] == {"requested": determinism.requested_mode(),
                            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                            "torch": determinism.torch_flags()}


def test_training_paths_use_no_op_without_a_deterministic_cuda_kernel():
    """Why ``warn_only`` can stay False: every aten op the trainer and the population path dispatch
    (forward, backward, SGD update, evaluation) for the papers' model families and every loss kind,
    recorded on the CPU, has a deterministic CUDA kernel. (On CUDA, convolutions and batch norm
    dispatch to cuDNN, which ``cudnn.deterministic`` covers; ``AdaptiveAvgPool2d(1)`` is a mean.)"""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from lossevo import models
    from lossevo.data import Split
    from lossevo.training import population

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def split(shape: tuple[int, ...]) -> Split:
        g = torch.Generator().manual_seed(0)

        def part():
            return torch.rand(4, *shape, generator=g), torch.randint(0, 10, (4,), generator=g)

        return Split(*part(), *part(), *part(), 10)

    every_kind = [{"kind": "cross_entropy"}, {"kind": "cross_entropy"}, {"kind": "label_smoothing", "alpha": 0.1},
                  {"kind": "taylor", "theta": [0.1] * 8}, {"kind": "taylor", "theta": [-0.1] * 8},
                  {"kind": "baikal"}, {"kind": "tree", "expr": "mul(x, log(y))"}]
    recipe = {"lr": 0.01, "batch_size": 2, "steps": 2, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    jobs = [({"name": "mlp", "hidden": [8], "dropout": 0.1}, (1, 8, 8), every_kind),
            ({"name": "mnist_basic_cnn"}, (1, 28, 28), every_kind[:2])]
    if "resnet20" in models.MODELS:
        jobs.append(({"name": "resnet20"}, (3, 32, 32), every_kind[:2]))
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a model that falls back to one by one
        for cfg, shape, specs in jobs:
            for batched in (True, False):
                with Ops() as ops:
                    population.train_many(cfg, split(shape), specs, recipe, [0] * len(specs), steps=2,
                                          batched=batched)
                seen |= ops.names
    assert {"convolution_backward", "nll_loss_forward", "_foreach_add_"} <= seen  # it saw the training
    assert not seen & CUDA_NONDETERMINISTIC_OPS, sorted(seen & CUDA_NONDETERMINISTIC_OPS)
