"""The environment record, the determinism switch and its guards (late import, fallback, workers)."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lossevo import config, determinism, environment, parallel
from lossevo.errors import LossevoError

#: For the tests that need the portable settings to run here (tests/conftest.py applied them).
needs_portable = pytest.mark.skipif(determinism.portable_unavailable() is not None,
                                    reason=f"portable settings unavailable: {determinism.portable_unavailable()}")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose environment has no determinism settings but ``env``."""
    base = {k: v for k, v in os.environ.items()
            if k not in determinism.PORTABLE_ENV and not k.startswith("LOSSEVO_DETERMINISM")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=base | env)


@needs_portable
def test_record_names_what_produced_a_result_and_nothing_that_changes_between_reruns():
    rec = environment.record("cpu")
    assert rec["lossevo"]["version"] and rec["python"] == platform.python_version()
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", rec["lossevo"]["commit"])
    assert rec["torch"] and rec["cuda"]["available"] in (True, False) and rec["device"] == "cpu"
    assert rec["cpu"]["model"] == environment.cpu_model() and rec["cpu"]["model"] != "unknown"
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        assert rec["cpu"]["model"] == names[0]
    assert rec["cpu"]["aten_capability"] == "AVX2"  # conftest applied the portable settings
    assert rec["threads"]["torch"] >= 1
    det = rec["determinism"]
    assert det["mode"] == "portable" and det["settings"] == determinism.PORTABLE_ENV
    if det["mkl_cbwr"] is not None:
        assert det["mkl_cbwr"] == "COMPATIBLE"
    if rec["numpy_simd"] is not None:
        assert not determinism.numpy_simd_wider_than_avx2()
    # Stable: a DVC output must hash the same on a rerun; no timings, dates or host names.
    assert environment.record("cpu") == rec
    text = json.dumps(rec)
    host = socket.gethostname()
    if len(host) > 3:
        assert host not in text
    assert not re.search(r"\b20\d\d-\d\d-\d\d|time|date|host", text, re.IGNORECASE)
    assert str(Path.home()) not in text or str(Path.home()) == "/"


