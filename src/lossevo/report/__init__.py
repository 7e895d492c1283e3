"""Report stage: figures, ``report/report.md`` and ``metrics.json`` for one experiment.

:func:`build` reads what the earlier stages wrote (prepared data, search directories, retrain
JSONs, stats/welch.csv), checks that they belong together (a stale stats table or search is an
error, not a silently wrong report), draws the figures (:mod:`lossevo.report.figures`) and
writes the Markdown report and the flat ``metrics.json`` that ``dvc metrics show`` reads, and
``environment.json``, the stages' environment records (:mod:`lossevo.environment`).
Every number in the report is computed from those files; nothing is hard-coded but the
measured native-mode spread the Environment section quotes (``determinism.NATIVE_SPREAD``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lossevo.config import Experiment
from lossevo.errors import LossevoError
from lossevo.io import read_json, write_json, write_text
from lossevo.report import curves, evaluation, figures, html, sweeps
from lossevo.report.sections import (
    _caveats,
    _environment_section,
    _rel,
    _search_section,
    _settings_section,
    _shape_table,
    _trees_section,
    retrain_summary,
)
from lossevo.search import engine

# --------------------------------------------------------------------------- reading inputs


def _read(path: Path, hint: str) -> dict:
    if not Path(path).exists():
        raise LossevoError(f"{path}: not found (run `{hint}` first)")
    return read_json(path)


def retrain_records(exp: Experiment) -> dict[str, dict]:
    """Every retrained loss's JSON, in params order."""
    return {name: _read(exp.retrain_path(name), f"lossevo retrain -l {name}")
            for name in exp.loss_names()}


def welch_table(exp: Experiment, records: dict[str, dict]):
    """stats/welch.csv restricted to this experiment's losses, checked against the retrain JSONs."""
    import pandas as pd

    path = exp.stats_dir / "welch.csv"
    if not path.exists():
        raise LossevoError(f"{path}: not found (run `lossevo stats` first)")
    df = pd.read_csv(path).set_index("loss", drop=False)
    for name, rec in records.items():
        if name not in df.index:
            raise LossevoError(f"{path}: no row for loss {name!r} (rerun `lossevo stats`)")
        s = retrain_summary(rec)
        row = df.loc[name]
        if int(row["n"]) != s["n"] or not math.isclose(row["mean"], s["test_acc_mean"],
                                                        rel_tol=0, abs_tol=1e-9):
            raise LossevoError(
                f"{path}: row {name!r} (n={row['n']}, mean={row['mean']:.6f}) does not match "
                f"{exp.retrain_path(name)} (n={s['n']}, mean={s['test_acc_mean']:.6f}); "
                f"rerun `lossevo stats`"
            )
    return df.loc[list(records)].reset_index(drop=True)


def search_info(exp: Experiment, name: str, records: dict[str, dict]) -> dict:
    """Totals, picks and curves of one search, checked against the current settings."""
    scfg = exp.search_cfg(name)
    root = exp.search_dir(name)
    fp = _read(root / "search.json", f"lossevo search -s {name}")
    if fp["digest"] != engine.fingerprint(exp, name)["digest"]:
        raise LossevoError(f"{root}: search results were made with other settings "
                           f"(rerun `lossevo search -s {name}`)")
    best = _read(root / "best.json", f"lossevo search -s {name}")
    summaries = figures.generation_summaries(root, engine.generations(scfg))
    points = figures.candidate_points(root, engine.generations(scfg), scfg["shards"])
    paper = best["paper_pick"]
    sel = best.get("final_selection")
    chosen = sel["chosen"] if sel else paper

    def full_val(c: dict) -> float | None:
        if not sel:
            return None
        for row in sel["candidates"]:
            if (row["generation"], row["index"]) == (c["generation"], c["index"]):
                return row["full_val_mean"]
        return None

    retrained = [lname for lname, entry in exp.cfg["retrain"]["losses"].items()
                 if entry.get("search") == name]
    for lname in retrained:
        if lname in records and records[lname]["spec"] != best["spec"]:
            raise LossevoError(f"{exp.retrain_path(lname)}: its spec is not {root / 'best.json'}'s "
                               f"(rerun `lossevo retrain -l {lname}`)")
    total = {k: int(sum(s.get(k, 0) for s in summaries))
             for k in ("rejected", "failed", "retried", "evaluated", "trainings", "cached", "duplicate")}
    return {
        "name": name,
        "settings": scfg,
        "summaries": summaries,
        "points": points,
        "candidates": len(points),
        **total,
        "final_trainings": (len(sel["candidates"]) * len(sel["seeds"])) if sel else 0,
        "best_partial_val_acc": float(paper["fitness"]),
        "picked_by": best["picked_by"],
        "paper_pick": {**_pick(paper), "full_val_mean": full_val(paper)},
        "final_pick": {**_pick(chosen), "full_val_mean": full_val(chosen)} if sel else None,
        "final_steps": sel["steps"] if sel else None,
        "spec": best["spec"],
        "retrained": retrained,
        "method": scfg["method"],
        "glo": {k: best.get(k) for k in ("formula", "latex", "tree_phase_best",
                                         "unit_coefficient_fitness", "free_coefficients")}
        if scfg["method"] == "glo" else None,
    }


