"""params.yaml: read, check, validate against the schema, fill defaults, resolve one experiment.

Every error is a one-line :class:`LossevoError` naming the file and the key path, e.g.
``params.yaml: experiments.demo.training.lr: -1 is less than or equal to the minimum of 0``.

One reading of the file for everybody: DVC (``dvc params``, ``${experiment}`` in dvc.yaml) parses
params.yaml with ruamel.yaml as YAML 1.2, so lossevo does too, with the very call DVC makes
(:func:`read_yaml`); the Snakemake workflow gets its parameters from here as well
(workflow/rules/common.smk). PyYAML's YAML 1.1 would read ``1e-3`` as a string and ``yes``/``off``
as booleans, and would let a duplicated key silently win; YAML 1.2 reads 0.001, 'yes', 'off' and
rejects the duplicate, as DVC does.
"""

from __future__ import annotations

import copy
import inspect
import math
import reprlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from lossevo import data, losses, models, recipe
from lossevo.errors import LossevoError
from lossevo.losses import taylor
from lossevo.training import augment

DEFAULT_PARAMS = "params.yaml"
#: Top-level keys a command line may override (Snakemake's ``--config``). Only the selection:
#: every stage re-reads the parameter file, so any other override would be seen by the workflow
#: but not by the stages it runs; the experiment travels to them as ``-e NAME``.
OVERRIDABLE = ("experiment",)
#: Guards for hostile files: YAML aliases can expand a small file into a huge (or cyclic) tree.
_MAX_VALUES = 100_000
_MAX_DEPTH = 64


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_yaml(text: str, source: str) -> Any:
    """Parse YAML text exactly as DVC does (``ruamel.yaml``, ``YAML(typ="safe")``: YAML 1.2).

    So ``1e-3`` is 0.001, ``yes``/``no``/``on``/``off`` are strings, ``.nan``/``.inf`` are floats
    (rejected later by :func:`validate`) and a duplicated key is an error. Any failure is a
    one-line :class:`LossevoError` naming ``source`` and, where the parser knows it, the line.
    ruamel's warnings (a redefined ``&anchor``: legal, the later one applies, as in DVC) are not
    printed: they would break the one-line error output of the CLI.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return YAML(typ="safe").load(text)  # dvc.utils.serialize.parse_yaml
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or str(exc).splitlines()[0]
        raise LossevoError(f"{source}: not valid YAML{line}: {_one_line(problem)}") from None
    except YAMLError as exc:
        raise LossevoError(f"{source}: not valid YAML: {_one_line(exc)}") from None
    except RecursionError:
        raise LossevoError(f"{source}: not valid YAML: nested too deeply") from None
    except (ValueError, TypeError) as exc:  # a tagged or timestamp-like scalar that does not convert
        raise LossevoError(f"{source}: not valid YAML: {_one_line(exc)}") from None


@cache
def schema() -> dict:
    """The params.yaml JSON Schema shipped with the package (loss kinds and model names from their registries)."""
    text = resources.files("lossevo").joinpath("params.schema.yaml").read_text(encoding="utf-8")
    sch = read_yaml(text, "params.schema.yaml")
    sch["$defs"]["loss_spec"]["properties"]["kind"]["enum"] = list(losses.KINDS)
    sch["$defs"]["model"]["properties"]["name"]["enum"] = list(models.MODELS)
    return sch


@cache
def _validator_class():
    """Draft 2020-12, except that ``integer`` means an int: the standard also accepts 3.0, which
    passes the schema and then fails in ``range(steps)`` long after validation."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
    return jsonschema.validators.extend(base, type_checker=checker)


@cache
def _validator():
    return _validator_class()(schema())


_BRANCHES: dict[int, Any] = {}


def _takes_then(sch: dict, node: dict) -> bool:
    """Whether ``node`` satisfies ``sch['if']`` (validators cached: the schema is built once)."""
    key = id(sch["if"])
    if key not in _BRANCHES:
        _BRANCHES[key] = (sch["if"], _validator_class()(sch["if"]))
    return _BRANCHES[key][1].is_valid(node)


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def _resolve(sch: dict, root: dict, node: Any = None) -> dict:
    """Follow a local ``$ref``; for an if/then/else schema, the branch ``node`` takes."""
    if "$ref" in sch:
        sch = root["$defs"][sch["$ref"].rsplit("/", 1)[-1]]
    if "if" in sch and isinstance(node, dict):
        sch = _resolve(sch.get("then" if _takes_then(sch, node) else "else", {}), root, node)
    return sch


