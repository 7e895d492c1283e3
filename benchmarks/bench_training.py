"""Training throughput: population-batched vs one-after-another, and the trainer's own overhead.

    .venv/bin/python benchmarks/bench_training.py            # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_training.py --quick    # well under a minute
    .venv/bin/python benchmarks/bench_training.py --trees    # only the GLO-tree row, ~15 s

Every pair is measured side by side in one process, interleaved (alternating which side goes
first), over several repetitions; the table shows medians and the ratio of the medians.

1. ``train_many`` batched vs ``train_many(batched=False)`` (``trainer.train`` per candidate)
   for P candidates of the embedded default: digits (10 % training fraction), MLP 64-100-100-10,
   SGD lr 0.1, batch 32, Taylor losses (order 3 over x, y) with θ ~ N(0, 0.3), one seed.
   Throughput is candidate-steps per second, model building and the final validation pass
   included (``evaluate_test=False``, as in a search).
   Also a generation of GLO trees: the 16 different fixed trees of :data:`TREES` (3-9 nodes,
   Baikal-like and random-looking), one population pass vs one after another.
2. ``trainer.train`` vs a minimal hand-written PyTorch loop on the same model, loss and batches.
3. (not with ``--quick``; ``--threads`` forces it) local parallelism for the tiny model: two
   1-thread worker processes (spawn pool, as the search driver uses) vs one 2-thread process,
   each doing the same two shards.
With CUDA, everything runs there and the MNIST basic CNN (random 1×28×28 data) is added.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

from lossevo import data, losses
from lossevo.data import Split
from lossevo.training import population, trainer

DIGITS = {"dataset": "digits", "train_fraction": 0.1, "val_size": 297, "test_size": 500,
          "split_seed": 0}
MLP = {"name": "mlp", "hidden": [100, 100]}
RECIPE = {"lr": 0.1, "batch_size": 32, "steps": 1000}
#: A generation of 16 different, valid GLO trees (3-9 nodes): Baikal, cross-entropy-like and
#: random-looking ones, as a GLO search would evaluate them.
TREES = (
    "sub(log(y), div(x, y))", "mul(x, log(y))", "sub(log(y), div(x, sqrt(y)))",
    "mul(add(x, 1), log(y))", "sub(mul(x, log(y)), square(y))", "div(mul(x, log(y)), add(y, 1))",
    "sub(mul(x, y), square(y))", "sub(sqrt(y), div(x, y))", "mul(x, sqrt(y))", "log(add(y, x))",
    "sub(mul(x, log(y)), mul(y, log(y)))", "div(x, sub(2, y))", "mul(x, y)",
    "sub(x, square(sub(x, y)))", "mul(x, log(mul(y, y)))", "sub(mul(x, log(y)), sqrt(y))",
)


def taylor_specs(n: int, seed: int = 0, scale: float = 0.3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"kind": "taylor", "theta": (scale * torch.randn(8, generator=g)).tolist()}
            for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(a, b, reps: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Run ``a`` and ``b`` alternately (order flipped every repetition); times in seconds."""
    ta, tb = [], []
    for r in range(reps):
        if r % 2 == 0:
            ta.append(timed(a, device))
            tb.append(timed(b, device))
        else:
            tb.append(timed(b, device))
            ta.append(timed(a, device))
    return ta, tb


def minimal_loop(model_cfg: dict, split: Split, spec: dict, recipe: dict, seed: int, steps: int,
                 device: torch.device) -> float:
    """The textbook loop: same init, loss and batches as trainer.train, nothing else."""
    model = trainer.init_model(model_cfg, split, seed, device)
    loss_fn = losses.build(spec).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"])
    x, y = split.x_train, split.y_train
    model.train()
    for idx in trainer.batch_indices(len(y), recipe["batch_size"], steps, seed):
        idx = idx.to(device)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return trainer.accuracy(model, split.x_val, split.y_val)


