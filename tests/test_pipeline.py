"""Smoke run of the whole pipeline through the real CLI on a seconds-long budget."""

import json
import math
import subprocess

from conftest import lossevo_cmd


def test_whole_pipeline_through_the_cli(tiny, tmp_path):
    for stage in ["validate", "prepare", "search", "retrain", "stats", "report"]:
        out = subprocess.run(lossevo_cmd() + [stage, "--params", str(tiny)], capture_output=True, text=True)
        assert out.returncode == 0, f"{stage}: {out.stderr[-3000:]}"
    root = tmp_path / "results" / "tiny"
    for name, kind, gens in [("tg", "taylor", 3), ("tgi", "taylor", 2), ("gl", "tree", 5)]:
        best = json.loads((root / "search" / name / "best.json").read_text())
        assert best["spec"]["kind"] == kind
        assert best["paper_pick"]["fitness"] >= max(c["fitness"] for c in best["final_selection"]["candidates"])
        rows = (root / "search" / name / "progress.csv").read_text().strip().splitlines()
        assert len(rows) == 1 + gens
    assert len(json.loads((root / "search" / "tg" / "best.json").read_text())["spec"]["theta"]) == 8
    for loss in ["cross_entropy", "label_smoothing", "baikal", "tg", "tgi", "gl"]:
        r = json.loads((root / "retrain" / f"{loss}.json").read_text())
        assert len(r["test_accuracy"]) == 3 and all(0.0 <= a <= 1.0 for a in r["test_accuracy"])
    welch = (root / "stats" / "welch.csv").read_text().splitlines()
    assert welch[0].startswith("loss,n,mean,std,t,df,p") and len(welch) == 7
    assert (root / "report" / "report.md").exists()
    metrics = json.loads((root / "metrics.json").read_text())
    ce = json.loads((root / "retrain" / "cross_entropy.json").read_text())["test_accuracy"]
    flat = json.dumps(metrics)
    assert "NaN" not in flat and "Infinity" not in flat
    assert math.isclose(metrics["retrain"]["cross_entropy"]["test_acc_mean"], sum(ce) / len(ce))
