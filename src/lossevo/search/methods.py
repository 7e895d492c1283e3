"""Search methods by name, and the ask/tell protocol the engine drives.

A method is a class (its instances are pickled between generations, so keep them free of open
files, DEAP ``creator`` classes and lambdas) with:

- ``Method(settings)``: a fresh state from the search's validated settings (``seed`` included);
- ``ask(g, ctx) -> list[dict]``: generation g's candidates, each ``{"genome": JSON, "spec": loss
  spec}`` plus, for a fitness known without training, ``"status": "rejected"`` (fitness 0) or
  ``"cached"`` with ``"fitness"`` and a ``"reason"``; an optional ``"key"`` lets the engine train
  equal candidates of one generation once. ``ctx.n_classes`` reads the data lazily;
- ``tell(g, candidates, fitnesses)``: the fitnesses (validation accuracy, higher is better);
- ``summary() -> dict``: method-specific numbers for the generation just told;
- class attributes / static methods: ``columns`` (extra progress.csv columns, from the summary),
  ``generations(settings)`` (total, all phases), ``selectable(settings, g)`` (whether generation
  g's candidates compete in the final selection); ``describe_best(pick) -> dict`` (extra
  best.json fields, called on the method after the last generation was told).
"""

from __future__ import annotations

import importlib

from lossevo.errors import LossevoError

#: method name -> "module:Class"; imported on first use.
REGISTRY = {
    "taylorglo": "lossevo.search.taylorglo:TaylorGLO",
    "glo": "lossevo.search.glo:GLO",
}


def get(name: str):
    """The method class registered under ``name``."""
    if name not in REGISTRY:
        raise LossevoError(f"search method {name!r} is unknown (choose from {sorted(REGISTRY)})")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
