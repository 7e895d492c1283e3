"""Portable determinism: the same seed gives byte-identical results on any x86-64 CPU with AVX2.

Reruns on one machine are already identical; between machines, CPU results differ because the
numerical libraries pick their kernels from the CPU they run on, and kernels of different
vector widths sum in different orders. ``determinism: portable`` (params.yaml, the default)
pins every such choice found to change bits, through environment variables that the libraries
read once, when they load or at their first call. So :func:`apply` must run before torch and
numpy are imported (the CLI does it first thing, tests/conftest.py at its top; spawned workers
and the Snakemake/DVC shell jobs inherit the environment or run the CLI themselves). After that
it is too late: :func:`apply` then checks what is in effect and raises :class:`DeterminismError`
rather than let a run silently compute other numbers.

What changes bits, measured on an AMD EPYC with AVX-512 (torch 2.13 with MKL 2024.2 and oneDNN
3.12, numpy 2.4 with OpenBLAS 0.3.31), and what pins it:

- ATen's vectorized kernels (element-wise ops, reductions, softmax, random fills):
  ``ATEN_CPU_CAPABILITY`` default, avx2 and avx512 each give other bits for the same training.
  Pinned to ``avx2``. Latched at torch's first dispatched kernel.
- MKL, torch's BLAS (``nn.Linear``'s and the population path's matrix products): with
  ``MKL_CBWR`` unset (no CNR), ``AUTO`` and ``COMPATIBLE`` the population path computes three
  different results, ``nn.Linear`` two (``COMPATIBLE`` differs). On a non-Intel CPU MKL accepts only
  ``AUTO`` and ``COMPATIBLE``: ``MKL_CBWR=AVX2`` (or ``AVX512``, ``AVX2,STRICT``, any unknown
  value) silently runs the ISA-dispatched ``AUTO`` branch (read back with MKL's
  ``cbwr_get``), so it pins nothing across CPUs. Pinned to ``COMPATIBLE`` (SSE2 code, no
  approximate reciprocals), the one branch MKL documents as identical on Intel and non-Intel
  processors. Latched at MKL's first call.
- oneDNN (convolutions): ``ONEDNN_MAX_CPU_ISA`` AVX2 vs AVX-512 changes forward and backward
  bits. Capped at ``AVX2``. Not pinned: oneDNN sizes its blocking by the CPU's cache sizes and
  the thread count, and has no reproducibility mode across machines; conv models on the CPU may
  still move between machines (the MLPs of the demo do not use oneDNN).
- OpenBLAS, numpy's and scipy's BLAS (pycma's linear algebra, so the CMA-ES trajectory of
  TaylorGLO and of GLO's coefficient phase even for identical fitnesses): the SkylakeX kernels
  of an AVX-512 CPU and the Haswell kernels of an AVX2 CPU give other searches. Pinned with
  ``OPENBLAS_CORETYPE=Haswell`` and one OpenBLAS thread.
- numpy's own SIMD dispatch (float64 exp/log and friends): with its AVX-512 targets (X86_V4)
  the CMA-ES state differs from the AVX2 (X86_V3) one. The AVX-512 targets are disabled with
  ``NPY_DISABLE_CPU_FEATURES`` (names of numpy 1.x and 2.x; unknown names are ignored).
- Thread counts: ATen reductions, MKL and oneDNN split work by thread, so 1 and 2 torch threads
  give other bits. Pinned by params.yaml's ``threads`` (torch's, hence MKL's and OpenMP's).

Not pinned, and recorded by :mod:`lossevo.environment` instead: the library versions
themselves (another torch, MKL, numpy or glibc computes other bits), CPUs without AVX2 or of
another architecture (portable mode falls back to native there, with a warning), oneDNN's
cache-dependent blocking, and GPUs (CUDA results differ from CPU results and between GPU
models). ``determinism: native`` skips all of this for speed (benchmarks/bench_determinism.py
measures the cost) and leaves the environment as it is.

On a CUDA device the promise is narrower: run-to-run identical results on the same GPU model,
driver, CUDA, cuDNN and torch versions, not across GPU models (cuBLAS and cuDNN pick other
kernels, tile sizes and reduction orders per architecture and version, and no switch pins them).
Where determinism is asked for (``portable``, also when its CPU part fell back to native),
:func:`apply` puts ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` into the environment before CUDA starts
(cuBLAS's fixed workspace split; PyTorch refuses deterministic matrix products without it), and
:func:`configure_torch`, called with the device a training runs on, sets torch's flags
(:data:`TORCH_CUDA_FLAGS`): cuDNN's deterministic algorithms without autotuning
(``cudnn.benchmark`` times candidate kernels and may pick another one on every run),
``torch.use_deterministic_algorithms(True)`` (an op without a deterministic CUDA kernel raises
instead of computing other bits; none of the training paths' ops is such an op:
tests/test_determinism.py records every op they dispatch and checks them against torch's list,
so ``warn_only`` stays False), and TF32 off (TF32 rounds fp32 matrix-product and convolution
inputs to 10 mantissa bits, so GPU results would also move away from fp32 CPU results).
``native`` on CUDA sets the fast settings instead: cuDNN autotuning on, TF32 allowed, no
deterministic-algorithm check. On the CPU none of these flags is touched
(``use_deterministic_algorithms`` also switches some CPU kernels, which would move the portable
CPU bits).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

from lossevo.errors import LossevoError

MODES = ("portable", "native")
DEFAULT_MODE = "portable"
#: The settings of ``determinism: portable``, set (overriding any value) before torch loads.
PORTABLE_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
    "OPENBLAS_NUM_THREADS": "1",
    "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX "
                                "AVX512_CNL AVX512_ICL AVX512_SPR X86_V4",
}
#: Environment variables through which the mode in effect reaches worker processes and the
#: environment record: the mode, and why portable mode fell back to native (if it did).
ENV_MODE = "LOSSEVO_DETERMINISM"
ENV_FALLBACK = "LOSSEVO_DETERMINISM_FALLBACK"
#: What determinism sets for CUDA, before CUDA starts, besides :data:`PORTABLE_ENV` (which the
#: environment record lists; this one is recorded with a CUDA device's settings).
CUDA_ENV: dict[str, str] = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
#: The cuBLAS workspace settings NVIDIA documents as deterministic (``:16:8`` uses less memory;
#: a user's choice of it is kept).
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")
#: torch's CUDA flags per mode, as :func:`torch_flags` reads them back; :func:`configure_torch`
#: applies them on a CUDA device. ``deterministic_warn_only`` False: an op without a deterministic
#: CUDA kernel raises (tests/test_determinism.py checks that the training paths use none).
TORCH_CUDA_FLAGS: dict[str, dict[str, bool | str]] = {
    "portable": {"cudnn_deterministic": True, "cudnn_benchmark": False, "deterministic_algorithms": True,
                 "deterministic_warn_only": False, "matmul_allow_tf32": False, "cudnn_allow_tf32": False,
                 "float32_matmul_precision": "highest"},
    "native": {"cudnn_deterministic": False, "cudnn_benchmark": True, "deterministic_algorithms": False,
               "deterministic_warn_only": False, "matmul_allow_tf32": True, "cudnn_allow_tf32": True,
               "float32_matmul_precision": "high"},
}
#: CPU flags the pinned kernels need (ATen's AVX2 build, OpenBLAS Haswell, numpy X86_V3), as
#: /proc/cpuinfo spells them (``abm`` is LZCNT).
REQUIRED_FLAGS = ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm")
#: MKL's CNR branch codes (mkl_cbwr_get), for the environment record.
MKL_BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1",
                8: "SSE4_2", 9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1",
                14: "AVX512_E1"}
MKL_STRICT = 0x10000
#: How far results moved between kernel sets in native mode, measured once on the demo (torch
#: 2.13, MKL 2024.2, numpy 2.4, AMD EPYC; test set of 500 examples, 10 seeds × 3000 steps).
#: Retraining a fixed loss: ATEN_CPU_CAPABILITY default/avx2/avx512 × MKL_CBWR unset/COMPATIBLE,
#: the six runs of cross_entropy and of baikal against each other (cross_entropy moved by
#: 0.0002, baikal by 0.0004; a single seed by one test example). A search: the demo's TaylorGLO
#: search natively on this CPU vs. as an AVX2 CPU runs it (ATen avx2, OpenBLAS Haswell, numpy
#: X86_V3): the first generations agree, then the paths part and another θ is picked. The
#: report quotes these numbers for machines that cannot run the portable settings.
NATIVE_SPREAD = {
    "fixed_loss_mean_test_acc": 0.0004,
    "fixed_loss_seed_test_acc": 0.002,
    "search": "taylorglo",
    "search_retrained_mean_test_acc": (0.9116, 0.9102),
}


class DeterminismError(LossevoError):
    """The requested settings cannot take effect (torch or numpy loaded with other ones)."""


class DeterminismWarning(RuntimeWarning):
    """Portable settings unavailable on this machine: running with its native kernels."""


def read_mode(params: str | os.PathLike) -> str:
    """The ``determinism`` key of a parameter file, read without importing torch.

    Read as lossevo.config reads the file (ruamel.yaml, ``typ="safe"``), but leniently: a
    missing, unreadable or invalid file or value gives :data:`DEFAULT_MODE`, because the stage's
    real validation comes later and reports the error properly.
    """
    try:
        from ruamel.yaml import YAML

        text = Path(params).read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = YAML(typ="safe").load(text)
    except Exception:  # any failure: the stage's validation reports it later
        return DEFAULT_MODE
    mode = raw.get("determinism") if isinstance(raw, dict) else None
    return mode if mode in MODES else DEFAULT_MODE


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags, lower case (Linux /proc/cpuinfo, macOS sysctl); None if unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features",
                                  "machdep.cpu.extfeatures"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        flags = {f.lower().replace(".", "_") for f in out.stdout.split()}
        return flags | ({"abm"} if "lzcnt" in flags else set())  # Linux calls LZCNT abm
    return None


def portable_unavailable() -> str | None:
    """Why this machine cannot run the portable settings, or None if it can."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return f"the portable settings are for x86-64 CPUs; this one is {machine or 'unknown'}"
    flags = cpu_flags()
    if flags is None:
        return "cannot read the CPU's feature flags to check for AVX2"
    missing = [f for f in REQUIRED_FLAGS if f not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)} (the portable kernels need AVX2)"
    return None


