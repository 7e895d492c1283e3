"""Command line: one subcommand per pipeline stage. Thin: parse, call the library, report.

Every stage reads params.yaml (``--params``) and an experiment name (``-e``, default: the one
params.yaml selects). Errors print one line ``lossevo: error: ...`` and exit with status 2.

Before anything imports torch or numpy, :func:`main` applies params.yaml's ``determinism`` mode
(:mod:`lossevo.determinism`): the libraries read those settings once, when they load. So this
module imports neither at the top, and every stage imports its library code inside its command.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from lossevo import __version__, determinism
from lossevo.errors import LossevoError

# lossevo.data.DATASETS, written out: importing lossevo.data here would load torch too early.
DATASET_NAMES = ("digits", "mnist", "cifar10", "cifar100", "svhn")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the default also prints the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _experiment(args):
    import dataclasses

    from lossevo import config

    exp = config.experiment(config.load_params(args.params), args.experiment)
    return dataclasses.replace(exp, threads=args.threads) if args.threads else exp


def cmd_validate(args) -> None:
    from lossevo import config

    params = config.load_params(args.params)
    print(f"{args.params}: ok ({len(params['experiments'])} experiments; selected {params['experiment']!r})")


def cmd_show_experiment(args) -> None:
    print(_experiment(args).name)


def cmd_download(args) -> None:
    from lossevo import data

    where = data.download(args.dataset, args.root)
    if where is None:
        print(f"[download] {args.dataset} is bundled with scikit-learn: nothing to download")
    else:
        print(f"[download] {args.dataset} -> {where}")


def cmd_prepare(args) -> None:
    from lossevo import data

    exp = _experiment(args)
    split = data.load(exp.cfg["data"])
    data.save(split, exp.data_path)
    print(f"[prepare] {exp.cfg['data']['dataset']}: {split.summary()} -> {exp.data_path}")


def cmd_search(args) -> None:
    from lossevo.search import engine

    exp = _experiment(args)
    for name in args.search or list(exp.cfg["search"]):
        workers = args.workers or min(os.cpu_count() or 1, exp.search_cfg(name)["shards"])
        best = engine.run(exp, name, workers=workers)
        print(f"[search {name}] picked by {best['picked_by']} -> {exp.search_dir(name) / 'best.json'}")


def cmd_search_step(args) -> None:
    from lossevo.search import engine

    print(f"[search {args.search}] step -> {engine.step(_experiment(args), args.search, args.generation)}")


def cmd_search_shard(args) -> None:
    from lossevo.search import engine

    path = engine.evaluate_shard(_experiment(args), args.search, args.generation, args.shard)
    print(f"[search {args.search}] shard -> {path}")


def cmd_search_finalize(args) -> None:
    from lossevo.search import engine

    exp = _experiment(args)
    best = engine.finalize(exp, args.search)
    print(f"[search {args.search}] picked by {best['picked_by']}: {best['spec']}")


def cmd_retrain(args) -> None:
    from lossevo import retrain

    exp = _experiment(args)
    names = exp.loss_names() if args.loss == ["all"] else args.loss
    for name in names:
        retrain.resolve_spec(exp, name)  # fail fast, before any training
    t0 = time.perf_counter()
    workers = args.workers or min(os.cpu_count() or 1, len(names))
    for path in retrain.retrain_all(exp, names, workers):
        print(f"[retrain] {path}")
    print(f"[retrain] {len(names)} losses x {len(retrain.seeds(exp))} seeds in {time.perf_counter() - t0:.1f}s")


def cmd_stats(args) -> None:
    from lossevo.evaluate import stats

    exp = _experiment(args)
    df = stats.write(exp)
    print(stats.markdown(df, exp.cfg["stats"]["baseline"]), end="")


def _analysis(name: str):
    """A subcommand running one evaluation stage over the retrained networks."""

    def cmd(args) -> None:
        from lossevo.evaluate import analyses

        func = {"fgsm": analyses.fgsm, "basins": analyses.basin_curves,
                "weights": analyses.weight_statistics}[name]
        print(f"[{name}] -> {func(_experiment(args))}")

    return cmd


def _sweep(name: str):
    """A subcommand running one sweep stage (new trainings with the retraining recipe)."""

    def cmd(args) -> None:
        from lossevo.evaluate import sweeps

        t0 = time.perf_counter()
        path = getattr(sweeps, name)(_experiment(args), workers=args.workers or os.cpu_count() or 1)
        print(f"[{name}] -> {path} ({time.perf_counter() - t0:.1f}s)")

    return cmd


def cmd_report(args) -> None:
    from lossevo import report

    print(f"[report] -> {report.build(_experiment(args))}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lossevo", description="Loss-function metalearning, one subcommand per pipeline stage "
                "(data, GLO and TaylorGLO searches, retraining, Welch t-tests, report). Parameters: params.yaml.")
    p.add_argument("--version", action="version", version=f"lossevo {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    common.add_argument("-e", "--experiment", help="experiment name (default: params.yaml's `experiment`)")
    common.add_argument("--threads", type=int, default=None, help="torch threads (default: params `threads`)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    add("validate", cmd_validate, "validate params.yaml")
    add("show-experiment", cmd_show_experiment, "print the selected experiment's name")
    d = sub.add_parser("download", help="fetch a dataset's files into a torchvision root (the only step "
                       "that downloads)", description="fetch a dataset's train and test files with "
                       "torchvision (md5-checked) into --root, where data.root points")
    d.add_argument("dataset", metavar="DATASET", help="one of: " + ", ".join(DATASET_NAMES))
    d.add_argument("--root", default="data", help="torchvision root (default: data, data.root's default)")
    d.set_defaults(func=cmd_download, params="params.yaml")  # needs no params.yaml (main() reads it leniently)
    add("prepare", cmd_prepare, "load the dataset, split it, write results/EXP/data.pt")
    s = add("search", cmd_search, "run searches to the end (resumable; same result as the Snakemake fan-out)")
    s.add_argument("-s", "--search", nargs="+", help="search names under experiments.EXP.search (default: all)")
    s.add_argument("--workers", type=int, default=0, help="parallel shard workers (default: min(cores, shards))")
    for name, func, help in [
        ("search-step", cmd_search_step, "tell generation G-1's fitnesses, ask generation G"),
        ("search-shard", cmd_search_shard, "evaluate one shard of generation G"),
    ]:
        sp = add(name, func, help)
        sp.add_argument("-s", "--search", required=True)
        sp.add_argument("-g", "--generation", type=int, required=True)
        if name == "search-shard":
            sp.add_argument("--shard", type=int, required=True)
    f = add("search-finalize", cmd_search_finalize, "tell the last generation, final selection, best.json")
    f.add_argument("-s", "--search", required=True)
    r = add("retrain", cmd_retrain, "retrain losses from scratch over the retraining seeds")
    r.add_argument("-l", "--loss", nargs="+", default=["all"], help="loss names (default: all)")
    r.add_argument("--workers", type=int, default=0, help="parallel workers (default: min(cores, losses))")
    add("stats", cmd_stats, "one-tailed Welch t-tests against the baseline loss")
    add("fgsm", _analysis("fgsm"), "test accuracy of the retrained networks under FGSM, per epsilon")
    add("basins", _analysis("basins"), "accuracy basins along filter-normalised random directions")
    add("weights", _analysis("weights"), "weight statistics: L2 norm, mean, histograms, Laplace vs Gaussian")
    for name, help in [
        ("data_sweep", "retrain the losses on stratified fractions of the training data"),
        ("lr_sweep", "the baseline over a grid of learning rates vs the other losses"),
        ("taylor_ce", "train Taylor approximations of cross-entropy of several orders"),
    ]:
        sp = add(name.replace("_", "-"), _sweep(name), help)
        sp.add_argument("--workers", type=int, default=0, help="parallel workers (default: cores)")
    add("report", cmd_report, "figures, Markdown report and metrics.json")
    return p


def _pin_hash_seed() -> None:
    """Run the command under PYTHONHASHSEED=0 (re-executing once, before anything heavy loads).

    Python salts ``hash()`` of bytes per process; pycma keys its solution archives that way, so
    without a fixed seed the same search pickles different bytes on every run (and DVC would see
    its outputs change). Spawned workers and child commands inherit the setting.
    """
    if os.environ.get("PYTHONHASHSEED") == "0":
        return
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, "-m", "lossevo.cli", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the console script (not a call from Python): pin the hash seed first
        _pin_hash_seed()
    p = parser()
    args = p.parse_args(argv)
    try:
        determinism.apply(determinism.read_mode(args.params))  # before torch and numpy load
        if args.command not in ("validate", "show-experiment", "download"):
            import torch

            from lossevo import config

            threads = args.threads or config.load_params(args.params)["threads"]
            torch.set_num_threads(threads)
        args.func(args)
    except LossevoError as exc:
        print(f"lossevo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lossevo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
