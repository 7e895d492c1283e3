"""Shared fixtures: a tiny experiment on the embedded digits data, written as a params file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from lossevo import determinism

# The CLI's default determinism settings, before any test module imports torch or numpy: the
# in-process tests then compute what the CLI subprocesses compute (many tests compare the two).
determinism.apply(determinism.DEFAULT_MODE)
os.environ.setdefault("OMP_NUM_THREADS", "1")


#: A seconds-long GLO search: 3 tree generations, then 2 coefficient generations.
GLO_SEARCH = {"method": "glo", "popsize": 10, "generations": 3, "partial_steps": 20, "shards": 2,
              "elites": 2, "init_require_leaves": True, "coefficients": {"popsize": 4, "generations": 2},
              "final_selection": {"top_k": 2, "seeds": 1}}


def tiny_params(results: Path, **search_overrides) -> dict:
    """Seconds-long experiment: 2 TaylorGLO searches (one with the invariant) and a GLO search,
    3 retraining seeds."""
    search = {"method": "taylorglo", "popsize": 4, "generations": 3, "partial_steps": 20,
              "shards": 2, "final_selection": {"top_k": 2, "seeds": 1}}
    search.update(search_overrides)
    return {
        "experiment": "tiny",
        "results_dir": str(results),
        "experiments": {
            "tiny": {
                "data": {"dataset": "digits", "train_fraction": 0.1, "val_size": 297, "test_size": 500},
                "model": {"name": "mlp", "hidden": [32]},
                "training": {"lr": 0.1, "batch_size": 32, "steps": 60},
                "search": {"tg": dict(search), "tgi": dict(search, invariant=True, generations=2),
                           "gl": dict(GLO_SEARCH)},
                "retrain": {
                    "seeds": 3,
                    "losses": {
                        "cross_entropy": {"kind": "cross_entropy"},
                        "label_smoothing": {"kind": "label_smoothing", "alpha": 0.1},
                        "baikal": {"kind": "baikal"},
                        "tg": {"search": "tg"},
                        "tgi": {"search": "tgi"},
                        "gl": {"search": "gl"},
                    },
                },
            }
        },
    }


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """Path of a params file for the tiny experiment, results under tmp_path/results."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(tmp_path / "results")))
    return path


def trained_model(split, model_cfg: dict, recipe: dict, steps: int = 60, seed: int = 0):
    """(model, result) of a cross-entropy run of trainer.train, the model captured from its
    init_model call (the live network the run trained)."""
    from lossevo import losses
    from lossevo.training import trainer

    box = {}
    orig = trainer.init_model

    def capture(*args, **kwargs):
        box["model"] = orig(*args, **kwargs)
        return box["model"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "init_model", capture)
        res = trainer.train(model_cfg, split, losses.build({"kind": "cross_entropy"}), recipe, seed, steps=steps)
    return box["model"], res


def lossevo_cmd() -> list[str]:
    """The real console script next to this interpreter (falls back to ``python -m``)."""
    script = Path(sys.executable).with_name("lossevo")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lossevo.cli"]


SLURM_SMOKE = "test_slurm.py::test_smoke_workflow_through_slurm"


def pytest_collection_finish(session):
    """Run the SLURM cluster test last, started now in the background: it mostly waits on SLURM's
    status polls, so it overlaps the rest of the suite instead of adding its wall time after it."""
    smoke = [item for item in session.items if item.nodeid.endswith(SLURM_SMOKE)]
    if smoke and not session.config.option.collectonly:
        session.items.remove(smoke[0])
        session.items.append(smoke[0])
        smoke[0].module.start_in_background()
