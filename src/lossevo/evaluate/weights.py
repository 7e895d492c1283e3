"""Weight statistics of a trained model (dissertation Table 5.3, Fig. 5.8).

The dissertation compares the weights that different losses produce: their L2 norm and mean,
their histogram, and whether they look Laplace-like (sparse, peaked at 0, heavy-tailed: an L1-like
implicit regulariser) or Gaussian-like (an L2-like one). :func:`weight_stats` gives those numbers
for one model; comparing losses over seeds is left to the caller (e.g. a Welch test per column).

By default every trainable parameter is counted (``parameters="all"``), as the dissertation bins
"each trainable parameter" (Table 5.3, Fig. 5.8): weights, biases and normalisation scales and
shifts. ``parameters="weights"`` keeps only weight matrices and filters (dim ≥ 2): biases and
BatchNorm scales/shifts have distributions of their own (biases start at or near 0, BatchNorm
scales near 1) that blur the histogram and the fits, the more so in BatchNorm networks; this is
also the set that the accuracy basins (:mod:`lossevo.evaluate.basins`) perturb. Buffers (BatchNorm
running statistics) and frozen parameters are never counted.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats as sps
from torch import nn

#: Which parameters :func:`weight_vector` counts (see the module docstring).
PARAMETER_SETS = ("all", "weights")


def weight_vector(model: nn.Module, parameters: str = "all") -> torch.Tensor:
    """The trainable parameters (``all``) or only those of dim ≥ 2 (``weights``), flattened and
    concatenated in ``model.parameters()`` order (on the model's device)."""
    if parameters not in PARAMETER_SETS:
        raise ValueError(f"weight_stats: parameters must be one of {PARAMETER_SETS}, got {parameters!r}")
    ws = [p.detach().flatten() for p in model.parameters()
          if p.requires_grad and (parameters == "all" or p.dim() >= 2)]
    if not ws:
        what = "trainable parameters" if parameters == "all" else "weight matrices or filters (dim >= 2)"
        raise ValueError(f"weight_stats: the model has no {what}")
    return torch.cat(ws)


def fit_distributions(w: np.ndarray) -> dict:
    """Maximum-likelihood Laplace and Gaussian fits to ``w`` and which explains it better.

    ``scipy.stats.laplace.fit`` (loc = median, scale = mean |w − median|) and
    ``scipy.stats.norm.fit`` (mean, population std). Both have two parameters, so comparing their
    total log-likelihoods is the same as comparing AIC or BIC. ``loglik_per_weight`` (mean
    log-density) compares across models of different size; ``loglik_diff_per_weight`` is Laplace
    minus Gaussian (> 0: Laplace fits better). Ties go to "gaussian".
    """
    w = np.asarray(w, dtype=np.float64).ravel()
    out: dict = {}
    for name, dist in (("laplace", sps.laplace), ("gaussian", sps.norm)):
        loc, scale = dist.fit(w)
        ll = float(dist.logpdf(w, loc, scale).sum())
        out[name] = {"loc": float(loc), "scale": float(scale), "loglik": ll, "loglik_per_weight": ll / len(w)}
    out["loglik_diff_per_weight"] = out["laplace"]["loglik_per_weight"] - out["gaussian"]["loglik_per_weight"]
    out["better_fit"] = "laplace" if out["laplace"]["loglik"] > out["gaussian"]["loglik"] else "gaussian"
    return out


def weight_stats(model: nn.Module, bins: int = 51, range_: tuple[float, float] | None = None,
                 parameters: str = "all") -> dict:
    """Summary of ``model``'s parameters of :func:`weight_vector` (``parameters``: ``all``
    trainable ones, or only ``weights`` of dim ≥ 2; see the module).

    Returns ``parameters``, ``n_weights`` (the number of values counted); ``l2_norm`` (√Σw²),
    ``mean``, ``mean_abs``, ``std`` (population) and ``max_abs``; a histogram ``hist_counts``
    (``bins`` ints) over ``hist_edges`` (``bins + 1`` floats); the fits of
    :func:`fit_distributions` under ``laplace``, ``gaussian``, ``better_fit`` and
    ``loglik_diff_per_weight``.

    Histogram range: by default symmetric about 0 at ±max|w| (with an odd ``bins``, such as the
    default 51, one bin is centred on 0). Pass a fixed ``range_=(lo, hi)`` so that the histograms
    of different losses share the same bins; weights outside it are counted in the end bins
    (clipped), so the counts always sum to ``n_weights``, and ``hist_outside`` says how many were.
    """
    if bins < 1:
        raise ValueError(f"weight_stats: bins must be >= 1, got {bins}")
    w = weight_vector(model, parameters).double().cpu().numpy()
    max_abs = float(np.abs(w).max())
    if range_ is None:
        half = max_abs if max_abs > 0 else 1.0
        lo, hi = -half, half
    else:
        lo, hi = (float(v) for v in range_)
        if not hi > lo:
            raise ValueError(f"weight_stats: range_ must be (lo, hi) with hi > lo, got {range_}")
    edges = np.linspace(lo, hi, bins + 1)
    counts, _ = np.histogram(np.clip(w, lo, hi), bins=edges)
    stats = {
        "parameters": parameters,
        "n_weights": int(w.size),
        "l2_norm": float(np.linalg.norm(w)),
        "mean": float(w.mean()),
        "mean_abs": float(np.abs(w).mean()),
        "std": float(w.std()),
        "max_abs": max_abs,
        "hist_counts": [int(c) for c in counts],
        "hist_edges": [float(e) for e in edges],
        "hist_outside": int(((w < lo) | (w > hi)).sum()),
    }
    stats.update(fit_distributions(w))
    return stats
