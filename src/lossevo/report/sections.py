"""The report's Markdown sections: settings, searches, loss shapes, GLO trees, environment, caveats.

Each function turns what :mod:`lossevo.report` gathered into lines of Markdown; nothing here
reads files, so every section is testable from small dicts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lossevo.config import Experiment
from lossevo.report import figures
from lossevo.report.evaluation import _table

CE_SPEC = {"kind": "cross_entropy"}


def retrain_summary(record: dict) -> dict:
    """Mean and sample std (ddof = 1, as the Welch table) of a loss's test accuracies."""
    acc = np.asarray(record["test_accuracy"], dtype=float)
    return {
        "n": int(acc.size),
        "test_acc_mean": float(acc.mean()),
        "test_acc_std": float(acc.std(ddof=1)) if acc.size > 1 else math.nan,
        "diverged": int(sum(s != "ok" for s in record["status"])),
    }


def _fmt(x, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _theta(theta: list[float]) -> str:
    return "[" + ", ".join(f"{t:.3g}" for t in theta) + "]"


def _loss_text(spec: dict) -> str:
    """A searched loss in a table cell: θ for a Taylor loss, else its short description."""
    from lossevo.losses import describe

    return _theta(spec["theta"]) if spec["kind"] == "taylor" else describe(spec)


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def _settings_section(exp: Experiment, split: dict, searches: dict) -> list[str]:
    cfg = exp.cfg
    d, m, t, r = cfg["data"], cfg["model"], cfg["training"], cfg["retrain"]
    model = ", ".join(f"{k}={v}" for k, v in m.items() if k != "name")
    sched = (f"; lr × {t['gamma']} at steps {t['milestones']}" if t.get("milestones") else "")
    seeds = list(range(r["seed_offset"], r["seed_offset"] + r["seeds"]))
    lines = ["## Settings", ""]
    lines += _table(["setting", "value"], [
        ["dataset", f"{d['dataset']} (train_fraction {d.get('train_fraction', 1.0):g}, "
                    f"split_seed {d.get('split_seed', 0)}"
                    + (f", normalize {d['normalize']}" if d.get("normalize") else "")
                    + (f", {d['crop']}×{d['crop']} crops: central for validation/test, random for training"
                       if d.get("crop") else "") + ")"],
        ["split sizes", f"{split['train']} train / {split['val']} validation / "
                        f"{split['test']} test; {split['classes']} classes; "
                        f"input {split['input_shape']}"],
        ["model", f"{m['name']}" + (f" ({model})" if model else "")],
        ["training", f"SGD lr {t['lr']}, momentum {t.get('momentum', 0.0)}, weight decay "
                     f"{t.get('weight_decay', 0.0)}, batch {t['batch_size']}, {t['steps']} steps"
                     + sched],
        ["augmentation", _augment_text(t.get("augment"))],
        ["partial runs", f"{t.get('partial_schedule', 'truncate')} the full schedule"
                         + (f"; precision {t['precision']}" if t.get("precision", "fp32") != "fp32" else "")],
        ["retraining", f"{r['seeds']} seeds ({seeds[0]}–{seeds[-1]}) per loss, full length"
                       + (f"; test accuracy every {r['curve_every']} steps" if r.get("curve_every") else "")],
        ["statistics", f"one-tailed Welch t-test vs `{cfg['stats']['baseline']}`, "
                       f"α = {cfg['stats']['alpha']}"],
    ])
    if searches:
        keys = ["method", "order", "variables", "convention", "leaves", "class_reduction", "sigma",
                "popsize", "generations", "partial_steps", "invariant", "cma_active", "elites",
                "crossover", "mutation", "max_depth_init", "max_height", "init_require_leaves",
                "coefficients", "fitness", "seed", "shards", "attempts", "abort", "final_selection"]
        keys = [k for k in keys if any(k in info["settings"] for info in searches.values())]
        lines += ["", "Search settings:", ""]
        lines += _table(["setting", *searches],
                        [[k, *(_cell(info["settings"].get(k, "–")) for info in searches.values())]
                         for k in keys])
    return lines


def _augment_text(cfg: dict | None) -> str:
    """The training batches' augmentation in words ("none" when off)."""
    from lossevo.training import augment

    cfg = augment.parse(cfg)
    if cfg is None:
        return "none"
    parts = []
    if cfg.get("crop"):
        parts.append(f"random crop, padding {cfg['crop']['padding']}")
    if cfg.get("flip"):
        parts.append("horizontal flip")
    if cfg.get("brightness"):
        parts.append(f"brightness ± {cfg['brightness']['max_delta']:g}")
    if cfg.get("contrast"):
        parts.append(f"contrast × {cfg['contrast']['lower']:g}–{cfg['contrast']['upper']:g}")
    if cfg.get("cutout"):
        parts.append(f"Cutout {cfg['cutout']['holes']} × {cfg['cutout']['length']} px")
    if cfg.get("cutmix"):
        parts.append(f"CutMix p {cfg['cutmix']['prob']}, α {cfg['cutmix']['alpha']}")
    return ", ".join(parts)


def _cell(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {v2}" for k, v2 in v.items())
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


def _search_section(searches: dict, records: dict, welch, n_classes: int) -> list[str]:
    p = dict(zip(welch["loss"], welch["p"]))
    rows = {
        "popsize × generations": [], "total candidates": [], "rejected without training": [],
        "failed (aborted / NaN)": [], "retried": [], "evaluations (trained candidates)": [],
        "fitness from the cache (equivalent loss trained before)": [],
        "equal to another candidate of the generation (trained once)": [],
        "trainings incl. retries": [], "final-selection trainings (full length)": [],
        "best partial-training val. accuracy": [], "paper's pick: gen/idx, partial val.": [],
        "paper's pick: full-length val. mean": [], "paper's pick: loss": [],
        "final-selection pick: gen/idx, partial val.": [],
        "final-selection pick: full-length val. mean": [], "final-selection pick: loss": [],
        "retrained loss (picked by)": [], "retrained test accuracy, mean (std)": [],
        "p vs baseline": [],
    }
    for info in searches.values():
        s, pp, fp = info["settings"], info["paper_pick"], info["final_pick"]
        rows["popsize × generations"].append(
            f"{s['popsize']} × {s['generations']}" + (
                f" trees + {s['coefficients']['popsize']} × {s['coefficients']['generations']} "
                f"coefficients" if s["method"] == "glo" else ""))
        rows["total candidates"].append(info["candidates"])
        why = ("tree lacks x or a prediction" if s["method"] == "glo"
               else "invariant" if s.get("invariant") else "invariant off")
        rows["rejected without training"].append(f"{info['rejected']} ({why})")
        rows["failed (aborted / NaN)"].append(info["failed"])
        rows["retried"].append(info["retried"])
        rows["evaluations (trained candidates)"].append(info["evaluated"])
        rows["fitness from the cache (equivalent loss trained before)"].append(info["cached"])
        rows["equal to another candidate of the generation (trained once)"].append(info["duplicate"])
        rows["trainings incl. retries"].append(info["trainings"])
        rows["final-selection trainings (full length)"].append(
            f"{info['final_trainings']} × {info['final_steps']} steps" if fp else "0 (off)")
        rows["best partial-training val. accuracy"].append(_fmt(info["best_partial_val_acc"]))
        rows["paper's pick: gen/idx, partial val."].append(
            f"{pp['generation']}/{pp['index']}, {pp['fitness']:.4f}")
        rows["paper's pick: full-length val. mean"].append(_fmt(pp["full_val_mean"]))
        rows["paper's pick: loss"].append(_loss_text(pp["spec"]))
        if fp:
            rows["final-selection pick: gen/idx, partial val."].append(
                f"{fp['generation']}/{fp['index']}, {fp['fitness']:.4f}")
            rows["final-selection pick: full-length val. mean"].append(_fmt(fp["full_val_mean"]))
            rows["final-selection pick: loss"].append(
                "same as the paper's pick" if fp["spec"] == pp["spec"] else _loss_text(fp["spec"]))
        else:
            for k in ("final-selection pick: gen/idx, partial val.",
                      "final-selection pick: full-length val. mean", "final-selection pick: loss"):
                rows[k].append("– (off)")
        names = [n for n in info["retrained"] if n in records]
        rows["retrained loss (picked by)"].append(
            ", ".join(f"`{n}`" for n in names) + f" ({info['picked_by']})" if names
            else "– (not retrained)")
        accs = [retrain_summary(records[n]) for n in names]
        rows["retrained test accuracy, mean (std)"].append(
            "; ".join(f"{a['test_acc_mean']:.4f} ({_fmt(a['test_acc_std'])})" for a in accs) or "–")
        rows["p vs baseline"].append("; ".join(_fmt(p.get(n), ".3g") for n in names) or "–")
    lines = ["## Searches side by side", "",
             f"Fitness = validation accuracy after partial training (chance = 1/{n_classes} = "
             f"{1 / n_classes:.3f}). θ in each search's convention (paper layout unless stated).",
             ""]
    lines += _table(["", *searches], [[k, *v] for k, v in rows.items()])
    return lines


def _caveats(exp: Experiment, split: dict, records: dict, welch, searches: dict,
             n_classes: int) -> list[str]:
    cfg = exp.cfg
    baseline, alpha = cfg["stats"]["baseline"], cfg["stats"]["alpha"]
    out = []
    n = sorted({len(r["seeds"]) for r in records.values()})
    seeds = f"{n[0]}" if len(n) == 1 else f"{n[0]}–{n[-1]}"
    seeds_used = ", ".join(f"{k}: {v['settings']['seed']}" for k, v in searches.items())
    out.append(
        f"The t-tests cover training-seed variance only: {seeds} seeds per loss on one fixed "
        f"split (split_seed {cfg['data'].get('split_seed', 0)}, {split['test']} test examples). "
        + (f"Each search ran once (search seed {seeds_used}), so search-to-search variance is not in "
           f"the p-values." if searches else ""))
    others = welch[welch["loss"] != baseline]
    if len(others):
        sig = others[others["p"] < alpha]
        holm = others[others["p_holm"] < alpha] if "p_holm" in others else others.iloc[:0]
        diff = (others["mean"] - welch.loc[welch["loss"] == baseline, "mean"].iloc[0]).abs().max()
        out.append(
            f"{len(others)} losses are tested against `{baseline}`: {len(sig)} have p < {alpha}; "
            f"with Holm's correction across these {len(others)} tests {len(holm)} remain. "
            f"One test example is {1 / split['test']:.4f} accuracy; the largest absolute "
            f"difference from the baseline mean is {diff:.4f} "
            f"({diff * split['test']:.1f} examples).")
    ce = figures.logit_gradient_norm(CE_SPEC, n_classes)
    ratios = ", ".join(
        f"`{k}` {figures.logit_gradient_norm(r['spec'], n_classes) / ce:.2f}×"
        for k, r in records.items() if r["spec"]["kind"] != "cross_entropy")
    if ratios:
        out.append(
            f"The loss scale acts as a learning rate: SGD's lr ({cfg['training']['lr']}) is "
            f"the same for every loss, and at the uniform prediction ‖∂L/∂logits‖ relative "
            f"to cross-entropy is {ratios}. Part of a learned loss's gain may be a better "
            f"effective step size.")
    for k, info in searches.items():
        names = [nm for nm in info["retrained"] if nm in records]
        test = "; ".join(f"{retrain_summary(records[nm])['test_acc_mean']:.4f}" for nm in names)
        text = (f"`{k}`: the best partial-training validation accuracy "
                f"({info['best_partial_val_acc']:.4f}) is the maximum over {info['evaluated']} "
                f"trained candidates on the validation set used for selection, so it is "
                f"optimistic" + (f"; the retrained test accuracy is {test}." if test else "."))
        if info["failed"]:
            text += (f" {info['failed']} of {info['evaluated']} trained candidates failed "
                     f"(aborted or NaN) and keep their last measured accuracy as fitness.")
        if info["settings"].get("invariant"):
            text += (f" {info['rejected']} of {info['candidates']} candidates "
                     f"({100 * info['rejected'] / max(1, info['candidates']):.0f}%) were rejected "
                     f"by the invariant without training (fitness 0 for CMA-ES).")
        fp = info["final_pick"]
        if fp and fp["spec"] != info["paper_pick"]["spec"]:
            text += (f" The final selection ({info['final_trainings']} extra full-length "
                     f"trainings, scored on validation data only) replaced the paper's pick "
                     f"(full-length val. {_fmt(info['paper_pick']['full_val_mean'])}) by gen "
                     f"{fp['generation']}/{fp['index']} ({_fmt(fp['full_val_mean'])}).")
        out.append(text)
    budgets = {k: v["trainings"] + v["final_trainings"] for k, v in searches.items()}
    if len(set(budgets.values())) > 1:
        out.append("The searches had different budgets (trainings incl. retries and final "
                   "selection: " + ", ".join(f"`{k}` {v}" for k, v in budgets.items())
                   + "), so their comparison is not at equal cost.")
    diverged = {k: retrain_summary(r)["diverged"] for k, r in records.items()}
    if any(diverged.values()):
        out.append("Diverged retraining runs count as accuracy 0: " + ", ".join(
            f"`{k}` {v}" for k, v in diverged.items() if v) + ".")
    else:
        out.append("No retraining run diverged.")
    out.append(
        f"Loss-shape curves are a one-dimensional slice (all wrong classes equally likely). "
        f"The {n_classes}-class curve uses this dataset's number of classes; the binary curve "
        f"is the papers' plot and can be dominated by class-independent terms that the softmax "
        f"cancels.")
    return ["## Caveats", ""] + [f"- {c}" for c in out]


def _shape_table(records: dict, n_classes: int) -> list[str]:
    from lossevo.losses import describe

    rows = []
    for name, rec in records.items():
        b, nc = (figures.shape_curve(rec["spec"], n) for n in (2, n_classes))
        rows.append([f"`{name}`", describe(rec["spec"]), f"{b.p_min:.3f}", f"{nc.p_min:.3f}",
                     f"{figures.logit_gradient_norm(rec['spec'], n_classes):.3f}"])
    return _table(["loss", "kind", "binary: min at p", f"{n_classes}-class: min at p",
                   "‖∂L/∂logits‖ at the uniform prediction"], rows)


def _trees_section(searches: dict) -> list[str]:
    """GLO searches: the tree phase's best and the tuned loss as formulas (text and LaTeX)."""
    lines = []
    for name, info in searches.items():
        g = info["glo"]
        if not g:
            continue
        from lossevo.losses import tree

        tb = g["tree_phase_best"]
        t = tree.parse(tb["expr"], info["settings"]["leaves"])
        lines += [f"## Discovered tree: `{name}`", "",
                  f"Loss = −Σ over classes of f(x, y) ({info['settings']['class_reduction']} over "
                  f"classes), mean over the batch; x one-hot label, y softmax output.", "",
                  f"- Tree phase's best (gen {tb['generation']}/{tb['index']}, partial val. "
                  f"{tb['fitness']:.4f}): `{tb['expr']}`, i.e. f = `{tree.infix(t)}`"]
        if g["unit_coefficient_fitness"] is not None:
            lines += [f"- Coefficient phase: {sum(g['free_coefficients'])} of {len(t)} node "
                      f"coefficients free (the others absorbed by them); the unit coefficients "
                      f"scored {g['unit_coefficient_fitness']:.4f} in the phase's first "
                      f"generation, the phase's best candidate {info['paper_pick']['fitness']:.4f}.",
                      f"- Retrained loss ({info['picked_by'].replace('_', ' ')}): "
                      f"f = `{g['formula']}`", "", f"$$f = {g['latex']}$$"]
        lines += [""]
    return lines


def _environment_rows(rec: dict) -> dict[str, str]:
    """One stage's record as the report's table rows."""
    lv, cuda, cpu, det = rec["lossevo"], rec["cuda"], rec["cpu"], rec["determinism"]
    commit = lv["commit"][:12] + (" with uncommitted changes" if lv.get("dirty") else "")
    blas = rec.get("numpy_blas") or {}
    threads = rec["threads"]
    mode = det["mode"] + (f" (fell back: {det['fallback']})" if det.get("fallback") else "")
    return {
        "lossevo": f"{lv['version']}, commit {commit}",
        "Python / torch / numpy": f"{rec['python']} / {rec['torch']} / {rec['packages'].get('numpy')}",
        "CUDA / cuDNN": f"{cuda['build'] or 'none'} ({'available' if cuda['available'] else 'no GPU'}) / "
                        f"{cuda['cudnn'] or '–'}",
        "MKL / oneDNN / numpy's BLAS": f"{rec['mkl'] or '–'} / {rec['onednn'] or '–'} / "
                                       f"{blas.get('library', '–')} {blas.get('version', '')}".rstrip(),
        "CPU": cpu["model"],
        "GPU / device": f"{rec['gpu'] or 'none'} / {rec['device']}",
        "threads": f"torch {threads['torch']}, MKL {threads['mkl']}, OpenMP {threads['openmp']}, "
                   f"OpenBLAS {blas.get('threads', '–')}",
        "determinism": f"{mode}: ATen {cpu['aten_capability']} kernels, MKL branch {det['mkl_cbwr']}, "
                       f"OpenBLAS {blas.get('architecture', '–')}, numpy SIMD "
                       f"{', '.join(rec.get('numpy_simd') or []) or '–'}",
    }


def _environment_section(envs: dict[str, dict | None]) -> list[str]:
    """What produced the results (one column, or one per stage where they differ) and how far
    results may move where the portable settings cannot run."""
    from lossevo import determinism

    rows = {stage: _environment_rows(rec) for stage, rec in envs.items() if rec}
    groups: dict[str, list[str]] = {}  # one column per distinct environment
    for stage, r in rows.items():
        groups.setdefault(json.dumps(r, sort_keys=True), []).append(stage)
    header = [", ".join(stages) for stages in groups.values()]
    first = [rows[stages[0]] for stages in groups.values()]
    lines = ["## Environment", "", "What produced these results (every stage's record is in "
             "`environment.json`):", ""]
    lines += _table(["", *header], [[k, *(r[k] for r in first)] for k in first[0]])
    missing = [stage for stage, rec in envs.items() if not rec]
    if missing:
        lines += ["", f"Not recorded (written before environment records): {', '.join(missing)}."]
    sp = determinism.NATIVE_SPREAD
    a, b = sp["search_retrained_mean_test_acc"]
    lines += ["", "With `determinism: portable` the same seed gives byte-identical results on any x86-64 "
              "CPU with AVX2 and the same library versions; where the portable settings cannot run (a CPU "
              "without AVX2, another architecture, `determinism: native`, a GPU), results are not "
              "bit-identical: measured on the demo in native mode across ATen kernel sets and MKL "
              f"branches, retraining a fixed loss moved its mean test accuracy by up to "
              f"{sp['fixed_loss_mean_test_acc']:.4f} (a single seed by {sp['fixed_loss_seed_test_acc']:.3f}, "
              f"one test example), but a search can take another path and pick another loss (the demo's "
              f"`{sp['search']}`: another θ, retrained mean test accuracy {a:.4f} vs {b:.4f})."]
    return lines


