"""The cost of ``determinism: portable``: the benchmark's main workloads, portable vs native.

    .venv/bin/python benchmarks/bench_determinism.py            # ~1.5 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_determinism.py --quick    # ~40 s

The settings act when torch and numpy load (:mod:`lossevo.determinism`), so each measurement
runs in its own subprocess, which applies one mode before importing anything, warms up and
times both workloads of bench_training.py's main rows:

- ``trainer.train``, digits MLP 64-100-100-10, one Taylor loss (steps/s);
- ``train_many`` batched, P=16 Taylor losses in one population pass (candidate-steps/s).

Repetitions alternate the order of the two modes (portable first, then native first, ...);
the table shows medians, their ratio and the range over the repetitions. Torch threads: 1, the
pipeline's ``threads`` per worker (``--threads`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(mode: str, threads: int, trainer_steps: int, pop_steps: int) -> None:
    """One measurement: apply ``mode``, then import torch, warm up, time both workloads; print JSON."""
    from lossevo import determinism

    determinism.apply(mode)
    import torch

    sys.path.insert(0, str(HERE))
    from bench_training import DIGITS, MLP, RECIPE, taylor_specs

    from lossevo import data, losses
    from lossevo.training import population, trainer

    torch.set_num_threads(threads)
    split = data.load(DIGITS)
    specs = taylor_specs(16)
    single_spec = taylor_specs(1, seed=1)[0]

    def single(steps: int) -> None:
        trainer.train(MLP, split, losses.build(single_spec), RECIPE, 0, steps=steps, evaluate_test=False)

    def pop(steps: int) -> None:
        population.train_many(MLP, split, specs, RECIPE, [0] * len(specs), steps=steps, evaluate_test=False,
                              max_population=len(specs), batched=True)

    single(20)
    pop(5)
    times = {}
    for name, fn, steps in (("single", single, trainer_steps), ("pop", pop, pop_steps)):
        t0 = time.perf_counter()
        fn(steps)
        times[name] = time.perf_counter() - t0
    print(json.dumps({"times": times, "aten": determinism.aten_capability(), "mkl": determinism.mkl_cbwr()}))


def measure(mode: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSEVO_DETERMINISM")}
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--threads", str(args.threads),
                          "--trainer-steps", str(args.trainer_steps), "--pop-steps", str(args.pop_steps)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        sys.exit(f"{mode} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per mode (default 7, quick 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the pipeline)")
    ap.add_argument("--child", choices=("portable", "native"), help=argparse.SUPPRESS)
    ap.add_argument("--trainer-steps", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pop-steps", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.threads, args.trainer_steps, args.pop_steps)
    args.reps = args.reps or (3 if args.quick else 7)
    args.trainer_steps = args.trainer_steps or (300 if args.quick else 1000)
    args.pop_steps = args.pop_steps or (40 if args.quick else 100)
    print(f"{args.reps} repetitions per mode, each in a fresh process; torch threads {args.threads}; "
          f"{os.cpu_count()} CPUs", flush=True)
    runs: dict[str, list[dict]] = {"portable": [], "native": []}
    for r in range(args.reps):
        for mode in (("portable", "native") if r % 2 == 0 else ("native", "portable")):
            runs[mode].append(measure(mode, args))
        print(f"  rep {r + 1}: " + "  ".join(f"{m} single {runs[m][-1]['times']['single']:.2f}s "
                                              f"pop {runs[m][-1]['times']['pop']:.2f}s" for m in runs), flush=True)
    for mode, rs in runs.items():
        print(f"{mode}: ATen {rs[0]['aten']} kernels, MKL branch {rs[0]['mkl']}")
    print()
    print(f"{'workload':34s} {'portable':>10s} {'native':>10s} {'native/portable':>16s}   ranges (portable; native)")
    for key, label, n in (("single", "digits MLP, trainer.train", args.trainer_steps),
                          ("pop", "digits MLP, batched P=16 Taylor", 16 * args.pop_steps)):
        rate = {m: [n / x["times"][key] for x in rs] for m, rs in runs.items()}
        med = {m: statistics.median(v) for m, v in rate.items()}
        print(f"{label:34s} {med['portable']:10.0f} {med['native']:10.0f} {med['native'] / med['portable']:16.3f}"
              f"   {min(rate['portable']):.0f}-{max(rate['portable']):.0f}; "
              f"{min(rate['native']):.0f}-{max(rate['native']):.0f}")
    print("(rates: steps/s for trainer.train, candidate-steps/s for the population; "
          "native/portable > 1: portable is slower by that factor)")


if __name__ == "__main__":
    sys.exit(main())
