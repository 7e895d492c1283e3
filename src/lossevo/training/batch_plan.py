"""Whether, and how many, candidates of a model to train as one batched population.

:func:`model_unbatchable` runs a 2-candidate vmap probe (training step and evaluation, buffers
included) once per model and input; :func:`candidate_cost` estimates a candidate-step's memory and
forward MACs on the meta device; :func:`population_cap` turns both into the chunk size that
:func:`lossevo.training.population.train_many` batches.
"""

from __future__ import annotations

import json
import logging
import math

import torch
from torch import nn

from lossevo import models
from lossevo.data import Split
from lossevo.training import trainer
from lossevo.training.stacked_forward import _population_forward
from lossevo.training.stacked_state import _Population

#: Candidates trained together in one batched pass unless ``max_population`` says otherwise.
DEFAULT_MAX_POPULATION = 32
#: Memory a batched pass may plan for (see :func:`candidate_cost`); on CUDA at least a quarter
#: of the device's memory.
STATE_BUDGET_BYTES = 2 << 30
#: On the CPU, batching pays where per-call overhead dominates a step; above this many forward
#: MACs per candidate-step (2 cores: MLP 64-100-100-10 at batch 32 is 0.6M and batches 5-10×
#: faster; small_cnn on 28×28 at 36M and the MNIST CNN at 56M+ batch slower) train one by one.
CPU_MAX_BATCHED_MACS = 10_000_000
_noted: set[str] = set()
log = logging.getLogger(__name__)
_model_checks: dict[str, str | None] = {}  # model_unbatchable's answers, per model/input/device


def _note_once(message: str) -> None:
    """Log (info) once per process a deliberate choice not to batch."""
    if message not in _noted:
        _noted.add(message)
        log.info(message)


def _vmap_probe(model: nn.Module, split: Split, device: torch.device) -> None:
    """Run a 2-candidate batched training step (buffers updated) and evaluation on 2 examples;
    raises if it cannot."""
    pop = _Population([model, model], [], [0, 0])
    forward = _population_forward(model)
    x = split.x_test[:2].to(device)  # the model's input size (training images may be larger)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        total = forward(pop.as_dict(), x, True, True).float().square().sum()
        torch.autograd.grad(total, pop.params)
        with torch.no_grad():
            forward(pop.as_dict(), x, True, False)


def model_unbatchable(model_cfg: dict, split: Split, device: torch.device) -> str | None:
    """Why ``model_cfg`` cannot be trained as a population on ``device`` (None if it can)."""
    key = json.dumps([model_cfg, list(split.input_shape), split.n_classes, device.type],
                     sort_keys=True, default=str)
    if key not in _model_checks:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model = trainer.init_model(model_cfg, split, 0, device)
        reason = None
        try:
            _vmap_probe(model, split, device)
        except Exception as exc:  # noqa: BLE001 - any failure means "not batchable"
            first = (str(exc).splitlines() or [""])[0][:200]
            reason = (f"model {model_cfg['name']} fails as a batched population "
                      f"({type(exc).__name__}: {first})")
        _model_checks[key] = reason
    return _model_checks[key]


def candidate_cost(model_cfg: dict, split: Split, batch_size: int) -> tuple[int, int]:
    """(bytes, MACs) of one candidate's training step, estimated on the meta device.

    Bytes: weights ×4 (weights, gradients, momentum, update temporaries) plus activations ×3
    (forward, saved for backward, gradients), float32. MACs: forward multiply-accumulates of the
    linear and convolution layers for one batch.
    """
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    with torch.device("meta"):
        model = models.build(model_cfg["name"], split.input_shape, split.n_classes, **kwargs)
        acts, macs = [0], [0]

        def count(module, inputs, output):
            if isinstance(output, torch.Tensor) and not list(module.children()):
                acts[0] += output.numel()
                if isinstance(module, nn.Linear):
                    macs[0] += output.numel() * module.in_features
                elif isinstance(module, nn.modules.conv._ConvNd):
                    per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
                    macs[0] += output.numel() * per_out

        hooks = [m.register_forward_hook(count) for m in model.modules()]
        model(torch.empty(batch_size, *split.input_shape))
        for h in hooks:
            h.remove()
    n_params = sum(p.numel() for p in model.parameters())
    return 4 * (4 * n_params + 3 * acts[0]), macs[0]


def population_cap(model_cfg: dict, split: Split, batch_size: int, device: torch.device,
                    max_population: int | None, forced: bool) -> int:
    """Candidates per batched pass: ``max_population``, else the default bounded by memory and,
    on the CPU (unless ``forced``), 1 for models whose compute, not overhead, dominates a step."""
    n_bytes, macs = candidate_cost(model_cfg, split, batch_size)
    if device.type == "cpu" and macs > CPU_MAX_BATCHED_MACS and not forced:
        _note_once(f"model {model_cfg['name']} is compute-bound on the CPU ({macs / 1e6:.0f}M "
                   f"MACs a step): training candidates one after another")
        return 1
    if max_population is not None:
        return max(1, max_population)
    budget = STATE_BUDGET_BYTES
    if device.type == "cuda":
        budget = max(budget, torch.cuda.get_device_properties(device).total_memory // 4)
    return max(1, min(DEFAULT_MAX_POPULATION, budget // max(1, n_bytes)))
