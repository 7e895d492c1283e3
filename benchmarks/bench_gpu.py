"""GPU training throughput: population-batched vs one after another, and the FLOP/s achieved.

    .venv/bin/python benchmarks/bench_gpu.py                 # on a CUDA device (see README)
    .venv/bin/python benchmarks/bench_gpu.py --quick         # fewer steps, one repetition
    .venv/bin/python benchmarks/bench_gpu.py --device cpu    # a small version, seconds on a CPU

For each model and population size P: ``train_many(..., batched=True)`` (one population pass)
vs ``train_many(..., batched=False)`` (``trainer.train`` per candidate) on P Taylor losses
(order 3 over x, y; random θ ~ N(0, 0.3), validated by ``losses.build``), one seed, synthetic
random data in a ``lossevo.data.Split`` (no dataset files). Each run trains ``--steps`` steps per
candidate; the clock covers the training steps only, from the start of a candidate's (or
population's) first step to the start of its last, between ``torch.cuda.synchronize()`` calls,
so model building and the final validation pass are outside it (``--steps`` − 1 steps timed).
Warm-up runs of every shape come first and are not timed; the two sides then alternate,
``--reps`` times, and the table shows medians.

Achieved FLOP/s: a candidate-step is estimated at 3 × 2 × its forward MACs
(``batch_plan.candidate_cost``; backward ≈ twice the forward), times the measured rate, shown
as a fraction of a large fp32 ``torch.mm``'s FLOP/s measured in the same run on the same device
with the same TF32 setting (the determinism mode's, applied before torch loads).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from contextlib import contextmanager

from lossevo import determinism  # torch-free: the mode is applied before torch loads

#: The workloads: model config, input shape, classes and a recipe of the papers' kind.
WORKLOADS: dict[str, dict] = {
    "mnist_basic_cnn": {"model": {"name": "mnist_basic_cnn"}, "shape": (1, 28, 28), "classes": 10,
                        "recipe": {"lr": 0.01, "momentum": 0.9, "batch_size": 100, "steps": 1000}},
    "resnet20": {"model": {"name": "resnet20"}, "shape": (3, 32, 32), "classes": 10,
                 "recipe": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128,
                            "steps": 1000}},
    "mlp": {"model": {"name": "mlp", "hidden": [32]}, "shape": (1, 8, 8), "classes": 10,
            "recipe": {"lr": 0.1, "batch_size": 16, "steps": 1000}},
}
#: Defaults per device kind: models, population sizes, steps, repetitions, matmul size and tries.
DEFAULTS = {
    "cuda": {"models": "mnist_basic_cnn,resnet20", "populations": "8,16,32", "steps": 30, "reps": 3,
             "mm": 8192, "mm_reps": 5},
    "cpu": {"models": "mlp", "populations": "2,4", "steps": 4, "reps": 1, "mm": 512, "mm_reps": 3},
}
NO_CUDA = "no CUDA device: the GPU table did not run"
#: The candidates' losses: Taylor polynomials of this order over x, y with θ ~ N(0, THETA_SCALE).
TAYLOR_ORDER, THETA_SCALE = 3, 0.3
COLUMNS = ("model", "P", "batched", "sequential", "speedup", "batched_GFLOP/s", "batched_of_mm",
           "seq_GFLOP/s", "seq_of_mm", "batched_as")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (a small version)")
    ap.add_argument("--quick", action="store_true", help="a third of the steps (at least 2), one repetition")
    ap.add_argument("--models", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    ap.add_argument("--populations", help="comma-separated population sizes P")
    ap.add_argument("--steps", type=int, help="training steps per candidate per run (at least 2)")
    ap.add_argument("--reps", type=int, help="timed repetitions per side (medians)")
    ap.add_argument("--mm-size", type=int, help="n of the n×n @ n×n fp32 matmul reference")
    ap.add_argument("--determinism", choices=determinism.MODES, default=determinism.DEFAULT_MODE,
                    help="the determinism mode to run under (default: the pipeline's default)")
    args = ap.parse_args(argv)
    kind = "cpu" if args.device.startswith("cpu") else "cuda"
    d = DEFAULTS[kind]
    args.models = [m for m in (args.models or d["models"]).split(",") if m]
    args.populations = [int(p) for p in (args.populations or d["populations"]).split(",") if p]
    steps = args.steps or (max(2, d["steps"] // 3) if args.quick else d["steps"])
    args.steps, args.reps = steps, args.reps or (1 if args.quick else d["reps"])
    args.mm_size, args.mm_reps = args.mm_size or d["mm"], d["mm_reps"]
    unknown = [m for m in args.models if m not in WORKLOADS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}: choose from {', '.join(WORKLOADS)}")
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the clock runs from the first step to the last)")
    if not args.populations or min(args.populations) < 2:
        ap.error("--populations must be sizes of at least 2")
    return args


def _num(value: float) -> str:
    """Four significant digits, without an exponent from 1000 up."""
    return f"{value:.0f}" if value >= 1000 else f"{value:.4g}"


class StepClock:
    """Times the training steps of ``train_many`` and nothing else.

    Wraps ``trainer.batch_indices`` (the batch stream every candidate, or population sharing a
    seed, draws one batch from per step): each stream's window runs from its first batch to its
    last, synchronized, i.e. over steps 0 … S−2 including every per-step cost.
    """

    def __init__(self, sync) -> None:
        self.sync = sync
        self.seconds = 0.0
        self.windows = 0

    @contextmanager
    def running(self):
        from lossevo.training import trainer

        original = trainer.batch_indices
        self.seconds, self.windows = 0.0, 0

        def timed(n, batch_size, steps, seed):
            start = 0.0
            for k, idx in enumerate(original(n, batch_size, steps, seed)):
                if k == 0:
                    self.sync()
                    start = time.perf_counter()
                if k == steps - 1:
                    self.sync()
                    self.seconds += time.perf_counter() - start
                    self.windows += 1
                yield idx

        trainer.batch_indices = timed
        try:
            yield self
        finally:
            trainer.batch_indices = original


class CandidatesStopped(RuntimeError):
    """A candidate stopped early (non-finite loss): a rate would count steps that did not run."""


def train_timed(clock: StepClock, job: tuple, specs: list[dict], batched: bool, steps: int) -> tuple[float, int]:
    """``train_many`` of ``specs`` (one seed) for ``steps`` steps; (seconds of its steps, windows)."""
    from lossevo.training import population

    name, cfg, split, recipe, device = job
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning: noted in the table
        with clock.running():
            results = population.train_many(cfg, split, specs, recipe, [0] * len(specs), steps=steps,
                                            device=device, evaluate_test=False, max_population=len(specs),
                                            batched=batched)
    stopped = [r for r in results if r["status"] != "ok"]
    if stopped:
        raise CandidatesStopped(f"{len(stopped)} of {len(specs)} candidates stopped ({stopped[0]['reason']})")
    if clock.windows == 0:
        raise RuntimeError("the step clock saw no batch stream: train_many no longer draws its batches "
                           "through trainer.batch_indices, so this script cannot time its steps")
    return clock.seconds, clock.windows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    determinism.apply(args.determinism)  # before torch and numpy load
    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    from lossevo import environment, losses, models
    from lossevo.data import Split
    from lossevo.losses import taylor
    from lossevo.training import batch_plan

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    determinism.configure_torch(device)
    flags = determinism.torch_flags()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def synthetic(w: dict) -> Split:
        """Random inputs in [0, 1) and labels: enough rows for a few epochs of batches."""
        g = torch.Generator().manual_seed(0)
        n_train, n_eval = 8 * w["recipe"]["batch_size"], 2 * w["recipe"]["batch_size"]

        def part(n: int):
            return torch.rand(n, *w["shape"], generator=g), torch.randint(0, w["classes"], (n,), generator=g)

        return Split(*part(n_train), *part(n_eval), *part(n_eval), w["classes"]).to(device)

    def taylor_specs(p: int) -> list[dict]:
        """P Taylor losses with random θ (the search's default order and variables)."""
        g = torch.Generator().manual_seed(p)
        n = taylor.n_params(TAYLOR_ORDER, taylor.DEFAULT_VARIABLES)
        specs = [{"kind": "taylor", "order": TAYLOR_ORDER,
                  "theta": (THETA_SCALE * torch.randn(n, generator=g)).tolist()} for _ in range(p)]
        for s in specs:
            losses.build(s)  # a valid spec, or this raises
        return specs

    def matmul_flops(n: int, tries: int) -> float:
        """FLOP/s of an n×n @ n×n fp32 torch.mm, best of ``tries`` after one untimed call."""
        g = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.rand(n, n, generator=g, device=device) for _ in range(2))
        out = torch.empty(n, n, device=device)
        torch.mm(a, b, out=out)
        best = min(timed(lambda: torch.mm(a, b, out=out)) for _ in range(tries))
        return 2 * n**3 / best

    # What ran: the device, its libraries and the settings the numbers depend on.
    if device.type == "cuda":
        gpu = environment.cuda_device(device)
        name = torch.cuda.get_device_name(device)
        print(f"device {device}: {name}, {gpu['memory_bytes'] / 2**30:.1f} GiB, compute capability "
              f"{gpu['compute_capability']}, {gpu['multiprocessors']} SMs, {gpu['count']} device(s) visible; "
              f"driver {gpu['driver'] or 'unknown'} (CUDA {gpu['driver_cuda'] or 'unknown'})")
    else:
        print(f"device cpu: {environment.cpu_model()}, {torch.get_num_threads()} torch threads")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, cuDNN {cudnn or 'none'}")
    mode = determinism.describe(device)
    if device.type == "cuda":
        cuda_part = (f"; CUDA: cuDNN deterministic {flags['cudnn_deterministic']}, cudnn.benchmark "
                     f"{flags['cudnn_benchmark']}, deterministic algorithms {flags['deterministic_algorithms']}, "
                     f"TF32 matmul {flags['matmul_allow_tf32']} / cuDNN {flags['cudnn_allow_tf32']}, "
                     f"CUBLAS_WORKSPACE_CONFIG {mode['cuda']['cublas_workspace_config']}")
    else:
        cuda_part = f"; ATen {determinism.aten_capability()} kernels, MKL branch {mode['mkl_cbwr']}"
    print(f"determinism {mode['mode']}" + (f" (fell back: {mode['fallback']})" if mode["fallback"] else "")
          + cuda_part)
    print(f"workload: Taylor losses (order {TAYLOR_ORDER} over x, y; θ ~ N(0, {THETA_SCALE})), one seed, "
          f"synthetic data; "
          f"{args.steps} steps per candidate, {args.steps - 1} timed; {args.reps} repetition(s) per side, "
          f"interleaved (medians); warm-up excluded", flush=True)
    mm = matmul_flops(args.mm_size, args.mm_reps)
    print(f"matmul reference: {args.mm_size}×{args.mm_size} @ {args.mm_size}×{args.mm_size} fp32 torch.mm, "
          f"best of {args.mm_reps}: {mm / 1e9:.1f} GFLOP/s", flush=True)

    clock = StepClock(sync)
    rows: list[tuple] = []
    notes: list[str] = []
    for name in args.models:
        w = WORKLOADS[name]
        if w["model"]["name"] not in models.MODELS:
            rows.append((name, "-", "not registered in lossevo.models: row skipped"))
            continue
        cfg, recipe = w["model"], w["recipe"]
        split = synthetic(w)
        macs = batch_plan.candidate_cost(cfg, split, recipe["batch_size"])[1]
        flops = 3 * 2 * macs
        reason = batch_plan.model_unbatchable(cfg, split, device)
        if reason:
            notes.append(f"{name}: batched=True trains one after another: {reason}")

        job = (name, cfg, split, recipe, device)
        for p in args.populations:
            specs = taylor_specs(p)
            times: dict[bool, list[float]] = {True: [], False: []}
            windows = 0
            try:
                train_timed(clock, job, specs[:2], False, 2)  # warm-up: the sequential shapes are P's
                train_timed(clock, job, specs, True, 2)  # warm-up: this P's batched shapes
                for r in range(args.reps):
                    for batched in ((True, False) if r % 2 == 0 else (False, True)):
                        seconds, n = train_timed(clock, job, specs, batched, args.steps)
                        times[batched].append(seconds)
                        windows = n if batched else windows
            except CandidatesStopped as exc:
                rows.append((name, "-", f"P={p} row skipped: {exc}"))
                continue
            cand_steps = p * (args.steps - 1)
            rb, rs = cand_steps / statistics.median(times[True]), cand_steps / statistics.median(times[False])
            batched_as = "population" if windows == 1 else "sequential"
            rows.append((name, p, rb, rs, rb / rs, rb * flops / 1e9, rb * flops / mm, rs * flops / 1e9,
                         rs * flops / mm, batched_as))
            print(f"  {name} P={p}: batched {rb:.1f}, one after another {rs:.1f} candidate-steps/s, "
                  f"×{rb / rs:.2f}", flush=True)

    print()
    print(f"{COLUMNS[0]:16s} {COLUMNS[1]:>3s} {COLUMNS[2]:>10s} {COLUMNS[3]:>10s} {COLUMNS[4]:>7s} "
          f"{COLUMNS[5]:>15s} {COLUMNS[6]:>13s} {COLUMNS[7]:>11s} {COLUMNS[8]:>9s} {COLUMNS[9]:>10s}")
    for row in rows:
        if len(row) == 3:
            print(f"{row[0]:16s} {row[1]:>3s} {row[2]}")
            continue
        name, p, rb, rs, speedup, gb, fb, gs, fs, batched_as = row
        print(f"{name:16s} {p:3d} {rb:10.1f} {rs:10.1f} {speedup:7.2f} {_num(gb):>15s} {fb:13.4g} "
              f"{_num(gs):>11s} {fs:9.4g} {batched_as:>10s}")
    print("(batched, sequential: candidate-steps/s; speedup: batched / sequential; GFLOP/s: 3 × 2 × forward "
          "MACs per candidate-step × rate; of_mm: that over the matmul reference's FLOP/s)")
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