def bench_population(name, model_cfg, split, recipe, sizes, steps, reps, device, rows) -> None:
    for p in sizes:
        specs, seeds = taylor_specs(p), [0] * p

        def batched(specs=specs, seeds=seeds, p=p):
            population.train_many(model_cfg, split, specs, recipe, seeds, steps=steps,
                                  device=device, evaluate_test=False, max_population=p,
                                  batched=True)

        def sequential(specs=specs, seeds=seeds):
            population.train_many(model_cfg, split, specs, recipe, seeds, steps=steps,
                                  device=device, evaluate_test=False, batched=False)

        tb, ts = interleaved(batched, sequential, reps, device)
        rb = p * steps / statistics.median(tb)
        rs = p * steps / statistics.median(ts)
        rows.append((name, f"P={p}", "batched", rb, "one after another", rs, rb / rs))
        print(f"  {name} P={p}: batched {rb:9.0f}  sequential {rs:8.0f} cand-steps/s  "
              f"x{rb / rs:.2f}", flush=True)


def bench_trees(name, model_cfg, split, recipe, steps, reps, device, rows) -> None:
    """One generation of 16 different trees: batched (one population) vs one after another."""
    specs, seeds = [{"kind": "tree", "expr": e} for e in TREES], [0] * len(TREES)
    p = len(specs)

    def batched():
        population.train_many(model_cfg, split, specs, recipe, seeds, steps=steps, device=device,
                              evaluate_test=False, max_population=p, batched=True)

    def sequential():
        population.train_many(model_cfg, split, specs, recipe, seeds, steps=steps, device=device,
                              evaluate_test=False, batched=False)

    tb, ts = interleaved(batched, sequential, reps, device)
    rb, rs = p * steps / statistics.median(tb), p * steps / statistics.median(ts)
    rows.append((name, f"{p} trees", "batched", rb, "one after another", rs, rb / rs))
    spread = [p * steps / t for t in tb], [p * steps / t for t in ts]
    print(f"  {name} {p} different trees: batched {rb:9.0f}  sequential {rs:8.0f} cand-steps/s  "
          f"x{rb / rs:.2f}  (ranges {min(spread[0]):.0f}-{max(spread[0]):.0f} and "
          f"{min(spread[1]):.0f}-{max(spread[1]):.0f})", flush=True)


def bench_trainer(name, model_cfg, split, recipe, steps, reps, device, rows) -> None:
    spec = taylor_specs(1, seed=1)[0]

    def single():
        trainer.train(model_cfg, split, losses.build(spec), recipe, 0, steps=steps,
                      device=device, evaluate_test=False)

    def minimal():
        minimal_loop(model_cfg, split, spec, recipe, 0, steps, device)

    tt, tm = interleaved(single, minimal, reps, device)
    rt, rm = steps / statistics.median(tt), steps / statistics.median(tm)
    rows.append((name, "P=1", "trainer.train", rt, "minimal loop", rm, rt / rm))
    print(f"  {name}: trainer.train {rt:7.0f}  minimal loop {rm:7.0f} steps/s  x{rt / rm:.3f}",
          flush=True)


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)


_SPLIT: list[Split] = []


def _shard(args: tuple) -> None:
    p, steps, seed, batched = args
    if not _SPLIT:
        _SPLIT.append(data.load(DIGITS))
    split = _SPLIT[0]
    population.train_many(MLP, split, taylor_specs(p, seed), RECIPE, [seed] * p, steps=steps,
                          evaluate_test=False, batched=batched)