def test_git_commit_is_unknown_when_git_fails(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("no git")

    monkeypatch.setattr(environment.subprocess, "run", fail)
    assert environment.git_commit() == {"commit": "unknown", "dirty": None}


def test_read_mode_is_torch_free_and_lenient(tmp_path):
    path = tmp_path / "params.yaml"
    assert determinism.read_mode(path) == "portable"  # missing file
    path.write_text("determinism: native\nexperiment: x\n")
    assert determinism.read_mode(path) == "native"
    for text in ("determinism: fast\n", "[unclosed\n", "- a list\n", "determinism: [native]\n"):
        path.write_text(text)
        assert determinism.read_mode(path) == "portable", text
    out = _python(f"import sys; from lossevo import cli, determinism; determinism.read_mode({str(path)!r}); "
                  "print(sorted({'torch', 'numpy'} & set(sys.modules)))")
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_schema_has_the_switch(tiny):
    raw = config.read_params(tiny)
    assert config.validate(raw)["determinism"] == "portable"
    assert config.validate(dict(raw, determinism="native"))["determinism"] == "native"
    with pytest.raises(LossevoError, match="determinism"):
        config.validate(dict(raw, determinism="fast"))


def test_settings_act_at_first_use_so_setting_them_later_does_nothing():
    """The premise of applying the settings first: after torch's first kernel, and MKL's first call,
    a change of the variables is ignored (before the first kernel, even after ``import torch``,
    it still takes effect: the libraries read them lazily)."""
    code = ("import os, torch; from lossevo import determinism as d; x = torch.ones(64, 64); (x @ x).sum(); "
            "os.environ.update(ATEN_CPU_CAPABILITY='default', MKL_CBWR='COMPATIBLE'); "
            "print(d.aten_capability(), d.mkl_cbwr())")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    aten, mkl = out.stdout.split()
    assert aten != "DEFAULT" and mkl != "COMPATIBLE"
    code = ("import os, torch; from lossevo import determinism as d; "
            "os.environ.update(ATEN_CPU_CAPABILITY='default'); print(d.aten_capability())")
    assert _python(code).stdout.strip() == "DEFAULT"


@needs_portable
def test_apply_refuses_when_torch_already_runs_other_kernels():
    code = ("import torch; (torch.ones(3) * 2).sum(); from lossevo import determinism as d; "
            "d.apply('portable')")
    out = _python(code, ATEN_CPU_CAPABILITY="default")
    assert out.returncode != 0 and "DeterminismError" in out.stderr and "imported before" in out.stderr
    # The CLI applies them first thing, so a CLI process runs the portable kernels.
    code = ("import sys; from lossevo import cli, determinism as d; sys.argv = ['lossevo']; "
            "d.apply(d.read_mode('none.yaml')); import torch; print(d.aten_capability(), d.mkl_cbwr())")
    out = _python(code, ATEN_CPU_CAPABILITY="default", MKL_CBWR="AVX2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "AVX2" and out.stdout.split()[1] in ("COMPATIBLE", "None")


def test_portable_falls_back_to_native_with_a_warning(monkeypatch):
    for key in (determinism.ENV_MODE, determinism.ENV_FALLBACK, *determinism.PORTABLE_ENV):
        monkeypatch.setenv(key, os.environ.get(key, "x"))  # restored after the test
    monkeypatch.setattr(determinism, "portable_unavailable", lambda: "the CPU lacks avx2")
    before = {k: os.environ[k] for k in determinism.PORTABLE_ENV}
    with pytest.warns(determinism.DeterminismWarning, match="lacks avx2"):
        assert determinism.apply("portable") == {}
    assert os.environ[determinism.ENV_MODE] == "native"
    assert os.environ[determinism.ENV_FALLBACK] == "the CPU lacks avx2"
    assert {k: os.environ[k] for k in determinism.PORTABLE_ENV} == before
    with pytest.raises(LossevoError, match="not one of"):
        determinism.apply("fast")


def test_a_worker_with_other_kernels_fails_its_jobs_instead_of_hanging(monkeypatch):
    """A pool whose initializer raises respawns its workers forever; the check's error must
    reach the parent through the jobs."""
    monkeypatch.setenv(determinism.ENV_MODE, "portable")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # what the spawned workers inherit
    with parallel.runner(2, 1) as pool, pytest.raises(determinism.DeterminismError, match="DEFAULT"):
        pool.map(abs, [(-1,), (-2,)])


@needs_portable
def test_report_section_one_column_or_one_per_stage():
    from lossevo import report

    rec = environment.record("cpu")
    same = report._environment_section({"search/tg": rec, "retrain": rec, "report": rec})
    text = "\n".join(same)
    assert "## Environment" in text and "|  | search/tg, retrain, report |" in text
    assert rec["cpu"]["model"] in text and "portable" in text and "ATen AVX2" in text
    assert "byte-identical" in text and f"{determinism.NATIVE_SPREAD['fixed_loss_mean_test_acc']:.4f}" in text
    other = json.loads(json.dumps(rec))
    other["determinism"]["mode"], other["cpu"]["aten_capability"] = "native", "AVX512"
    text = "\n".join(report._environment_section({"search/tg": other, "retrain": rec, "report": None}))
    assert "|  | search/tg | retrain |" in text and "native" in text
    assert "Not recorded (written before environment records): report." in text


def test_stage_paths_match_where_the_stages_write(tiny):
    exp = config.experiment(config.load_params(tiny))
    paths = environment.stage_paths(exp)
    assert paths["retrain"].parent == exp.retrain_path("cross_entropy").parent
    assert {k for k in paths if k.startswith("search/")} == {f"search/{n}" for n in exp.cfg["search"]}
    assert all(p.parent == exp.search_dir(k.split("/", 1)[1]) for k, p in paths.items() if k != "retrain")


# --- the GPU's details on a CUDA device, nothing new on the CPU ---

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECORD = ROOT / "results" / "demo" / "environment.json"


def _fake_gpu(monkeypatch, name: str = "NVIDIA Test GPU") -> None:
    """A CUDA device as torch.cuda describes it, without a GPU (and a driver without NVIDIA's files)."""
    import types

    import torch

    props = types.SimpleNamespace(name=name, total_memory=80 * 2**30, major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(environment, "nvidia_driver", lambda: "550.54.15")
    monkeypatch.setattr(environment, "cuda_driver_api", lambda: "12.4")


@needs_portable
def test_cpu_record_is_what_it_was_the_demos_keys_and_no_gpu_keys():
    """The demo's environment.json is committed: on the CPU the record keeps its keys (and, on the
    machine that wrote it, its bytes, the commit aside)."""
    rec = environment.record("cpu")
    assert "cuda_device" not in rec and "cuda" not in rec["determinism"]
    assert rec["gpu"] is None or rec["cuda"]["available"]
    demo = json.loads(DEMO_RECORD.read_text())["report"]
    assert set(rec) == set(demo)
    for key in ("cuda", "cpu", "determinism", "threads", "platform", "lossevo"):
        assert set(rec[key]) == set(demo[key]), key
    same_machine = all(rec[k] == demo[k] for k in ("python", "torch", "packages", "mkl", "onednn", "platform", "cpu"))
    if same_machine and rec["threads"] == demo["threads"]:
        def text(r: dict) -> str:
            return json.dumps({k: v for k, v in r.items() if k != "lossevo"}, indent=2, sort_keys=True)

        assert text(rec) == text(demo)


def test_cuda_record_adds_the_gpu_details_and_torchs_cuda_flags(monkeypatch):
    cpu = environment.record("cpu")
    _fake_gpu(monkeypatch)
    rec = environment.record("cuda")
    assert rec["device"] == "cuda" and rec["gpu"] == "NVIDIA Test GPU"
    assert rec["cuda_device"] == {"index": 0, "count": 2, "memory_bytes": 80 * 2**30, "compute_capability": "9.0",
                                  "multiprocessors": 132, "driver": "550.54.15", "driver_cuda": "12.4"}
    assert set(rec) == set(cpu) | {"cuda_device"}
    assert set(rec["cuda"]) == {"build", "available", "cudnn"}  # the runtime (torch's) and cuDNN versions
    det = rec["determinism"]["cuda"]
    assert det["torch"] == determinism.torch_flags() and det["requested"] == determinism.requested_mode()
    assert det["cublas_workspace_config"] == os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    assert environment.record("cuda:1")["cuda_device"]["index"] == 1
    assert environment.record("cuda") == rec  # stable: a DVC output hashes the same on a rerun
    assert not re.search(r"\b20\d\d-\d\d-\d\d|time|date|host", json.dumps(rec), re.IGNORECASE)


def test_driver_version_is_read_without_the_build_date_and_host():
    proprietary = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
                   "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    open_module = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  "
                   "(dvs-builder@U16-I3-B13-4-3)  Thu Jan 23 2025\n")
    assert environment.driver_from_proc(proprietary) == "550.54.15"
    assert environment.driver_from_proc(open_module) == "570.86.15"
    assert environment.driver_from_proc("") is None and environment.driver_from_proc("GCC version: 12.2.0") is None
    for value in (environment.nvidia_driver(), environment.cuda_driver_api()):  # None on a machine without one
        assert value is None or re.fullmatch(r"\d+\.\d+(\.\d+)?", value)
