"""Fuzzing the parameter file: random mutations of valid files are either still valid or one
:class:`LossevoError` line naming the file (and, for a readable file, the key path); never another
exception, and the CLI then exits 2 with one ``lossevo: error:`` line and writes nothing.

Bases: the repository's params.yaml and the tiny params of conftest.py. Mutations (seeded, so a
failure reproduces): on the parsed mapping, changed value types, out-of-range and non-finite
numbers, deleted, added, renamed and non-string keys; on the text, broken YAML (unbalanced
brackets, bad indentation, tabs, stray quotes and colons, duplicated lines, truncation) and scalars
that YAML 1.1 and 1.2 read differently. Mapping cases are validated in-process (fast); a few of
each kind also go through the real ``lossevo prepare``.
"""

from __future__ import annotations

import copy
import io
import json
import math
import random
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import lossevo_cmd, tiny_params

from lossevo import config
from lossevo.errors import LossevoError

SEED = 1729
CASES_PER_BASE = {"mapping": 160, "text": 60}  # x 2 bases = 440 cases
#: The kinds whose first invalid case also runs through the real CLI.
CLI_KINDS = ("nonfinite", "delete", "unknown", "tab", "brackets")

_VALUES = ["a string", "", 7, -3, 0, 2.5, True, False, None, [], [1, "x"], {}, {"k": 1}, "1e-3"]
_OUT_OF_RANGE = [-1, 0, -0.5, 1.5, 10**9, 2**63, -(10**9), 1e-300]
_NON_FINITE = [math.nan, math.inf, -math.inf]
_NEW_KEYS = ["bogus", "lr2", "Method", "x-y", "seeds_"]
_BAD_KEYS = [1, None, True, 2.5]
_STRAY = ['"', "'", ": x: ", "&a ", "*nope ", "!!python/object:os.system ", "% ", "@", "- "]
_SCALARS = [".nan", ".inf", "-.inf", "yes", "off", "1e-3", "0x1F", "~", "1:30", "2021-01-01", "1e400", "!!str 3"]


