"""Each analysis is its own stage: changing one FGSM parameter reruns only FGSM and the report,
in DVC and in Snakemake (one whole tiny pipeline run, seen by both)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import tiny_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tiny(results: str) -> dict:
    params = tiny_params(results)
    exp = params["experiments"]["tiny"]
    exp["search"] = {"tg": dict(exp["search"]["tg"], generations=2)}
    exp["retrain"]["losses"] = {"cross_entropy": {"kind": "cross_entropy"}, "tg": {"search": "tg"}}
    exp["stats"] = {"baseline": "cross_entropy"}
    exp["evaluate"] = {"fgsm": {"epsilons": [0, 0.1]}, "basins": {"points_1d": 5, "points_2d": 3},
                       "weights": {}, "data_sweep": {"fractions": [0.5, 1.0], "seeds": 2},
                       "lr_sweep": {"factors": [0.5, 1.0], "seeds": 2}, "taylor_ce": {"orders": [2], "seeds": 2}}
    return dict(params, determinism="portable", threads=1)  # DVC reads these keys from the file


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _run(cmd, cwd) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
    return out.stdout + out.stderr


def _bump_fgsm(path: Path) -> None:
    params = yaml.safe_load(path.read_text())
    params["experiments"]["tiny"]["evaluate"]["fgsm"]["epsilons"] = [0, 0.2]
    path.write_text(yaml.safe_dump(params))


def test_changing_fgsm_reruns_only_fgsm_and_the_report_in_dvc_and_snakemake(tmp_path):
    """One tiny pipeline run (Snakemake, from a directory laid out like the repository), recorded by
    DVC with `dvc commit` (the stages' outputs as they are, no rerun); then one FGSM parameter
    changes: `dvc status` shows only the fgsm stage, `snakemake -n` only fgsm and the report, and
    `dvc repro` runs exactly those two."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (tmp_path / "workflow").symlink_to(ROOT / "workflow")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_tiny("results")))
    cmd = ["snakemake", "--cores", "2"]  # reads ./params.yaml, writes ./results, as dvc repro would
    _run(cmd, tmp_path)
    _run(["dvc", "init", "--no-scm", "-q"], tmp_path)
    _run(["dvc", "commit", "-f", "-q"], tmp_path)
    assert json.loads(_run(["dvc", "status", "--json"], tmp_path).strip().splitlines()[-1]) == {}

    _bump_fgsm(path)
    status = json.loads(_run(["dvc", "status", "--json"], tmp_path).strip().splitlines()[-1])
    assert set(status) == {"fgsm"}, status
    text = _run(cmd + ["-n"], tmp_path)
    jobs = {line.split()[0] for line in text.splitlines()
            if re.match(r"^[a-z_]+\s+\d+$", line.strip()) and not line.startswith("total")}
    assert jobs == {"fgsm", "report", "all"}, text[-1500:]
    ran = re.findall(r"Running stage '([^']+)'", _run(["dvc", "repro"], tmp_path))
    assert ran == ["fgsm", "report"], ran
