"""params.yaml validation and CLI argument errors: one line, naming the problem, nothing written."""

import copy
import subprocess

import pytest
import yaml
from conftest import lossevo_cmd, tiny_params

from lossevo import config
from lossevo.errors import LossevoError


def test_repository_params_validate():
    params = config.load_params("params.yaml")
    exp = config.experiment(params)
    assert exp.cfg["search"]["taylorglo"]["sigma"] == 1.2  # default filled in
    assert exp.cfg["search"]["taylorglo_invariant"]["invariant"] is True
    # Paper presets validate even though their data is not here.
    assert params["experiments"]["mnist_basic_cnn"]["search"]["taylorglo"]["popsize"] == 28
    assert params["experiments"]["cifar10_allcnnc"]["search"]["taylorglo_invariant"]["popsize"] == 40


def _set(d: dict, dotted: str, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is KeyError:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


BAD = [
    ("experiments.tiny.data.dataset", "imagenet", "experiments.tiny.data.dataset: 'imagenet' is not one of"),
    ("experiments.tiny.model.name", "resnet", "experiments.tiny.model.name: 'resnet' is not one of"),
    ("experiments.tiny.training.lr", "fast", "experiments.tiny.training.lr: 'fast' is not of type"),
    ("experiments.tiny.training.lr", -1, "experiments.tiny.training.lr: -1 is less than or equal"),
    ("experiments.tiny.data.train_fraction", 1.5, "train_fraction: 1.5 is greater than"),
    ("experiments.tiny.training.momentum_typo", 0.9, "'momentum_typo' was unexpected"),
    ("experiments.tiny.training.steps", KeyError, "experiments.tiny.training: give exactly one of steps and epochs"),
    ("experiments.tiny.retrain.losses.cross_entropy", {"kind": "hinge"}, "losses.cross_entropy.kind"),
    ("experiments.tiny.retrain.losses.cross_entropy", {"kind": "label_smoothing", "alpha": 3},
     "retrain.losses.cross_entropy: loss spec label_smoothing.alpha=3"),
    ("experiments.tiny.retrain.losses.tg", {"search": "nope"}, "losses.tg.search: 'nope' is not a search"),
    ("experiments.tiny.search.tg.partial_steps", 10**6, "partial_steps: 1000000 exceeds training.steps"),
    ("experiments.tiny.search.tg.order", 4, None),  # fine without the invariant
    ("experiments.tiny.search.tgi.order", 4, "tgi.invariant: only defined for order 3"),
    ("experiments.tiny.search.tg.sigma", 0, "sigma: 0 is less than or equal"),
    ("experiment", "other", "experiment: 'other' is not one of"),
]


@pytest.mark.parametrize("key,value,message", BAD)
def test_bad_params_name_the_key(tmp_path, key, value, message):
    params = copy.deepcopy(tiny_params(tmp_path / "results"))
    _set(params, key, value)
    if message is None:
        config.validate(params)
        return
    with pytest.raises(LossevoError) as info:
        config.validate(params, "params.yaml")
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("params.yaml: ")


def test_cli_bad_params_exit_nonzero_and_write_nothing(tmp_path):
    params = tiny_params(tmp_path / "results")
    params["experiments"]["tiny"]["training"]["lr"] = -0.1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(params))
    out = subprocess.run(lossevo_cmd() + ["prepare", "--params", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "experiments.tiny.training.lr: -0.1" in out.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("content,message", [
    (None, "parameter file not found"),
    ("experiment: [unclosed", "not valid YAML at line"),
    ("- just\n- a list\n", "top level must be a mapping"),
])
def test_cli_unreadable_params(tmp_path, content, message):
    path = tmp_path / "p.yaml"
    if content is not None:
        path.write_text(content)
    out = subprocess.run(lossevo_cmd() + ["validate", "--params", str(path)], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.parametrize("argv,message", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["search-step", "-s", "tg"], "the following arguments are required: -g/--generation"),
    (["search-step", "-s", "tg", "-g", "two"], "invalid int value: 'two'"),
])
def test_cli_bad_arguments_are_one_line(argv, message):
    out = subprocess.run(lossevo_cmd() + argv, capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1


def test_cli_unknown_names(tiny):
    for argv, message in [
        (["prepare", "-e", "nope"], "experiment 'nope' is not in params"),
        (["retrain", "-l", "hinge"], "loss 'hinge' is not in experiments.tiny.retrain.losses"),
        (["search-step", "-s", "zzz", "-g", "0"], "search 'zzz' is not defined in experiment tiny"),
    ]:
        out = subprocess.run(lossevo_cmd() + argv + ["--params", str(tiny)], capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stderr, out.stderr


# ------------------------------------------------------------------ stricter values, in a mapping

@pytest.mark.parametrize("key,value,message", [
    ("experiments.tiny.training.lr", float("nan"), "experiments.tiny.training.lr: nan is not a finite number"),
    ("experiments.tiny.training.milestones", [10, float("inf")],
     "experiments.tiny.training.milestones.1: inf is not a finite number"),
    ("experiments.tiny.retrain.losses.label_smoothing.alpha", float("-inf"),
     "experiments.tiny.retrain.losses.label_smoothing.alpha: -inf is not a finite number"),
    ("experiments.tiny.training.steps", 60.0, "experiments.tiny.training.steps: 60.0 is not of type 'integer'"),
    ("experiments.tiny.search.tg.popsize", True, "experiments.tiny.search.tg.popsize: True is not of type 'integer'"),
    ("experiments.tiny.retrain.losses.bad name", {"kind": "cross_entropy"},
     "experiments.tiny.retrain.losses: 'bad name' does not match"),
    ("experiments.tiny.model.hidden", [8], None),
    ("experiments.tiny.model.channels", [8], "experiments.tiny.model.channels: not an option of model mlp "
                                              "(options: hidden, dropout)"),
    ("experiments.tiny.search.tg.abort", {"epoch": 5}, None),
    ("experiments.tiny.search.tg.abort", {"min_accuracy": 2}, "tg.abort.min_accuracy: 2 is greater than"),
    ("experiments.tiny.search.tg.final_selection", {"top_k": 3, "sedes": 1}, "'sedes' was unexpected"),
])
def test_stricter_values_name_the_key(tmp_path, key, value, message):
    test_bad_params_name_the_key(tmp_path, key, value, message)


def test_keys_must_be_strings(tmp_path):
    params = tiny_params(tmp_path / "results")
    params["experiments"]["tiny"]["search"][1] = params["experiments"]["tiny"]["search"]["tg"]
    with pytest.raises(LossevoError, match=r"^params.yaml: experiments.tiny.search: key 1 is not a string$"):
        config.validate(params, "params.yaml")


def test_a_long_offending_value_is_abbreviated(tmp_path):
    params = tiny_params(tmp_path / "results")
    params["experiments"]["tiny"]["retrain"] = [params["experiments"]["tiny"]["retrain"]] * 20
    with pytest.raises(LossevoError) as info:
        config.validate(params, "params.yaml")
    text = str(info.value)
    assert text.startswith("params.yaml: experiments.tiny.retrain: [") and "is not of type 'object'" in text
    assert len(text) < 200 and "\n" not in text


# ------------------------------------------------------- one YAML reading: YAML 1.2, as DVC reads it

#: Scalars where YAML 1.1 (PyYAML) and YAML 1.2 (ruamel.yaml, DVC) disagree, and what 1.2 says.
YAML_12 = {
    "lr": ("1e-3", 0.001), "big": ("5E+4", 50000.0), "mid": ("1.5e2", 150.0), "neg": ("-2.5e-2", -0.025),
    "yes": ("yes", "yes"), "no": ("No", "No"), "on": ("on", "on"), "off": ("OFF", "OFF"), "y": ("y", "y"),
    "t": ("true", True), "f": ("False", False), "octal": ("010", 10), "sexagesimal": ("1:30", "1:30"),
    "nil": ("~", None),
}


def _yaml_with(params: dict, raw: dict[str, str]) -> str:
    """``params`` as YAML text with the values at the dotted keys of ``raw`` written verbatim."""
    params = copy.deepcopy(params)
    for i, key in enumerate(raw):
        _set(params, key, f"@RAW{i}@")
    text = yaml.safe_dump(params)
    for i, value in enumerate(raw.values()):
        text = text.replace(f"'@RAW{i}@'", value).replace(f"@RAW{i}@", value)
    return text


def test_yaml_12_numbers_and_booleans(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("".join(f"{k}: {raw}\n" for k, (raw, _) in YAML_12.items()))
    got = config.read_params(path)
    assert got == {k: want for k, (_, want) in YAML_12.items()}
    assert all(type(got[k]) is type(want) for k, (_, want) in YAML_12.items())

    tiny = tiny_params(tmp_path / "results")
    path.write_text(_yaml_with(tiny, {"experiments.tiny.training.lr": "1e-3",
                                      "experiments.tiny.training.weight_decay": "5E-4",
                                      "experiments.tiny.description": "off"}))
    exp = config.experiment(config.load_params(path))
    assert exp.cfg["training"]["lr"] == 0.001 and exp.cfg["training"]["weight_decay"] == 0.0005
    assert exp.cfg["description"] == "off"
    path.write_text(_yaml_with(tiny, {"experiments.tiny.training.nesterov": "yes"}))
    with pytest.raises(LossevoError, match=r"experiments.tiny.training.nesterov: 'yes' is not of type 'boolean'$"):
        config.load_params(path)


def test_lossevo_reads_params_as_dvc_does(tmp_path, monkeypatch):
    """`dvc params` (dvc.api.params_show) on the repository's params.yaml with YAML 1.2-only
    scalars added gives exactly what lossevo reads."""
    import dvc.api
    from dvc.repo import Repo

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    text = open("params.yaml").read()
    assert text.count("lr: 0.1,") == 1
    text = text.replace("lr: 0.1,", "lr: 1e-3,")
    text += "".join(f"extra_{k}: {raw}\n" for k, (raw, _) in YAML_12.items())
    Repo.init(str(tmp_path), no_scm=True).close()
    (tmp_path / "params.yaml").write_text(text)
    ours = config.read_params(tmp_path / "params.yaml")
    assert ours == dvc.api.params_show(repo=str(tmp_path))
    assert ours["experiments"]["demo"]["training"]["lr"] == 0.001


@pytest.mark.parametrize("raw,message", [
    (".nan", "experiments.tiny.training.lr: nan is not a finite number"),
    (".inf", "experiments.tiny.training.lr: inf is not a finite number"),
    ("-.Inf", "experiments.tiny.training.lr: -inf is not a finite number"),
    ("1e400", "experiments.tiny.training.lr: inf is not a finite number"),
])
def test_non_finite_numbers_in_the_file(tmp_path, raw, message):
    path = tmp_path / "p.yaml"
    path.write_text(_yaml_with(tiny_params(tmp_path / "results"), {"experiments.tiny.training.lr": raw}))
    with pytest.raises(LossevoError) as info:
        config.load_params(path)
    assert str(info.value) == f"{path}: {message}"


def test_non_finite_number_in_a_loss_spec(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(_yaml_with(tiny_params(tmp_path / "results"),
                               {"experiments.tiny.retrain.losses.label_smoothing.alpha": ".nan"}))
    with pytest.raises(LossevoError) as info:
        config.load_params(path)
    key = "experiments.tiny.retrain.losses.label_smoothing.alpha"
    assert str(info.value) == f"{path}: {key}: nan is not a finite number"


@pytest.mark.parametrize("content,message", [
    ("experiment: a\nexperiment: b\n", 'not valid YAML at line 2: found duplicate key "experiment"'),
    ("experiment: a\nexperiments:\n\tx: 1\n", "not valid YAML at line 3: found character '\\t'"),
    ("a: &a [*a]\n", "a.0: a YAML alias refers to itself"),
    ("experiment: x\nexperiments: {1: {}}\n", "experiments: key 1 is not a string"),
    ("experiment: !!python/object:os.system x\n", "not valid YAML at line 1: could not determine a constructor"),
    ("experiment: 2021-13-45\n", "not valid YAML: month must be in 1..12"),
    ("a: " + "[" * 1000 + "]" * 1000 + "\n", "not valid YAML: nested too deeply"),
    ("a: " + "[" * 100 + "]" * 100 + "\n", "a" + ".0" * 63 + ": nested more than 64 levels deep"),
    ("x: &x [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" + "".join(
        f"x{i}: &x{i} [*x{i - 1 if i else ''}, *x{i - 1 if i else ''}, *x{i - 1 if i else ''}, "
        f"*x{i - 1 if i else ''}, *x{i - 1 if i else ''}, *x{i - 1 if i else ''}]\n" for i in range(8)),
     "more than 100000 values"),
])
def test_hostile_yaml_is_one_line(tmp_path, content, message):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(LossevoError) as info:
        config.load_params(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


# ------------------------------------------------- every key the code reads is required or defaulted

#: Optional properties without a schema default, on purpose: the model builders' keyword options
#: (lossevo.models: mlp(hidden, dropout), small_cnn(channels, fc, dropout), mnist_basic_cnn(dropout),
#: allcnnc(dropout)). Each builder has its own default, so the schema cannot state one; the code
#: passes them as **kwargs and never indexes them (test_kwargs_only_keys_are_real_and_not_indexed).
KWARGS_ONLY = {"model.hidden", "model.channels", "model.fc", "model.dropout", "model.depth", "model.widen",
               "model.alpha", "model.fc2_relu", "model.standardize", "model.tutorial_decay"}
#: Loss-spec options the schema only bounds: their defaults depend on the kind and are filled by
#: lossevo.losses.validate, which normalises every spec before any code reads it.
SPEC_OPTIONS = {"loss_spec.order", "loss_spec.variables"}
#: One of each pair is given (lossevo.recipe.resolve checks that and fills steps from epochs).
EITHER_OR = {"training.steps", "training.epochs", "training.milestone_epochs", "taylorglo.partial_steps",
             "taylorglo.partial_epochs", "glo.partial_steps", "glo.partial_epochs"}


def _object_schemas() -> list[tuple[str, dict]]:
    """(where, schema) of every schema with ``properties`` reachable from the root and from every
    $def, following $ref, then/else, oneOf/anyOf/allOf, properties, additionalProperties and items.
    ``where`` is the $def's name (or ``<top level>``) plus the property path inside it. ``if``
    conditions are not followed: their ``properties`` describe a test, not an object."""
    sch = config.schema()
    found, seen = [], set()

    def visit(node, where):
        if not isinstance(node, dict) or id(node) in seen:
            return
        seen.add(id(node))
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            visit(sch["$defs"][name], name)
        if "properties" in node:
            found.append((where, node))
        for key in ("then", "else", "additionalProperties", "items"):
            visit(node.get(key), where if key in ("then", "else") else f"{where}.*")
        for key in ("oneOf", "anyOf", "allOf"):
            for sub in node.get(key, []):
                visit(sub, where)
        for key, sub in node.get("properties", {}).items():
            visit(sub, f"{where}.{key}")

    visit(sch, "<top level>")
    for name, node in sch["$defs"].items():
        if name != "search_common":  # not a schema: properties merged into taylorglo and glo
            visit(node, name)
    return found


def _deref(sub: dict) -> dict:
    return config.schema()["$defs"][sub["$ref"].rsplit("/", 1)[-1]] if "$ref" in sub else sub


def test_search_common_is_merged_into_every_method():
    defs = config.schema()["$defs"]
    for method in defs["search"]["properties"]["method"]["enum"]:
        assert set(defs["search_common"]) <= set(defs[method]["properties"]), method


def test_every_optional_property_has_a_default():
    objects = _object_schemas()
    wheres = {w for w, _ in objects}
    assert {"<top level>", "experiment", "data", "model", "training", "taylorglo", "glo", "glo.coefficients",
            "glo.mutation", "retrain", "stats", "loss_spec"} <= wheres
    assert {"abort", "final_selection"} <= {w.rsplit(".", 1)[-1] for w in wheres}  # search_common's
    missing = [
        f"{where}.{key}"
        for where, node in objects
        for key, sub in node["properties"].items()
        if key not in node.get("required", []) and "default" not in _deref(sub)
        and f"{where}.{key}" not in KWARGS_ONLY | SPEC_OPTIONS | EITHER_OR
    ]
    assert missing == []


def test_schema_defaults_are_valid_and_agree_with_inner_defaults():
    sch = config.schema()
    for where, node in _object_schemas():
        for key, sub in node["properties"].items():
            sub = _deref(sub)
            if "default" not in sub:
                continue
            assert config._validator_class()({**sub, "$defs": sch["$defs"]}).is_valid(sub["default"]), (where, key)
            if isinstance(sub["default"], dict) and "properties" in sub:
                filled = config._fill_defaults(copy.deepcopy(sub["default"]), sub, sch)
                assert filled == config._fill_defaults({}, sub, sch), f"{where}.{key}: default disagrees"


def test_kwargs_only_keys_are_real_and_not_indexed():
    import re
    from pathlib import Path

    from lossevo import models

    options = {opt for name in models.MODELS for opt in config.model_options(name)}
    keys = {k.split(".", 1)[1] for k in KWARGS_ONLY}
    assert keys == options == set(config.schema()["$defs"]["model"]["properties"]) - {"name"}
    # a model config indexed by an option: model["dropout"], cfg["model"]["depth"], model_cfg['alpha']
    pattern = re.compile(r"""model\w*(?:["']\])?\[\s*["'](""" + "|".join(sorted(keys)) + r""")["']\s*\]""")
    hits = [f"{p}:{i}" for p in Path("src/lossevo").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == [], "model options are optional: read them with .get() or pass them as **kwargs"


def test_partly_given_objects_get_their_inner_defaults(tmp_path):
    params = tiny_params(tmp_path / "results", abort={"epoch": 5}, final_selection={"top_k": 3})
    params["experiments"]["tiny"]["search"]["gl"].update(coefficients={"popsize": 4}, mutation={"replace": 0.1})
    params["experiments"]["tiny"]["stats"] = {"alpha": 0.01}
    exp = config.experiment(config.validate(params))
    tg, gl = exp.cfg["search"]["tg"], exp.cfg["search"]["gl"]
    assert tg["abort"] == {"epoch": 5, "min_accuracy": 0.15}
    assert tg["final_selection"] == {"top_k": 3, "seeds": 2, "steps": None}
    assert gl["abort"] == {"epoch": 10, "min_accuracy": 0.15}
    assert gl["coefficients"] == {"popsize": 4, "generations": 35, "sigma": 1.5, "prune": True, "cma_active": False}
    assert gl["mutation"] == {"int_step": 0.05, "replace": 0.1, "to_leaf": 0.025, "to_node": 0.025}
    assert exp.cfg["stats"] == {"alpha": 0.01, "baseline": "cross_entropy", "confidence": 0.95}


# ------------------------------------------------------------------- Snakemake: --config, --configfile

def test_overrides_only_select_an_experiment(tmp_path):
    raw = tiny_params(tmp_path / "results")
    raw["experiments"]["tiny2"] = copy.deepcopy(raw["experiments"]["tiny"])
    assert config.with_overrides(raw, {"experiment": "tiny2"}, "--config")["experiment"] == "tiny2"
    for overrides, message in [
        ({"experiment": "NOPE"}, "--config: experiment: 'NOPE' is not one of ['tiny', 'tiny2']"),
        ({"experiment": 3}, "--config: experiment: 3 is not of type 'string'"),
        ({"threads": 4, "results_dir": "x"}, "--config: results_dir, threads: cannot be overridden (only experiment"),
    ]:
        with pytest.raises(LossevoError) as info:
            config.with_overrides(raw, overrides, "--config")
        assert str(info.value).startswith(message)


def _snakemake(*args: str):
    import os
    import sys
    from pathlib import Path

    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["snakemake", "-n", "--cores", "1", *args], capture_output=True, text=True,
                          env=dict(os.environ, PATH=path))


def test_snakemake_config_selects_a_validated_experiment(tmp_path):
    params = tiny_params(tmp_path / "results")
    params["experiments"]["tiny2"] = copy.deepcopy(params["experiments"]["tiny"])
    path = tmp_path / "params.yaml"
    # YAML 1.2 as lossevo and DVC read it (PyYAML, Snakemake's own reader, would see a string).
    path.write_text(_yaml_with(params, {"experiments.tiny2.training.lr": "1e-3"}))

    out = _snakemake("--configfile", str(path), "--config", "experiment=NOPE")
    errors = [line for line in out.stderr.splitlines() if line.startswith("lossevo: error:")]
    assert out.returncode != 0 and "Traceback" not in out.stderr + out.stdout
    assert errors == ["lossevo: error: snakemake --config: experiment: 'NOPE' is not one of ['tiny', 'tiny2']"]

    out = _snakemake("--configfile", str(path), "--config", "experiment=tiny2", "--printshellcmds")
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert f"{tmp_path}/results/tiny2/data.pt" in text and f"{tmp_path}/results/tiny/" not in text
    assert f"lossevo prepare --params {path} -e tiny2" in text


# --------------------------------------------------------------------- declared dependencies

#: Declared but not imported by the package: the pipeline runners (dvc.yaml, workflow/).
RUNNERS = {"snakemake", "dvc"}


def test_declared_dependencies_are_the_imported_ones():
    """pyproject's dependencies are exactly the distributions src/ imports, plus the runners."""
    import ast
    import re
    import sys
    import tomllib
    from importlib.metadata import packages_distributions
    from pathlib import Path

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    declared = {norm(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0])
                for d in tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]}
    top = set()
    for path in Path("src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top.add(node.module.split(".")[0])
    third_party = top - set(sys.stdlib_module_names) - {"lossevo", "__future__"}
    dists = packages_distributions()
    assert third_party <= set(dists), f"imported but not installed: {sorted(third_party - set(dists))}"
    imported = {norm(d) for name in third_party for d in dists[name]}
    assert declared - RUNNERS == imported