def _dotted(parts) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def _nodes(node, parts=()):
    """Every (path, value) below ``node``, the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield (*parts, key), value
        yield from _nodes(value, (*parts, key))


def _parent(doc, path):
    for key in path[:-1]:
        doc = doc[key]
    return doc


# ---------------------------------------------------------------------------- mapping mutations

def _retype(doc, rng):
    if not doc:
        return _bad_key(doc, rng)
    path, value = rng.choice(list(_nodes(doc)))
    _parent(doc, path)[path[-1]] = copy.deepcopy(rng.choice([v for v in _VALUES if type(v) is not type(value)]))


def _out_of_range(doc, rng):
    numbers = [p for p, v in _nodes(doc) if isinstance(v, int | float) and not isinstance(v, bool)]
    if not numbers:  # an earlier mutation of the case removed them all
        return _retype(doc, rng)
    path = rng.choice(numbers)
    _parent(doc, path)[path[-1]] = rng.choice(_OUT_OF_RANGE)


def _non_finite(doc, rng):
    if not doc:
        return _bad_key(doc, rng)
    path, _ = rng.choice(list(_nodes(doc)))
    value = rng.choice(_NON_FINITE)
    _parent(doc, path)[path[-1]] = value
    return f"{_dotted(path)}: {value} is not a finite number"  # the exact message expected


def _keyed(doc):
    """Paths whose last part is a mapping key (not a list index)."""
    return [p for p, _ in _nodes(doc) if isinstance(_parent(doc, p), dict)]


def _delete(doc, rng):
    if not doc:
        return _bad_key(doc, rng)
    path = rng.choice(_keyed(doc))
    del _parent(doc, path)[path[-1]]


def _add_key(doc, rng):
    mappings = [doc] + [v for _, v in _nodes(doc) if isinstance(v, dict)]
    rng.choice(mappings)[rng.choice(_NEW_KEYS)] = copy.deepcopy(rng.choice(_VALUES))


def _rename(doc, rng):
    if not doc:
        return _bad_key(doc, rng)
    path = rng.choice(_keyed(doc))
    key = path[-1]
    name = str(key)
    new = rng.choice([name + "s", name[:-1], name.upper(), name.replace("_", "-"), "_" + name, name + " "])
    parent = _parent(doc, path)
    if new and new not in parent:
        parent[new] = parent.pop(key)


def _bad_key(doc, rng):
    mappings = [doc] + [v for _, v in _nodes(doc) if isinstance(v, dict)]
    rng.choice(mappings)[rng.choice(_BAD_KEYS)] = 1


MAPPING_MUTATIONS = {"type": _retype, "range": _out_of_range, "nonfinite": _non_finite, "delete": _delete,
                     "unknown": _add_key, "rename": _rename, "key": _bad_key}


# ------------------------------------------------------------------------------- text mutations

def _lines(text, rng, pred=lambda line: line.strip() and not line.lstrip().startswith("#")):
    lines = text.split("\n")
    return lines, rng.choice([i for i, line in enumerate(lines) if pred(line)])


def _unbalanced(text, rng):
    brackets = [m.start() for m in re.finditer(r"[\[\]{}]", text)]
    if brackets and rng.random() < 0.5:
        i = rng.choice(brackets)
        return text[:i] + text[i + 1:]
    lines, i = _lines(text, rng, lambda line: ": " in line and not line.lstrip().startswith("#"))
    head, _, tail = lines[i].partition(": ")
    lines[i] = f"{head}: {rng.choice('[{')}{tail}"
    return "\n".join(lines)


def _indent(text, rng):
    lines, i = _lines(text, rng)
    line = lines[i]
    lines[i] = " " * rng.choice([1, 3]) + line if rng.random() < 0.6 or not line.startswith(" ") else line[1:]
    return "\n".join(lines)


def _tab(text, rng):
    lines, i = _lines(text, rng, lambda line: line.startswith(" ") or ": " in line)
    line = lines[i]
    lines[i] = "\t" + line.lstrip() if line.startswith(" ") else line.replace(": ", ":\t", 1)
    return "\n".join(lines)


def _stray(text, rng):
    lines, i = _lines(text, rng, lambda line: ": " in line and not line.lstrip().startswith("#"))
    head, _, tail = lines[i].partition(": ")
    lines[i] = f"{head}: {rng.choice(_STRAY)}{tail}"
    return "\n".join(lines)


def _duplicate(text, rng):
    lines, i = _lines(text, rng, lambda line: re.match(r"\s*[\w-]+:", line) is not None)
    lines.insert(i + 1, lines[i])
    return "\n".join(lines)


def _truncate(text, rng):
    return text[: rng.randrange(1, len(text))]


def _scalar(text, rng):
    numbers = list(re.finditer(r"(?<=[:,\[] )-?\d+(\.\d+)?(?=[,\]\s])", text))
    m = rng.choice(numbers)
    return text[: m.start()] + rng.choice(_SCALARS) + text[m.end():]


TEXT_MUTATIONS = {"brackets": _unbalanced, "indent": _indent, "tab": _tab, "stray": _stray, "duplicate": _duplicate,
                  "truncate": _truncate, "scalar": _scalar}


# -------------------------------------------------------------------------------------- the fuzz

def _bases() -> dict[str, tuple[dict, str]]:
    repo_text = Path("params.yaml").read_text()
    tiny = tiny_params(Path("results"))  # relative: the CLI cases run in a temporary directory
    tiny["experiments"]["tiny"]["retrain"]["losses"].update(  # fixed specs of the other kinds, to mutate too
        taylor={"kind": "taylor", "order": 3, "variables": ["x", "y"], "theta": [0.5] * 8},
        tree={"kind": "tree", "expr": "mul(x, log(y))", "leaves": ["x", "y", "1", "-1"]},
        fast_logit={"kind": "fast_logit", "class_reduction": "sum"},
    )
    tiny_text = yaml.safe_dump(tiny)  # with &anchors: tiny_params shares dicts between searches
    tiny_doc = json.loads(json.dumps(tiny))  # no sharing: a mutation changes one place
    config.validate(tiny_doc)
    repo_doc = json.loads(json.dumps(config.read_params("params.yaml")))  # the presets share &anchors too
    return {"repo": (repo_doc, repo_text), "tiny": (tiny_doc, tiny_text)}


def _dump(doc) -> str | None:
    """YAML 1.2 text for a mutated mapping (ruamel, as it is read); None if YAML cannot say it."""
    from ruamel.yaml import YAML

    out = io.StringIO()
    try:
        YAML(typ="safe").dump(doc, out)
    except Exception:  # e.g. a key YAML's safe dumper cannot write
        return None
    return out.getvalue()


def _check_message(message: str, doc) -> None:
    assert "\n" not in message and message.startswith("params.yaml: "), message
    if isinstance(doc, dict):  # a readable mapping: the error names a key path inside it
        where = message.removeprefix("params.yaml: ").split(": ", 1)[0]
        first = where.split(".", 1)[0]
        assert where == "<top level>" or first in doc, message


def _cases():
    """Yield (base, kind, mutated mapping or None, text or None, exact expected message or None)."""
    rng = random.Random(SEED)
    for base, (doc, text) in _bases().items():
        for _ in range(CASES_PER_BASE["mapping"]):
            mutated = copy.deepcopy(doc)
            kinds = rng.sample(sorted(MAPPING_MUTATIONS), k=1 if rng.random() < 0.8 else 2)
            results = [MAPPING_MUTATIONS[kind](mutated, rng) for kind in kinds]
            expected = results[0] if len(kinds) == 1 else None  # exact only when nothing else broke
            yield base, "+".join(kinds), mutated, None, expected
        for _ in range(CASES_PER_BASE["text"]):
            kind = rng.choice(sorted(TEXT_MUTATIONS))
            yield base, kind, None, TEXT_MUTATIONS[kind](text, rng), None


@pytest.mark.filterwarnings("error")  # a warning would be a second line on the CLI's stderr
def test_fuzzed_params_are_valid_or_one_line_errors(tmp_path):
    stats = {"cases": 0, "invalid": 0, "valid": 0}
    by_kind: dict[str, list[int]] = {}
    cli: dict[str, tuple] = {}
    for base, kind, doc, text, expected in _cases():
        stats["cases"] += 1
        group = by_kind.setdefault("combined" if "+" in kind else kind, [0, 0])
        parsed = doc
        try:
            if doc is None:
                parsed = config.read_yaml(text, "params.yaml")
            config.validate(parsed, "params.yaml")
        except LossevoError as exc:
            message = str(exc)
            stats["invalid"] += 1
            group[0] += 1
            _check_message(message, parsed)
            if expected is not None:
                assert message == f"params.yaml: {expected}"
            if kind in CLI_KINDS and kind not in cli:
                case_text = text if doc is None else _dump(doc)
                if case_text is not None:
                    cli[kind] = (base, case_text)
        else:
            stats["valid"] += 1
            group[1] += 1
    print(f"\nparams fuzz: {stats}; invalid/valid by kind: {dict(sorted(by_kind.items()))}")
    assert stats["cases"] >= 400
    assert stats["invalid"] >= 0.7 * stats["cases"]
    assert sorted(cli) == sorted(CLI_KINDS)
    _run_cli_cases(tmp_path, cli)


def _run_cli_cases(tmp_path: Path, cases: dict[str, tuple]) -> None:
    """The real CLI on a few invalid cases at once: exit 2, one error line, nothing written."""
    runs = []
    for kind, (base, text) in cases.items():
        cwd = tmp_path / f"{base}-{kind}"
        cwd.mkdir()
        path = cwd / "params.yaml"
        path.write_text(text)
        with pytest.raises(LossevoError) as info:
            config.load_params(path)
        proc = subprocess.Popen(lossevo_cmd() + ["prepare", "--params", str(path)], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((kind, cwd, str(info.value), proc))
    for kind, cwd, message, proc in runs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (kind, err)
        assert err == f"lossevo: error: {message}\n" and out == "", (kind, err)
        assert "Traceback" not in err
        assert [p.name for p in cwd.iterdir()] == ["params.yaml"], kind  # no results dir, nothing else
