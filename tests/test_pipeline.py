"""Smoke run of the whole pipeline through the real CLI on a seconds-long budget."""

import json
import math
import subprocess

from conftest import lossevo_cmd

from lossevo import checkpoint, data
from lossevo.training import trainer


def test_whole_pipeline_through_the_cli(tiny, tmp_path):
    for stage in ["validate", "prepare", "search", "retrain", "stats", "fgsm", "basins", "weights",
                  "data-sweep", "lr-sweep", "taylor-ce", "report"]:
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
    assert welch[0].startswith("loss,n,mean,std,diff,ci_low,ci_high,hedges_g,t,df,p,p_holm") and len(welch) == 7
    assert (root / "report" / "report.md").exists()
    text = (root / "report" / "report.md").read_text()
    for section in ["## Adversarial robustness (FGSM)", "## Accuracy basins", "## Weight statistics",
                    "## Reduced training data", "## Learning-rate sensitivity",
                    "## Taylor approximations of cross-entropy"]:
        assert section in text
    for loss in ["cross_entropy", "gl"]:  # the kept networks reproduce the retraining's accuracy
        ck = checkpoint.load(root / "retrain" / f"{loss}.pt")
        rec = json.loads((root / "retrain" / f"{loss}.json").read_text())
        split = data.load_prepared(root / "data.pt")
        accs = [trainer.accuracy(checkpoint.network(ck, i), split.x_test, split.y_test) if ck["states"][i]
                else 0.0 for i in range(len(ck["seeds"]))]
        assert accs == rec["test_accuracy"]
        fgsm = json.loads((root / "eval" / "fgsm.json").read_text())
        assert [a[0] for a in fgsm["accuracy"][loss]] == rec["test_accuracy"]  # ε = 0 is clean accuracy
    metrics = json.loads((root / "metrics.json").read_text())
    ce = json.loads((root / "retrain" / "cross_entropy.json").read_text())["test_accuracy"]
    flat = json.dumps(metrics)
    assert "NaN" not in flat and "Infinity" not in flat
    assert math.isclose(metrics["retrain"]["cross_entropy"]["test_acc_mean"], sum(ce) / len(ce))
