"""Give MLX's CPU backend an optimized BLAS before `mlx` is first imported.

Stock mlx-cpu on Linux links a reference BLAS (~6 GFLOP/s for a float32 matmul on 2 cores). If a
library exporting the CBLAS symbols is loaded with RTLD_GLOBAL first, MLX's calls bind to it instead:
~350 GFLOP/s with MKL (a dependency on Linux x86-64) or Debian's OpenBLAS. This module must run before
anything imports mlx; `engine/__init__.py` calls `preload()` for that reason.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from dataclasses import dataclass

ENV_VAR = "LORA_TUI_BLAS"  # "off", "auto" (default) or a path to a CBLAS shared library


@dataclass(frozen=True)
class BlasInfo:
    name: str  # "mkl", "openblas", "reference" or "accelerate"
    path: str | None
    reason: str


_ACTIVE: BlasInfo | None = None


def _candidates() -> list[tuple[str, str]]:
    prefixes = {sys.prefix, sys.base_prefix}
    found: list[tuple[str, str]] = []
    for prefix in prefixes:
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*"))):
            found.append(("mkl", path))
    for pattern in ("/usr/lib/x86_64-linux-gnu/libopenblas.so*", "/usr/lib/aarch64-linux-gnu/libopenblas.so*",
                    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so*", "/usr/lib64/libopenblas.so*"):
        found.extend(("openblas", p) for p in sorted(glob.glob(pattern)))
    return found


def preload() -> BlasInfo:
    """Load the fastest CBLAS we can find into the global symbol namespace. Idempotent."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    if sys.platform == "darwin":
        _ACTIVE = BlasInfo("accelerate", None, "macOS: MLX uses Metal and Accelerate")
        return _ACTIVE
    choice = os.environ.get(ENV_VAR, "auto").strip()
    if choice.lower() == "off":
        _ACTIVE = BlasInfo("reference", None, f"{ENV_VAR}=off")
        return _ACTIVE
    if "mlx.core" in sys.modules:
        _ACTIVE = BlasInfo("reference", None, "mlx was imported before engine.blas could preload a BLAS")
        return _ACTIVE
    if choice.lower() != "auto":
        candidates = [("openblas" if "openblas" in choice else "mkl" if "mkl" in choice else "custom", choice)]
    else:
        candidates = _candidates()
    # MKL's default threading layer (Intel OpenMP) clashes with the GNU OpenMP that other libs bring.
    os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
    errors = []
    for name, path in candidates:
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        _ACTIVE = BlasInfo(name, path, "preloaded")
        return _ACTIVE
    reason = "no optimized BLAS found (install the `mkl` wheel or Debian's libopenblas0)"
    if errors:
        reason += "; failed: " + "; ".join(errors)
    _ACTIVE = BlasInfo("reference", None, reason)
    return _ACTIVE


def active() -> BlasInfo:
    return preload()


# Each library's own call for its thread count; both take effect at once, also after the first matmul.
_SET_THREADS = {"mkl": "MKL_Set_Num_Threads", "openblas": "openblas_set_num_threads"}


def set_threads(n: int) -> bool:
    """Cap the preloaded BLAS at n threads. Several ranks of one host each running a thread per core spin
    against each other: two ranks on 2 cores took 4-27 s a step instead of 1.2 s. False where the BLAS
    has no such call (the reference BLAS is single-threaded; Accelerate manages its own)."""
    info = active()
    setter = _SET_THREADS.get(info.name)
    if setter is None or info.path is None:
        return False
    try:
        getattr(ctypes.CDLL(info.path), setter)(ctypes.c_int(max(1, int(n))))
    except (OSError, AttributeError):
        return False
    global _THREADS
    _THREADS = max(1, int(n))
    return True


_THREADS: int | None = None


def threads() -> int:
    """The threads one of our own CPU kernels may use beside the BLAS (engine/native): set_threads' cap,
    else a thread per core."""
    return _THREADS or cores()


def cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