def apply(mode: str = DEFAULT_MODE) -> dict[str, str]:
    """Put ``mode``'s settings into ``os.environ``; return the CPU ones set (empty for native).

    Portable mode also sets :data:`CUDA_ENV` (not returned; see :func:`set_cublas_workspace`).
    Portable mode overrides any value already there (a user's ``MKL_CBWR`` must not change the
    numbers) and falls back to native, with a :class:`DeterminismWarning`, on a machine that
    cannot run it. If torch or numpy is already imported, the libraries may have latched other
    settings: what is in effect is checked and a mismatch is a :class:`DeterminismError`.
    """
    if mode not in MODES:
        raise LossevoError(f"determinism: {mode!r} is not one of {list(MODES)}")
    os.environ.pop(ENV_FALLBACK, None)
    applied: dict[str, str] = {}
    if mode == "portable":
        # For a CUDA device, even where the CPU part falls back: run-to-run determinism on the
        # GPU does not depend on the CPU's kernels.
        set_cublas_workspace()
        reason = portable_unavailable()
        if reason is None:
            applied = dict(PORTABLE_ENV)
            os.environ.update(applied)
        else:
            warnings.warn(f"determinism: portable: {reason}; running with this machine's native kernels, "
                          f"so results may differ from other machines'", DeterminismWarning, stacklevel=2)
            os.environ[ENV_FALLBACK] = reason
            mode = "native"
    os.environ[ENV_MODE] = mode
    verify()
    return applied


