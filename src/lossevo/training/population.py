"""Train many candidates (loss specs × seeds) of one architecture.

``train_many`` is the one entry point searches and retraining use. This first version runs
them one after another through :func:`lossevo.training.trainer.train`.
"""

from __future__ import annotations

import torch

from lossevo import losses
from lossevo.data import Split
from lossevo.training import trainer


def train_many(
    model_cfg: dict,
    split: Split,
    specs: list[dict],
    recipe: dict,
    seeds: list[int],
    steps: int | None = None,
    abort: dict | None = None,
    device: torch.device | None = None,
    evaluate_test: bool = True,
) -> list[dict]:
    """Train ``specs[i]`` with ``seeds[i]``; return one :func:`trainer.train` result per pair."""
    if len(specs) != len(seeds):
        raise ValueError(f"{len(specs)} specs but {len(seeds)} seeds")
    return [
        trainer.train(model_cfg, split, losses.build(spec), recipe, seed, steps=steps, abort=abort,
                      device=device, evaluate_test=evaluate_test)
        for spec, seed in zip(specs, seeds)
    ]