def _fill_defaults(node: Any, sch: dict, root: dict) -> Any:
    """Recursively insert schema ``default`` values for missing object properties.

    A default is inserted only where the key is missing, and then filled in turn, so a partly
    given object (``abort: {epoch: 5}``) still gets the defaults of the keys it leaves out.
    """
    sch = _resolve(sch, root, node)
    if not isinstance(node, dict):
        return node
    for key, sub in sch.get("properties", {}).items():
        sub = _resolve(sub, root, node.get(key))
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


def _check_values(params: dict, source: str) -> None:
    """Checks over the whole parsed mapping, loss specs included, before the schema sees it.

    Keys must be strings (YAML allows ``1:``, ``null:`` or ``[a, b]:``; names become paths and
    command-line arguments); numbers must be finite (YAML's ``.nan``/``.inf`` satisfy every
    ``minimum`` a schema can state, and ``nan`` makes every comparison false); and the tree must
    be a tree of bounded size (an alias may refer to itself or expand exponentially).
    """
    budget = [_MAX_VALUES]

    def walk(node: Any, parts: tuple, open_: set[int]) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise LossevoError(f"{source}: more than {_MAX_VALUES} values (YAML aliases expanding?)")
        if len(parts) > _MAX_DEPTH:
            raise LossevoError(f"{source}: {_path(parts[:_MAX_DEPTH])}: nested more than {_MAX_DEPTH} levels deep")
        if isinstance(node, dict | list):
            if id(node) in open_:
                raise LossevoError(f"{source}: {_path(parts)}: a YAML alias refers to itself")
            open_.add(id(node))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in items:
                if isinstance(node, dict) and not isinstance(key, str):
                    raise LossevoError(f"{source}: {_path(parts)}: key {key!r} is not a string")
                walk(value, (*parts, key), open_)
            open_.discard(id(node))
        elif isinstance(node, float) and not math.isfinite(node):
            raise LossevoError(f"{source}: {_path(parts)}: {node} is not a finite number")

    walk(params, (), set())


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 60, 60, 2
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 3


def _message(error) -> str:
    """jsonschema's message, with a long offending value abbreviated (it may be a whole experiment)."""
    text = error.message
    full = repr(error.instance)
    if len(full) > 80:
        text = text.replace(full, _SHORT.repr(error.instance))
    return _one_line(text)


