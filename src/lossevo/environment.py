"""The environment record: what produced a result directory (code, libraries, CPU, GPU, settings).

On a CUDA device the record adds the GPU's details (:func:`cuda_device`: count, memory, compute
capability, driver) and torch's CUDA determinism flags as in effect (``determinism.cuda``); on
the CPU it holds neither key, so CPU records are as they were.

Numbers on the CPU depend on the library versions, the CPU's kernels, the thread counts and the
determinism settings (:mod:`lossevo.determinism`), so every result directory records them:
the search stage in ``search/NAME/environment.json``, retraining in ``retrain/environment.json``
and the report in ``environment.json`` (all stages', keyed by stage). These files are DVC-tracked
outputs and must hash the same on a rerun on the same machine, so a record holds no timings,
dates, host names or paths; and several retraining processes may write the same record at once
(atomically, with identical content).
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path

from lossevo import __version__, determinism

#: CPU flags worth recording: the vector extensions the kernels dispatch on.
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "amx_tile")
#: Packages whose versions change numbers besides torch (searches: numpy, pycma; stats: scipy).
PACKAGES = ("numpy", "scipy", "cma", "deap")
#: The record's file name in a search directory, in retrain/ and (all stages') in results/EXP/.
FILE = "environment.json"


def stage_paths(exp) -> dict[str, Path]:
    """Where each stage of ``exp`` (a :class:`lossevo.config.Experiment`) writes its record,
    keyed ``search/NAME`` and ``retrain``."""
    paths = {f"search/{name}": exp.search_dir(name) / FILE for name in exp.cfg["search"]}
    paths["retrain"] = exp.root / "retrain" / FILE
    return paths


def git_commit(timeout: float = 10.0) -> dict:
    """The git commit the package's source sits in, and whether that source differs from it.

    ``dirty``: files under the package directory are modified, or new and not ignored (the
    results next to it, also tracked, would make every rerun dirty). ``{"commit": "unknown",
    "dirty": None}`` when the package is not a tracked file of a git checkout (an installed
    wheel) or git is missing or slow.
    """
    pkg = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(pkg), *args], capture_output=True,
                              text=True, timeout=timeout, check=True).stdout

    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # the package is tracked in this checkout
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--", ".").strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_vector_flags() -> list[str] | None:
    """Which of :data:`CPU_FLAGS` the CPU has (None where the flags cannot be read)."""
    flags = determinism.cpu_flags()
    return None if flags is None else [f for f in CPU_FLAGS if f in flags]


def _config_version(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


def _mkl_version(config: str) -> str | None:
    """``2024.2 (build 20240605)`` from torch's build configuration; None without MKL."""
    version = _config_version(r"Math Kernel Library Version (\d[\d.]*)", config)
    build = _config_version(r"Math Kernel Library Version \S+ Build (\d+)", config)
    return f"{version} (build {build})" if version and build else version


def _threads(text: str, name: str) -> int | None:
    value = _config_version(rf"{re.escape(name)}\(\) : (\d+)", text)
    return int(value) if value else None


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _openblas(np_dir: Path) -> dict | None:
    """The OpenBLAS bundled with numpy (a wheel's ``numpy.libs``): version, kernel set, threads.

    Read through OpenBLAS's own ``openblas_get_*`` functions (symbol names with the prefixes and
    suffixes of the scipy-openblas builds); None for a numpy on another BLAS.
    """
    import ctypes

    def get(lib: ctypes.CDLL, name: str, restype):
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                func = getattr(lib, f"{prefix}openblas_get_{name}{suffix}", None)
                if func is not None:
                    func.argtypes, func.restype = [], restype
                    return func()
        return None

    libs = sorted(p for d in (np_dir.parent / "numpy.libs", np_dir / ".dylibs") if d.is_dir()
                  for p in d.iterdir() if "openblas" in p.name.lower())
    for path in libs:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        corename, config = get(lib, "corename", ctypes.c_char_p), get(lib, "config", ctypes.c_char_p)
        if corename is None:
            continue
        version = re.search(r"OpenBLAS ([\d.]+)", config.decode()) if config else None
        return {"library": "openblas", "version": version.group(1) if version else None,
                "architecture": corename.decode(), "threads": get(lib, "num_threads", ctypes.c_int)}
    return None


def numpy_runtime() -> dict:
    """numpy's SIMD targets in use and its BLAS (kernel set and threads)."""
    import numpy as np

    out: dict = {"simd": None, "blas": _openblas(Path(np.__file__).resolve().parent)}
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
        out["simd"] = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    except ImportError:
        pass
    return out