def _pick(c: dict) -> dict:
    return {"generation": c["generation"], "index": c["index"], "fitness": float(c["fitness"]),
            "spec": c["spec"]}


def split_summary(exp: Experiment) -> dict:
    from lossevo import data

    return data.load_prepared(exp.data_path).summary()


# --------------------------------------------------------------------------- metrics.json


def _finite(x):
    """JSON-safe: NaN/inf become None, recursively; numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def metrics(records: dict[str, dict], welch, searches: dict[str, dict], ev: dict | None = None,
            sw: dict | None = None) -> dict:
    """The flat metrics ``dvc metrics show`` prints (no NaN: missing values are null)."""
    p = dict(zip(welch["loss"], welch["p"]))
    retrain = {}
    for name, rec in records.items():
        s = retrain_summary(rec)
        retrain[name] = {"test_acc_mean": s["test_acc_mean"], "test_acc_std": s["test_acc_std"],
                         "p_vs_baseline": p.get(name), "diverged": s["diverged"]}
    search = {}
    for name, info in searches.items():
        fp = info["final_pick"]
        search[name] = {
            "best_partial_val_acc": info["best_partial_val_acc"],
            "rejected": info["rejected"], "failed": info["failed"], "retried": info["retried"],
            "evaluations": info["evaluated"], "trainings": info["trainings"],
            "cached": info["cached"],
            "final_val_acc": fp["full_val_mean"] if fp else None,
        }
    return _finite({"retrain": retrain, "search": search, **(evaluation.metrics(ev) if ev else {}),
                    **(sweeps.metrics(sw) if sw else {})})


# --------------------------------------------------------------------------- figures


def draw(exp: Experiment, records: dict, searches: dict, n_classes: int,
         ev: dict | None = None, sw: dict | None = None, cv: dict | None = None) -> dict[str, Path]:
    """Write every figure under report/figures; return {key: path}. Stale PNGs are removed."""
    fdir = exp.report_dir / "figures"
    out: dict[str, Path] = {}
    for name, info in searches.items():
        curve = figures.search_curve(info["points"], info["summaries"])
        picks = {f"paper pick (best partial, {info['paper_pick']['fitness']:.3f})":
                 (info["paper_pick"]["generation"], info["paper_pick"]["fitness"])}
        if info["final_pick"]:
            fpk = info["final_pick"]
            picks[f"final selection (full-length val {fpk['full_val_mean']:.3f})"] = (
                fpk["generation"], fpk["fitness"])
        out[f"search:{name}"] = figures.plot_search(
            curve, fdir / f"search_{name}.png", f"Search {name}", n_classes, picks)
        gen_curves = [
            tuple(figures.shape_curve(s["best_spec"], n)
                  for n in (2, n_classes))
            for s in info["summaries"]
        ]
        out[f"generations:{name}"] = figures.plot_generation_shapes(
            gen_curves, fdir / f"generation_shapes_{name}.png", name)
    shapes = {name: tuple(figures.shape_curve(rec["spec"], n) for n in (2, n_classes))
              for name, rec in records.items()}
    out["shapes"] = figures.plot_shapes(shapes, fdir / "loss_shapes.png")
    out["retrain"] = figures.plot_retrain(figures.retrain_accuracies(records),
                                          exp.cfg["stats"]["baseline"],
                                          fdir / "retrain_accuracy.png")
    if cv is not None:
        out.update(curves.draw(cv, fdir))
    if ev is not None:
        out.update({f"eval:{k}": v for k, v in evaluation.draw(ev, fdir).items()})
    if sw is not None:
        out.update({f"sweep:{k}": v for k, v in sweeps.draw(sw, fdir).items()})
    keep = {p.name for p in out.values()}
    for old in fdir.glob("*.png"):
        if old.name not in keep:
            old.unlink()
    return out


def environments(exp: Experiment) -> dict[str, dict | None]:
    """The stages' environment records keyed by stage (None: not recorded), and the report's own."""
    from lossevo import environment
    from lossevo.training import trainer

    out: dict[str, dict | None] = {stage: read_json(path) if path.exists() else None
                                   for stage, path in environment.stage_paths(exp).items()}
    out["report"] = environment.record(trainer.resolve_device(exp.cfg["device"]))
    return out


def markdown(exp: Experiment, split: dict, records: dict, welch, searches: dict,
             figs: dict[str, Path], ev: dict | None = None, envs: dict | None = None,
             sw: dict | None = None, cv: dict | None = None) -> str:
    """The whole report as Markdown (figures linked relative to report.md); ``envs``: the
    stages' environment records (default: :func:`environments`); ``cv``: the training curves
    (:func:`lossevo.report.curves.load`), None for none."""
    from lossevo import __version__
    from lossevo.evaluate import stats

    base = exp.report_dir
    n_classes = split["classes"]
    baseline = exp.cfg["stats"]["baseline"]
    best = welch.loc[welch["mean"].idxmax()]
    lines = [f"# Loss-function metalearning report: `{exp.name}`", ""]
    if exp.cfg.get("description"):
        lines += [exp.cfg["description"], ""]
    lines += [f"Generated by lossevo {__version__} from `{exp.root}`. Highest mean test accuracy: "
              f"`{best['loss']}` {best['mean']:.4f} (baseline `{baseline}` "
              f"{welch.loc[welch['loss'] == baseline, 'mean'].iloc[0]:.4f}).", ""]
    lines += _settings_section(exp, split, searches) + [""]
    lines += ["## Retraining: one-tailed Welch t-tests", "",
              f"Test accuracy over the retraining seeds; H1: the loss's mean is greater than "
              f"`{baseline}`'s. Stars: * p < 0.05, ** p < 0.01, *** p < 0.001.", ""]
    lines += [stats.markdown(welch, baseline).rstrip("\n"), ""]
    lines += [f"![test accuracy per seed]({_rel(figs['retrain'], base)})", ""]
    if cv is not None:
        lines += curves.section(cv, baseline, _rel(figs["curves"], base))
    if searches:
        lines += _search_section(searches, records, welch, n_classes) + [""]
        for name in searches:
            lines += [f"![search curve {name}]({_rel(figs[f'search:{name}'], base)})", ""]
    lines += ["## Loss shapes", "",
              "Loss of one example vs. the predicted probability p of the correct class, "
              "logits = log(probabilities); shifted so loss(p = 1) = 0, or so the minimum is 0 "
              "where loss(p = 1) is infinite. Dots mark each curve's minimum.", ""]
    lines += _shape_table(records, n_classes) + [""]
    lines += [f"![loss shapes]({_rel(figs['shapes'], base)})", ""]
    for name in searches:
        lines += [f"Each generation's best candidate in `{name}` (colour = generation):", "",
                  f"![generation shapes {name}]({_rel(figs[f'generations:{name}'], base)})", ""]
    if ev is not None:
        lines += evaluation.sections(ev, {k.split(":", 1)[1]: v for k, v in figs.items()
                                          if k.startswith("eval:")}, lambda p: _rel(p, base))
    if sw is not None:
        lines += sweeps.sections(sw, {k.split(":", 1)[1]: v for k, v in figs.items()
                                      if k.startswith("sweep:")}, lambda p: _rel(p, base))
    lines += _trees_section(searches)
    lines += _environment_section(envs if envs is not None else environments(exp)) + [""]
    lines += _caveats(exp, split, records, welch, searches, n_classes)
    return "\n".join(lines) + "\n"


def plot_tables(exp: Experiment, records: dict, searches: dict, cv: dict | None = None) -> None:
    """Long-format CSVs that ``dvc plots`` draws: search progress, accuracy per seed and, with
    ``retrain.curve_every``, test accuracy during training."""
    rows = ["search,generation,best_fitness,mean_fitness"]
    for name in searches:
        for s in figures.generation_summaries(exp.search_dir(name), engine.generations(exp.search_cfg(name))):
            rows.append(f"{name},{s['generation']},{s['best_fitness']:.6g},{s['mean_fitness']:.6g}")
    write_text(exp.root / "plots" / "search_progress.csv", "\n".join(rows) + "\n")
    rows = ["loss,seed,test_accuracy"]
    for name, r in records.items():
        rows += [f"{name},{seed},{acc:.6g}" for seed, acc in zip(r["seeds"], r["test_accuracy"])]
    write_text(exp.root / "plots" / "retrain_accuracy.csv", "\n".join(rows) + "\n")
    rows = ["loss,step,seed,test_accuracy"]  # header only without retrain.curve_every
    for name, a in (cv["accuracy"] if cv else {}).items():
        rows += [f"{name},{step},{seed},{acc:.6g}" for step, per_seed in zip(cv["steps"], a, strict=True)
                 for seed, acc in zip(records[name]["seeds"], per_seed, strict=True)]
    write_text(exp.root / "plots" / "training_curves.csv", "\n".join(rows) + "\n")


def build(exp: Experiment) -> Path:
    """Report stage: figures, report/report.md and metrics.json; returns report.md's path."""
    split = split_summary(exp)
    records = retrain_records(exp)
    welch = welch_table(exp, records)
    searches = {name: search_info(exp, name, records) for name in exp.cfg["search"]}
    ev = evaluation.load(exp)
    sw = sweeps.load(exp)
    cv = curves.load(records, exp.cfg["training"]["steps"])
    figs = draw(exp, records, searches, split["classes"], ev, sw, cv)
    write_json(exp.root / "metrics.json", metrics(records, welch, searches, ev, sw))
    envs = environments(exp)
    write_json(exp.root / "environment.json", envs)
    plot_tables(exp, records, searches, cv)
    path = write_text(exp.report_dir / "report.md",
                      markdown(exp, split, records, welch, searches, figs, ev, envs, sw, cv))
    html.write(path, f"lossevo report: {exp.name}")
    return path