def _unshared(node: Any) -> Any:
    """A deep copy in which no two places share a mapping or list. YAML anchors (``data: *cifar10``)
    make experiments share objects, and ``copy.deepcopy`` keeps that sharing; defaults and the
    epoch-to-step resolution filled into one experiment must not appear in another."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return copy.deepcopy(node)


def validate(params: Any, source: str = DEFAULT_PARAMS) -> dict:
    """Validate a params mapping and return a copy with defaults filled in.

    Order: value checks over the whole mapping (:func:`_check_values`), the JSON Schema, defaults,
    then the cross-field checks the schema cannot express. Errors name ``source`` and the key.
    """
    import jsonschema

    if not isinstance(params, dict):
        got = "nothing (an empty file?)" if params is None else type(params).__name__
        raise LossevoError(f"{source}: top level must be a mapping, got {got}")
    _check_values(params, source)
    sch = schema()
    error = jsonschema.exceptions.best_match(_validator().iter_errors(params))
    if error is not None:
        if error.validator == "oneOf" and error.context:
            error = jsonschema.exceptions.best_match(error.context)
        raise LossevoError(f"{source}: {_path(error.absolute_path)}: {_message(error)}")
    params = _fill_defaults(_unshared(params), sch, sch)
    if params["experiment"] not in params["experiments"]:
        raise LossevoError(
            f"{source}: experiment: {params['experiment']!r} is not one of {sorted(params['experiments'])}"
        )
    for name, exp in params["experiments"].items():
        _check_experiment(name, exp, source)
    return params


def _check_experiment(name: str, exp: dict, source: str) -> None:
    """Cross-field checks the schema cannot express (model options, loss specs, search references, budgets)."""
    where = f"{source}: experiments.{name}"
    _check_model(f"{where}.model", exp["model"])
    data.check(exp["data"], f"{where}.data")
    augment.check(exp["training"].get("augment"), f"{where}.training.augment")
    recipe.resolve(exp, where)
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
        if s["shards"] > s["popsize"]:
            raise LossevoError(f"{where}.search.{sname}.shards: {s['shards']} exceeds popsize {s['popsize']}")
        if s["method"] == "taylorglo":
            _check_taylorglo(f"{where}.search.{sname}", s)
        else:
            _check_glo(f"{where}.search.{sname}", s)


def model_options(name: str) -> list[str]:
    """The keyword options of a registered model builder (the optional keys of ``model``)."""
    return list(inspect.signature(models.MODELS[name]).parameters)[2:]  # after input_shape, n_classes


def _check_model(where: str, model: dict) -> None:
    """The model's optional keys are its builder's keyword arguments: an option another model
    takes (``hidden`` on ``allcnnc``) is an error now, not a TypeError at the first training."""
    options = model_options(model["name"])
    for key in model:
        if key != "name" and key not in options:
            raise LossevoError(
                f"{where}.{key}: not an option of model {model['name']} (options: {', '.join(options) or 'none'})"
            )


def _check_taylorglo(where: str, s: dict) -> None:
    if s["invariant"] and (s["order"] != 3 or s["variables"] != ["x", "y"]):
        raise LossevoError(f"{where}.invariant: only defined for order 3 over [x, y]")
    try:
        taylor.layout(s["order"], s["variables"])
    except LossevoError as exc:
        raise LossevoError(f"{where}: {exc}") from None


def _check_glo(where: str, s: dict) -> None:
    if s["elites"] >= s["popsize"]:
        raise LossevoError(f"{where}.elites: {s['elites']} leaves no room in popsize {s['popsize']}")
    if "x" not in s["leaves"] or not {"y", "logit"} & set(s["leaves"]):
        raise LossevoError(f"{where}.leaves: {s['leaves']} must include x and a prediction (y or logit)")
    if s["max_depth_init"] > s["max_height"]:
        raise LossevoError(f"{where}.max_depth_init: {s['max_depth_init']} exceeds max_height {s['max_height']}")


def read_params(path: str | Path = DEFAULT_PARAMS) -> Any:
    """The parameter file as parsed (:func:`read_yaml`), not yet validated."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LossevoError(f"{path}: parameter file not found") from None
    except UnicodeDecodeError as exc:
        raise LossevoError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise LossevoError(f"{path}: cannot read the parameter file ({exc.strerror or exc})") from None
    return read_yaml(text, str(path))


def with_overrides(raw: dict, overrides: Mapping, source: str) -> dict:
    """Validate ``raw`` (a parsed, already valid parameter file) with top-level ``overrides``.

    Only :data:`OVERRIDABLE` keys are accepted (see there why); errors name ``source``.
    """
    refused = sorted(str(k) for k in overrides if k not in OVERRIDABLE)
    if refused:
        raise LossevoError(
            f"{source}: {', '.join(refused)}: cannot be overridden (only {', '.join(OVERRIDABLE)}: the stages "
            f"re-read the parameter file, so change it there or pass another file)"
        )
    return validate({**raw, **overrides}, source)


def load_params(path: str | Path | dict = DEFAULT_PARAMS) -> dict:
    """Read and validate params.yaml (or validate an already-loaded mapping)."""
    if isinstance(path, dict):
        return validate(path)
    return validate(read_params(path), str(path))


@dataclass(frozen=True)
class Experiment:
    """One named experiment with its validated settings and its results directory."""

    name: str
    cfg: dict
    root: Path
    threads: int = 1
    determinism: str = "portable"

    @property
    def numerics(self) -> dict:
        """The settings that change a run's floating-point results besides its parameters."""
        return {"determinism": self.determinism, "threads": self.threads}

    @property
    def data_path(self) -> Path:
        return self.root / "data.pt"

    def search_dir(self, search: str) -> Path:
        return self.root / "search" / search

    def retrain_path(self, loss: str) -> Path:
        return self.root / "retrain" / f"{loss}.json"

    def model_path(self, loss: str) -> Path:
        """The retrained networks of a loss (every seed), a DVC-cached checkpoint."""
        return self.root / "retrain" / f"{loss}.pt"

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
    return Experiment(name, params["experiments"][name], root, params["threads"],
                      params.get("determinism", "portable"))