def bench_threads(p: int, steps: int, reps: int, rows) -> None:
    """Two shards: 2 spawn workers × 1 thread vs 1 process × 2 threads (vs 1 × 1 for scale)."""
    before = torch.get_num_threads()
    ctx = mp.get_context("spawn")
    with ctx.Pool(2, initializer=_set_threads, initargs=(1,)) as pool:
        for batched in (True, False):
            n = p if batched else max(2, p // 4)  # sequential: fewer candidates, same rate
            jobs = [(n, steps, 11, batched), (n, steps, 12, batched)]
            pool.map(_shard, jobs)  # warm the workers (imports, first-call costs)

            def two_procs(jobs=jobs):
                pool.map(_shard, jobs, chunksize=1)

            def one_proc(threads: int, jobs=jobs):
                torch.set_num_threads(threads)
                for job in jobs:
                    _shard(job)
                torch.set_num_threads(before)

            times = {"2 procs x 1 thread": [], "1 proc x 2 threads": [], "1 proc x 1 thread": []}
            for r in range(reps):
                order = list(times) if r % 2 == 0 else list(reversed(times))
                for key in order:
                    fn = {"2 procs x 1 thread": two_procs,
                          "1 proc x 2 threads": lambda: one_proc(2),
                          "1 proc x 1 thread": lambda: one_proc(1)}[key]
                    times[key].append(timed(fn, torch.device("cpu")))
            rate = {k: 2 * n * steps / statistics.median(v) for k, v in times.items()}
            mode = f"{'batched' if batched else 'sequential'} P={n}"
            base = rate["1 proc x 2 threads"]
            for k, v in rate.items():
                print(f"  threads, {mode}: {k:19s} {v:8.0f} cand-steps/s  x{v / base:.2f}",
                      flush=True)
            rows.append(("threads", mode, "2 procs x 1 thr", rate["2 procs x 1 thread"],
                         "1 proc x 2 thr", base, rate["2 procs x 1 thread"] / base))
    torch.set_num_threads(before)


def random_mnist(n_train: int, n_eval: int, device: torch.device) -> Split:
    g = torch.Generator().manual_seed(0)

    def part(n):
        return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)

    (xt, yt), (xv, yv), (xs, ys) = part(n_train), part(n_eval), part(n_eval)
    return Split(xt, yt, xv, yv, xs, ys, 10).to(device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    ap.add_argument("--threads", action="store_true", help="run the thread comparison")
    ap.add_argument("--no-threads", action="store_true", help="skip the thread comparison")
    ap.add_argument("--trees", action="store_true", help="only the GLO-tree generation row")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    args = ap.parse_args(argv)
    device = trainer.resolve_device(args.device)
    # Many short interleaved repetitions: medians shrug off a busy neighbour's bursts.
    steps, reps = (40, 3) if args.quick else (100, 7)
    trainer_steps, trainer_reps = (200, 5) if args.quick else (1000, 9)
    sizes = (8, 16, 32)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; {steps} steps, {reps} repetitions (medians)", flush=True)
    rows: list[tuple] = []
    split = data.load(DIGITS).to(device)

    def warm(model_cfg, split, recipe):
        population.train_many(model_cfg, split, taylor_specs(4), recipe, [0] * 4, steps=5,
                              device=device, evaluate_test=False)
        trainer.train(model_cfg, split, losses.build(taylor_specs(1)[0]), recipe, 0, steps=5,
                      device=device, evaluate_test=False)

    warm(MLP, split, RECIPE)
    population.train_many(MLP, split, [{"kind": "tree", "expr": e} for e in TREES], RECIPE,
                          [0] * len(TREES), steps=5, device=device, evaluate_test=False)
    if not args.trees:
        print("population (digits MLP):", flush=True)
        bench_population("digits MLP", MLP, split, RECIPE, sizes, steps, reps, device, rows)
    print("population of GLO trees (digits MLP):", flush=True)
    bench_trees("digits MLP", MLP, split, RECIPE, steps, reps, device, rows)
    if not args.trees:
        print("single trainer (digits MLP):", flush=True)
        bench_trainer("digits MLP", MLP, split, RECIPE, trainer_steps, trainer_reps, device, rows)
    if device.type == "cuda" and not args.trees:
        cnn, cnn_split = {"name": "mnist_basic_cnn"}, random_mnist(2000, 1000, device)
        cnn_recipe = {"lr": 0.01, "batch_size": 100, "steps": 1000, "momentum": 0.9}
        warm(cnn, cnn_split, cnn_recipe)
        print("population (MNIST basic CNN, random data):", flush=True)
        bench_population("MNIST CNN", cnn, cnn_split, cnn_recipe, sizes, steps // 2, reps,
                         device, rows)
        bench_trainer("MNIST CNN", cnn, cnn_split, cnn_recipe, steps, reps, device, rows)
    if (args.threads or not args.quick) and not args.no_threads and not args.trees:
        print("local parallelism (digits MLP, two shards):", flush=True)
        bench_threads(16, 2 * steps, 5, rows)

    print()
    head = ("workload", "case", "A", "A rate", "B", "B rate", "A/B")
    print(f"{head[0]:12s} {head[1]:14s} {head[2]:16s} {head[3]:>9s}   {head[4]:18s} "
          f"{head[5]:>9s} {head[6]:>7s}")
    for w, case, a, ra, b, rb, ratio in rows:
        print(f"{w:12s} {case:14s} {a:16s} {ra:9.0f}   {b:18s} {rb:9.0f} {ratio:7.2f}")
    print("(rates: candidate-steps/s; trainer rows: steps/s)")


if __name__ == "__main__":
    sys.exit(main())