def driver_from_proc(text: str) -> str | None:
    """The NVIDIA driver version in the text of ``/proc/driver/nvidia/version`` (only the
    number: the file also names the build's date and host)."""
    match = re.search(r"NVRM version:.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return match.group(1) if match else None


def nvidia_driver() -> str | None:
    """The NVIDIA driver version (``550.54.15``): /proc/driver/nvidia/version, else NVML; None
    where neither answers."""
    try:
        version = driver_from_proc(Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        version = None
    if version is not None:
        return version
    import ctypes

    for name in ("libnvidia-ml.so.1", "nvml.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        init, get = getattr(lib, "nvmlInit_v2", None), getattr(lib, "nvmlSystemGetDriverVersion", None)
        if init is None or get is None or init() != 0:
            return None
        try:
            buf = ctypes.create_string_buffer(96)
            return buf.value.decode() if get(buf, ctypes.c_uint(len(buf))) == 0 else None
        finally:
            lib.nvmlShutdown()
    return None


def cuda_driver_api() -> str | None:
    """The newest CUDA version the installed driver supports (``cuDriverGetVersion``, e.g.
    ``12.8``); None without libcuda. Needs no CUDA context."""
    import ctypes

    for name in ("libcuda.so.1", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        value = ctypes.c_int(0)
        func = getattr(lib, "cuDriverGetVersion", None)
        if func is not None and func(ctypes.byref(value)) == 0 and value.value > 0:
            return f"{value.value // 1000}.{value.value % 1000 // 10}"
    return None


def cuda_device(device) -> dict:
    """The CUDA device a result was computed on (a torch device or name of type cuda).

    Its index, how many devices the process sees, memory, compute capability, multiprocessors,
    the NVIDIA driver and the CUDA version it supports. The model name is the record's ``gpu``,
    the CUDA runtime (torch's) and cuDNN versions its ``cuda`` entry; nothing here changes
    between reruns on one machine (no free memory, no clocks, no UUID).
    """
    import torch

    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "index": index,
        "count": torch.cuda.device_count(),
        "memory_bytes": int(props.total_memory),
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": int(props.multi_processor_count),
        "driver": nvidia_driver(),
        "driver_cuda": cuda_driver_api(),
    }


def record(device) -> dict:
    """The environment of this process for a result produced on ``device`` (a torch device or name).

    lossevo version and git commit; Python, torch, CUDA, cuDNN, MKL, oneDNN and numpy versions;
    CPU model, flags and the ATen kernels in use; GPU model; torch/MKL/OpenMP/OpenBLAS threads;
    the determinism mode and settings; on a CUDA device also ``cuda_device``
    (:func:`cuda_device`) and torch's CUDA flags (``determinism.cuda``). No timings, dates, host
    names or paths.
    """
    import torch

    config = torch.__config__.show()
    parallel = torch.__config__.parallel_info()
    cuda = torch.cuda.is_available()
    device = torch.device(device)
    gpu = None
    if device.type == "cuda" or cuda:
        gpu = torch.cuda.get_device_name(device if device.type == "cuda" else 0)
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except RuntimeError:
        cudnn = None
    blas = numpy_runtime()
    out = {
        "lossevo": {"version": __version__, **git_commit()},
        "python": platform.python_version(),
        "platform": {"system": platform.system(), "machine": platform.machine(),
                     "libc": " ".join(platform.libc_ver()).strip() or None},
        "torch": torch.__version__,
        "packages": {name: _package_version(name) for name in PACKAGES},
        "cuda": {"build": torch.version.cuda, "available": cuda, "cudnn": cudnn},
        "mkl": _mkl_version(config),
        "onednn": _config_version(r"MKL-DNN v([^\s]+)", config),
        "numpy_simd": blas["simd"],
        "numpy_blas": blas["blas"],
        "cpu": {"model": cpu_model(), "flags": cpu_vector_flags(),
                "aten_capability": determinism.aten_capability()},
        "gpu": gpu,
        "device": str(device),
        "threads": {"torch": torch.get_num_threads(), "mkl": _threads(parallel, "mkl_get_max_threads"),
                    "openmp": _threads(parallel, "omp_get_max_threads")},
        "determinism": determinism.describe(device),
    }
    if device.type == "cuda":
        out["cuda_device"] = cuda_device(device)
    return out