def verify() -> None:
    """Raise :class:`DeterminismError` if portable mode is on but torch or numpy runs other kernels.

    Checks only libraries already imported (importing them here would latch the settings);
    a spawned worker calls it after importing torch, through :mod:`lossevo.parallel`.
    """
    if os.environ.get(ENV_MODE) != "portable":
        return
    wrong = []
    if "torch" in sys.modules:
        cap = aten_capability()
        if cap != PORTABLE_ENV["ATEN_CPU_CAPABILITY"].upper():
            wrong.append(f"ATen runs {cap} kernels, not AVX2")
        branch = mkl_cbwr()
        if branch is not None and branch.split(",")[0] != PORTABLE_ENV["MKL_CBWR"]:
            wrong.append(f"MKL runs its {branch} branch, not COMPATIBLE")
    if "numpy" in sys.modules:
        wide = numpy_simd_wider_than_avx2()
        if wide:
            wrong.append(f"numpy dispatches to {', '.join(wide)}")
    if wrong:
        raise DeterminismError(
            "determinism: portable: " + "; ".join(wrong) + ": torch/numpy was imported before "
            "lossevo.determinism.apply() set the portable settings (start a fresh process and call "
            "apply() before importing them, or set determinism: native)")


def aten_capability() -> str:
    """The ATen CPU kernel set in use (AVX512, AVX2, DEFAULT, ...). Imports torch and latches it."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def mkl_cbwr() -> str | None:
    """MKL's conditional-numerical-reproducibility branch in effect (``AUTO``, ``COMPATIBLE``,
    ``OFF``, with ``,STRICT``), read from the MKL linked into torch; None where it cannot be read."""
    import ctypes

    import torch

    libdir = Path(torch.__file__).parent / "lib"
    candidates: list[str | None] = [str(p) for p in sorted(libdir.glob("libtorch_cpu.*"))] + [None]
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("mkl_cbwr_get", "MKL_CBWR_Get", "mkl_serv_cbwr_get"):
            func = getattr(lib, name, None)
            if func is None:
                continue
            func.argtypes, func.restype = [ctypes.c_int], ctypes.c_int
            value = int(func(-1))  # MKL_CBWR_ALL: branch and flags
            text = MKL_BRANCHES.get(value & 0xFFFF, str(value & 0xFFFF))
            return text + (",STRICT" if value & MKL_STRICT else "")
    return None


def numpy_simd_wider_than_avx2() -> list[str]:
    """The AVX-512 (or wider) targets numpy dispatches to; empty when capped at AVX2.

    Dispatch targets only (``__cpu_dispatch__``) that the CPU has and the environment did not
    disable (``__cpu_features__`` then reads False); the hardware flags numpy merely reports
    (``AVX512_CLX`` without a dispatch target in numpy 2.4) do not count.
    """
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__ as targets
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1.x
        try:
            from numpy.core._multiarray_umath import __cpu_dispatch__ as targets
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return []
    disabled = set(PORTABLE_ENV["NPY_DISABLE_CPU_FEATURES"].split())
    return sorted(t for t in targets if t in disabled and features.get(t))


def describe(device=None) -> dict:
    """The determinism settings of this process, for the environment record (imports torch).

    ``mode`` is the mode in effect (``unset`` if :func:`apply` never ran in this process tree),
    ``fallback`` why portable mode fell back to native, ``settings`` the values of every
    variable portable mode sets (None: not set), ``mkl_cbwr`` the MKL branch in effect (the
    ATen kernels in use are in the record's ``cpu`` entry). For a CUDA ``device`` (a torch
    device or name) also ``cuda``: :func:`describe_cuda`; for the CPU the entry is as before.
    """
    out = {
        "mode": os.environ.get(ENV_MODE, "unset"),
        "fallback": os.environ.get(ENV_FALLBACK),
        "settings": {k: os.environ.get(k) for k in PORTABLE_ENV},
        "mkl_cbwr": mkl_cbwr(),
    }
    if device is not None and _is_cuda(device):
        out["cuda"] = describe_cuda()
    return out


def _is_cuda(device) -> bool:
    import torch

    return torch.device(device).type == "cuda"


def requested_mode() -> str:
    """The mode asked for in this process tree: ``portable`` also where its CPU part fell back
    to native (the GPU settings do not depend on the CPU), else ``native`` or ``unset``."""
    if os.environ.get(ENV_FALLBACK):
        return "portable"
    return os.environ.get(ENV_MODE, "unset")


def set_cublas_workspace() -> str:
    """Put :data:`CUDA_ENV` into ``os.environ`` unless a deterministic value is there already
    (``:16:8`` is kept); return the value in effect. cuBLAS reads it when CUDA starts."""
    key = "CUBLAS_WORKSPACE_CONFIG"
    if os.environ.get(key) not in CUBLAS_DETERMINISTIC:
        os.environ[key] = CUDA_ENV[key]
    return os.environ[key]


def torch_settings(mode: str) -> dict[str, bool | str]:
    """The torch CUDA flags ``mode`` wants (:data:`TORCH_CUDA_FLAGS`), without importing torch."""
    if mode not in TORCH_CUDA_FLAGS:
        raise LossevoError(f"determinism: {mode!r} is not one of {list(TORCH_CUDA_FLAGS)}")
    return dict(TORCH_CUDA_FLAGS[mode])


def torch_flags() -> dict[str, bool | str]:
    """torch's CUDA-relevant flags as they are now, keyed as :data:`TORCH_CUDA_FLAGS` (readable,
    and settable, without a GPU)."""
    import torch

    return {
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def set_torch_flags(flags: dict[str, bool | str]) -> dict[str, bool | str]:
    """Set torch's flags to ``flags`` (keys of :data:`TORCH_CUDA_FLAGS`); return them read back.

    Process-wide: ``use_deterministic_algorithms`` also switches CPU ops, which is why only
    :func:`configure_torch` on a CUDA device calls this in a training.
    """
    import torch

    torch.backends.cudnn.deterministic = bool(flags["cudnn_deterministic"])
    torch.backends.cudnn.benchmark = bool(flags["cudnn_benchmark"])
    torch.use_deterministic_algorithms(bool(flags["deterministic_algorithms"]),
                                       warn_only=bool(flags["deterministic_warn_only"]))
    # The precision first: it sets matmul.allow_tf32 itself, which the next line then pins.
    torch.set_float32_matmul_precision(str(flags["float32_matmul_precision"]))
    torch.backends.cuda.matmul.allow_tf32 = bool(flags["matmul_allow_tf32"])
    torch.backends.cudnn.allow_tf32 = bool(flags["cudnn_allow_tf32"])
    return torch_flags()


def configure_torch(device, mode: str | None = None) -> dict[str, bool | str]:
    """Set torch's flags for training on ``device``; return the flags set (empty: none).

    Only for a CUDA device: ``mode`` (default :func:`requested_mode`) ``portable`` makes the
    runs repeatable (:data:`TORCH_CUDA_FLAGS`, with ``CUBLAS_WORKSPACE_CONFIG``, which must be in
    the environment before CUDA starts: :class:`DeterminismError` otherwise), ``native`` fast;
    ``unset`` (:func:`apply` never ran) leaves torch as it is. Cheap and idempotent: call it at
    the start of every training. On the CPU nothing is touched.
    """
    if not _is_cuda(device):
        return {}
    mode = mode or requested_mode()
    if mode == "unset":
        return {}
    flags = torch_settings(mode)
    if mode == "portable" and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_DETERMINISTIC:
        import torch

        if torch.cuda.is_initialized():
            raise DeterminismError(
                "determinism: portable: CUDA started without CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8), "
                "so cuBLAS cannot be made deterministic in this process (call "
                "lossevo.determinism.apply() before CUDA starts, or set determinism: native)")
        set_cublas_workspace()
    return set_torch_flags(flags)


def describe_cuda() -> dict:
    """A CUDA device's determinism settings for the environment record: the mode asked for,
    ``CUBLAS_WORKSPACE_CONFIG`` and torch's flags as in effect now (read back, not assumed)."""
    return {"requested": requested_mode(), "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "torch": torch_flags()}
