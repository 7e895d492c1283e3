"""benchmarks/bench_gpu.py: its CPU version prints a parseable table of measured, consistent ratios;
without a CUDA device it says so and succeeds; a model the registry lacks is a skipped row."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from lossevo import determinism

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
NUMERIC = ("batched", "sequential", "speedup", "batched_GFLOP/s", "batched_of_mm", "seq_GFLOP/s", "seq_of_mm")


def _bench(*args: str) -> subprocess.CompletedProcess:
    """The script in a fresh interpreter that sees no GPU (so the default path is the no-CUDA one)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _table(stdout: str) -> tuple[list[str], list[dict[str, str]]]:
    """The table's header and its rows, each a dict column → text (skipped rows included)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "P"])
    header = lines[start].split()
    rows = []
    for line in lines[start + 1:]:
        parts = line.split()
        if not parts or line.startswith("("):
            break
        rows.append(dict(zip(header, parts, strict=True)) if parts[1].isdigit()
                    else {"model": parts[0], "P": parts[1], "skipped": " ".join(parts[2:])})
    return header, rows


def test_cpu_quick_version_prints_measured_positive_consistent_ratios():
    out = _bench("--device", "cpu", "--quick", "--models", "mlp", "--populations", "2", "--steps", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert text.startswith("device cpu: ") and re.search(r"^torch \S+, CUDA \S+, cuDNN \S+$", text, re.M)
    assert re.search(r"^determinism portable", text, re.M)
    mm = float(re.search(r"^matmul reference: .* ([\d.]+) GFLOP/s$", text, re.M).group(1))
    header, rows = _table(text)
    assert header == ["model", "P", *NUMERIC, "batched_as"]
    assert [(r["model"], r["P"]) for r in rows] == [("mlp", "2")]
    row = rows[0]
    values = {k: float(row[k]) for k in NUMERIC}
    assert all(math.isfinite(v) and v > 0 for v in values.values()), row
    assert math.isclose(values["speedup"], values["batched"] / values["sequential"], rel_tol=0.05)
    # One FLOP estimate per candidate-step on both sides, one matmul reference.
    assert math.isclose(values["batched_GFLOP/s"] / values["batched"],
                        values["seq_GFLOP/s"] / values["sequential"], rel_tol=0.05)
    assert math.isclose(values["batched_GFLOP/s"] / values["batched_of_mm"], mm, rel_tol=0.05)
    assert row["batched_as"] == "population"


def test_without_cuda_it_says_so_and_exits_0():
    out = _bench()
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "no CUDA device: the GPU table did not run"


def test_a_model_missing_from_the_registry_is_a_skipped_row(monkeypatch, capsys):
    from lossevo import models

    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for key in (determinism.ENV_MODE, determinism.ENV_FALLBACK, "CUBLAS_WORKSPACE_CONFIG"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])  # restored after main() re-applies the mode
    monkeypatch.delitem(models.MODELS, "resnet20", raising=False)
    assert bench.main(["--device", "cpu", "--models", "resnet20", "--populations", "2", "--steps", "2",
                       "--mm-size", "64"]) == 0
    _, rows = _table(capsys.readouterr().out)
    assert rows == [{"model": "resnet20", "P": "-", "skipped": "not registered in lossevo.models: row skipped"}]
