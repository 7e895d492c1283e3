"""params.yaml: load, validate against the schema, fill defaults, resolve one experiment.

Every error is a one-line :class:`LossevoError` naming the file and the key path, e.g.
``params.yaml: experiments.demo.training.lr: -1 is less than or equal to the minimum of 0``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lossevo import losses
from lossevo.errors import LossevoError
from lossevo.losses import taylor

DEFAULT_PARAMS = "params.yaml"


@cache
def schema() -> dict:
    """The params.yaml JSON Schema shipped with the package."""
    return yaml.safe_load(resources.files("lossevo").joinpath("params.schema.yaml").read_text())


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def _resolve(sch: dict, root: dict) -> dict:
    return root["$defs"][sch["$ref"].rsplit("/", 1)[-1]] if "$ref" in sch else sch


def _fill_defaults(node: Any, sch: dict, root: dict) -> Any:
    """Recursively insert schema ``default`` values for missing object properties."""
    sch = _resolve(sch, root)
    if not isinstance(node, dict):
        return node
    for key, sub in sch.get("properties", {}).items():
        sub = _resolve(sub, root)
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if key in node:
            node[key] = _fill_defaults(node[key], sub, root)
    extra = sch.get("additionalProperties")
    if isinstance(extra, dict):
        for key in node:
            if key not in sch.get("properties", {}):
                node[key] = _fill_defaults(node[key], extra, root)
    return node


def validate(params: Any, source: str = DEFAULT_PARAMS) -> dict:
    """Validate a params mapping and return a copy with defaults filled in."""
    import jsonschema

    if not isinstance(params, dict):
        raise LossevoError(f"{source}: top level must be a mapping, got {type(params).__name__}")
    sch = schema()
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(sch).iter_errors(params))
    if error is not None:
        if error.validator == "oneOf" and error.context:
            error = jsonschema.exceptions.best_match(error.context)
            where = _path(list(error.absolute_path))
        else:
            where = _path(error.absolute_path)
        raise LossevoError(f"{source}: {where}: {error.message}")
    params = _fill_defaults(copy.deepcopy(params), sch, sch)
    if params["experiment"] not in params["experiments"]:
        raise LossevoError(
            f"{source}: experiment: {params['experiment']!r} is not one of {sorted(params['experiments'])}"
        )
    for name, exp in params["experiments"].items():
        _check_experiment(name, exp, source)
    return params


def _check_experiment(name: str, exp: dict, source: str) -> None:
    """Cross-field checks the schema cannot express (loss specs, search references, budgets)."""
    where = f"{source}: experiments.{name}"
    for lname, spec in exp["retrain"]["losses"].items():
        if "search" in spec:
            if spec["search"] not in exp["search"]:
                raise LossevoError(
                    f"{where}.retrain.losses.{lname}.search: {spec['search']!r} is not a search of "
                    f"this experiment (have {sorted(exp['search'])})"
                )
        else:
            try:
                exp["retrain"]["losses"][lname] = losses.validate(spec)
            except LossevoError as exc:
                raise LossevoError(f"{where}.retrain.losses.{lname}: {exc}") from None
    baseline = exp["stats"]["baseline"]
    if baseline not in exp["retrain"]["losses"]:
        raise LossevoError(f"{where}.stats.baseline: {baseline!r} is not a retrained loss")
    for sname, s in exp["search"].items():
        if s["partial_steps"] > exp["training"]["steps"]:
            raise LossevoError(
                f"{where}.search.{sname}.partial_steps: {s['partial_steps']} exceeds training.steps "
                f"{exp['training']['steps']}"
            )
        if s["invariant"] and (s["order"] != 3 or s["variables"] != ["x", "y"]):
            raise LossevoError(
                f"{where}.search.{sname}.invariant: only defined for order 3 over [x, y]"
            )
        if s["shards"] > s["popsize"]:
            raise LossevoError(f"{where}.search.{sname}.shards: {s['shards']} exceeds popsize {s['popsize']}")
        try:
            taylor.layout(s["order"], s["variables"])
        except LossevoError as exc:
            raise LossevoError(f"{where}.search.{sname}: {exc}") from None


def load_params(path: str | Path | dict = DEFAULT_PARAMS) -> dict:
    """Read and validate params.yaml (or validate an already-loaded mapping, e.g. Snakemake's)."""
    if isinstance(path, dict):
        return validate(path)
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise LossevoError(f"{path}: parameter file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise LossevoError(f"{path}: not valid YAML{line}") from None
    return validate(raw, str(path))


@dataclass(frozen=True)
class Experiment:
    """One named experiment with its validated settings and its results directory."""

    name: str
    cfg: dict
    root: Path
    threads: int = 1

    @property
    def data_path(self) -> Path:
        return self.root / "data.pt"

    def search_dir(self, search: str) -> Path:
        return self.root / "search" / search

    def retrain_path(self, loss: str) -> Path:
        return self.root / "retrain" / f"{loss}.json"

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def search_cfg(self, search: str) -> dict:
        if search not in self.cfg["search"]:
            raise LossevoError(
                f"search {search!r} is not defined in experiment {self.name} (have {sorted(self.cfg['search'])})"
            )
        return self.cfg["search"][search]

    def loss_names(self) -> list[str]:
        return list(self.cfg["retrain"]["losses"])


def experiment(params: dict, name: str | None = None) -> Experiment:
    """Resolve an experiment by name (default: the one params.yaml selects)."""
    name = name or params["experiment"]
    if name not in params["experiments"]:
        raise LossevoError(f"experiment {name!r} is not in params (have {sorted(params['experiments'])})")
    root = Path(params["results_dir"]) / name
    return Experiment(name, params["experiments"][name], root, params["threads"])
