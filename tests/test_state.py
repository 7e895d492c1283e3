"""Search state on disk: damaged or foreign files give one-line errors or a recovery, never a
traceback; two drivers on one search wait for each other and agree."""

import io
import json
import pickle
import subprocess

import pytest
import yaml
from conftest import lossevo_cmd, tiny_params

from lossevo import config, data
from lossevo.errors import LossevoError
from lossevo.search import engine, state


def _exp(results, **overrides):
    params = tiny_params(results, popsize=4, generations=3, shards=2, partial_steps=20,
                         final_selection={"top_k": 0, "seeds": 1}, **overrides)
    exp_cfg = params["experiments"]["tiny"]
    exp_cfg["search"] = {"tg": exp_cfg["search"]["tg"]}
    exp_cfg["retrain"]["losses"] = {"cross_entropy": {"kind": "cross_entropy"}, "tg": {"search": "tg"}}
    return params


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its best.json and progress.csv are what every recovery must give."""
    root = tmp_path_factory.mktemp("ref")
    exp = config.experiment(config.validate(_exp(root)))
    data.save(data.load(exp.cfg["data"]), exp.data_path)
    engine.run(exp, "tg", log=io.StringIO())
    d = exp.search_dir("tg")
    return (d / "best.json").read_text(), (d / "progress.csv").read_text()


def _fresh(tmp_path):
    exp = config.experiment(config.validate(_exp(tmp_path)))
    data.save(data.load(exp.cfg["data"]), exp.data_path)
    engine.run(exp, "tg", log=io.StringIO())
    return exp, exp.search_dir("tg")


def _truncate(p):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _foreign_pickle(p):
    p.write_bytes(pickle.dumps({"not": "a lossevo checkpoint"}))


def _retype_fitness(p):
    obj = json.loads(p.read_text())
    obj["results"][0]["fitness"] = "0.9"
    p.write_text(json.dumps(obj))


def _edit_fitness(p):  # valid JSON and types, but not what was written: caught by the checksum
    obj = json.loads(p.read_text())
    obj["results"][0]["fitness"] = 0.999
    p.write_text(json.dumps(obj))


DAMAGE = {
    "truncated optimizer.pkl": (lambda r: state.optimizer_path(r, 1), _truncate, "checksum"),
    "foreign optimizer.pkl": (lambda r: state.optimizer_path(r, 1), _foreign_pickle, "not a lossevo checkpoint"),
    "truncated shard": (lambda r: state.shard_path(r, 1, 0), _truncate, "not valid JSON"),
    "ill-typed shard": (lambda r: state.shard_path(r, 1, 1), _retype_fitness, "checksum"),
    "edited shard": (lambda r: state.shard_path(r, 0, 1), _edit_fitness, "checksum"),
    "truncated candidates": (lambda r: state.candidates_path(r, 2), _truncate, "not valid JSON"),
    "truncated summary": (lambda r: state.summary_path(r, 0), _truncate, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_state_is_a_one_line_error_then_a_recovery(tmp_path, reference, case):
    exp, root = _fresh(tmp_path)
    where, damage, words = DAMAGE[case]
    path = where(root)
    damage(path)
    # The fan-out path (a Snakemake job reading the file) stops with one line naming the file.
    g = int(path.parent.name.split("_")[1])
    with pytest.raises(LossevoError) as err:
        if path.name == "summary.json":
            engine.finalize(exp, "tg")  # the progress table reads every summary
        elif path.name == "candidates.json":
            engine.evaluate_shard(exp, "tg", g, 0)
        else:
            engine.step(exp, "tg", g + 1)  # tells generation g: reads its checkpoint and shards
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and words in msg and "lossevo search" in msg
    # The driver reports the damage and recomputes from the last complete generation.
    log = io.StringIO()
    engine.run(exp, "tg", log=log)
    assert "recomputing from generation" in log.getvalue()
    assert ((root / "best.json").read_text(), (root / "progress.csv").read_text()) == reference


def test_ill_typed_shard_is_named_even_with_a_matching_checksum(tmp_path):
    exp, root = _fresh(tmp_path)
    path = state.shard_path(root, 1, 0)
    obj = state.read_state(path)
    obj["results"][0]["fitness"] = "0.9"
    state.write_state(path, obj)
    with pytest.raises(state.StateError, match="candidate 0: fitness must be a finite number"):
        state.load_results(root, 1, 2)


def test_two_drivers_on_one_search_agree(tmp_path, reference):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_exp(tmp_path)))
    subprocess.run(lossevo_cmd() + ["prepare", "--params", str(path)], check=True, capture_output=True)
    cmd = lossevo_cmd() + ["search", "--workers", "1", "--params", str(path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "Traceback" not in "".join(o[1] for o in outs)
    root = tmp_path / "tiny" / "search" / "tg"
    assert ((root / "best.json").read_text(), (root / "progress.csv").read_text()) == reference
    assert any("waiting for it" in o[1] or "complete:" in o[1] for o in outs)
