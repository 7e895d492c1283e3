"""Population forward passes: ``f(params, x, shared, training) -> [P, B, C]`` for stacked models.

Plain MLPs get a direct ``baddbmm`` path (the same per-candidate arithmetic as
``vmap(functional_call)`` with a fraction of its per-op cost); anything else is vmapped with
independent randomness (dropout masks differ per candidate). ``params`` holds the stacked
buffers too (BatchNorm running statistics), which a training-mode pass updates in place, each
candidate's slice from its own batch statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap


def _mlp_forward(model: nn.Module) -> Callable | None:
    """A batched forward for a plain MLP (Flatten/Linear/ReLU/Dropout), else None.

    ``f(params, x, shared, training)`` takes the stacked parameters and x of [B, ...] (shared)
    or [P, B, ...] and returns [P, B, C], using ``baddbmm`` directly: the same per-candidate
    arithmetic as ``vmap(functional_call)``, with a fraction of its per-op cost.
    """
    if type(model) is not nn.Sequential:
        return None
    plan: list[tuple] = []
    for name, m in model.named_children():
        if type(m) is nn.Linear:
            bias = f"{name}.bias" if m.bias is not None else None
            plan.append(("linear", f"{name}.weight", bias))
        elif type(m) is nn.ReLU:
            plan.append(("relu",))
        elif type(m) is nn.Dropout:
            plan.append(("dropout", m.p))
        elif type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
            plan.append(("flatten",))
        elif type(m) is not nn.Identity:
            return None
    if not any(op[0] == "linear" for op in plan):
        return None

    def forward(params: dict, x: torch.Tensor, shared: bool, training: bool) -> torch.Tensor:
        n_cand = next(iter(params.values())).shape[0]
        h, batched = x, not shared
        for op in plan:
            if op[0] == "flatten":
                h = h.flatten(2 if batched else 1)
            elif op[0] == "relu":
                h = torch.relu(h)
            elif op[0] == "dropout":
                if training and op[1] > 0:
                    if not batched:
                        h, batched = h.expand(n_cand, *h.shape), True
                    h = F.dropout(h, op[1], training=True)
            else:
                w = params[op[1]]
                if not batched:
                    h, batched = h.expand(n_cand, *h.shape), True
                if op[2] is None:
                    h = torch.bmm(h, w.transpose(1, 2))
                else:
                    h = torch.baddbmm(params[op[2]].unsqueeze(1), h, w.transpose(1, 2))
        return h

    return forward


def _population_forward(model: nn.Module) -> Callable:
    """``f(params, x, shared, training) -> [P, B, C]`` for stacked copies of ``model``.

    ``params``: stacked weights and buffers by name (buffers batched like the weights, in_dims
    0). ``shared``: x is one batch [B, ...] for every candidate, else [P, B, ...]. Plain MLPs
    use :func:`_mlp_forward`; anything else ``vmap(functional_call)`` with independent randomness.
    """
    fast = _mlp_forward(model)
    if fast is not None:
        return fast
    base = copy.deepcopy(model).to("meta")

    def one(p: dict, xx: torch.Tensor) -> torch.Tensor:
        return functional_call(base, p, (xx,))

    on_shared = vmap(one, in_dims=(0, None), randomness="different")
    on_own = vmap(one, in_dims=(0, 0), randomness="different")

    def forward(params: dict, x: torch.Tensor, shared: bool, training: bool) -> torch.Tensor:
        base.train(training)
        return (on_shared if shared else on_own)(params, x)

    return forward
