"""The stacked state of a training population: weights, buffers and SGD momentum, one slice each.

Buffers (BatchNorm ``running_mean``/``running_var``/``num_batches_tracked``) are stacked like the
weights and handed to ``functional_call`` together with them (:meth:`_Population.as_dict`), so
that under ``vmap`` each candidate's running statistics are updated in place on its own slice.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import stack_module_state


class _Population:
    """Stacked weights, buffers, momentum and loss tensors of the still-running candidates."""

    def __init__(self, models: list[nn.Module], extra: list[torch.Tensor], seeds: list[int]):
        params, buffers = stack_module_state(models)
        self.names = list(params)
        self.params = [params[k] for k in self.names]
        self.buffer_names = list(buffers)
        self.buffers = [buffers[k] for k in self.buffer_names]
        self.state_keys = list(models[0].state_dict())  # persistent state, in the module's order
        self.momentum: list[torch.Tensor] | None = None  # SGD momentum buffers, one per weight
        self.extra = extra
        self.seeds = list(seeds)
        self.live = list(range(len(models)))  # candidate index of each stacked slice

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Weights and buffers by name, as ``functional_call`` takes them."""
        out = dict(zip(self.names, self.params, strict=True))
        out.update(zip(self.buffer_names, self.buffers, strict=True))
        return out

    def keep(self, slices: list[int]) -> None:
        """Drop every stacked slice not in ``slices`` (stopped candidates)."""
        sel = torch.tensor(slices, dtype=torch.long, device=self.params[0].device)
        self.params = [p.detach()[sel].requires_grad_() for p in self.params]
        self.buffers = [b[sel] for b in self.buffers]
        if self.momentum is not None:
            self.momentum = [b[sel] for b in self.momentum]
        self.extra = [e[sel] for e in self.extra]
        self.seeds = [self.seeds[j] for j in slices]
        self.live = [self.live[j] for j in slices]

    def state_dict(self, j: int) -> dict[str, torch.Tensor]:
        """Slice ``j`` as its own model's ``state_dict`` (weights and buffers, on the CPU)."""
        state = self.as_dict()
        return {k: state[k][j].detach().cpu().clone() for k in self.state_keys}
