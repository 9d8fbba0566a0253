"""MLX's CPU kernels built for this machine's vector unit (Linux x86-64).

`mx.compile` fuses element-wise ops into C++ that MLX builds at run time with `g++ -O3`, without `-march`,
so on x86-64 every fused `exp` (softmax, SiLU, the loss) is a scalar loop calling libm's `fmaf` through the
PLT. A `g++` first on PATH that adds `-march=native` (the kernels only run on the machine that builds them)
and lets GCC inline MLX's branch-free exp (no errno, no traps) turns those loops into AVX-512 code: a fused
exp over 3.7M floats 40.7 -> 1.5 ms, x * sigmoid(x) 58 -> 2.0 ms on this machine (bench/RESULTS.md, issue 22). The upstream fix
is the same flag in MLX's JitCompiler::build_command, or x86 types in mlx/backend/cpu/simd (today the
Linux build's SIMD width is 1).

MLX caches built kernels by name under <tmp>/mlx/<version>/cpu and never rebuilds one that exists, so
kernels built before this switch (by mlx-lm, say, or with other flags) are cleared once; a marker file
records the flags the cache was built with. LORA_TUI_NATIVE_JIT=off keeps MLX's own flags. Must run before MLX builds a kernel;
engine/__init__.py calls enable() right after the BLAS preload.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ENV_VAR = "LORA_TUI_NATIVE_JIT"
FLAGS = "-march=native -finline-limit=2000 -fno-trapping-math -fno-math-errno"  # inlined and branch-free: vectorized
MARKER = ".lora-tui-native"


def _wrapper_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora-tui" / "jit-bin"


def enable() -> bool:
    """Put the -march=native g++ first on PATH; True when the switch is on."""
    if (sys.platform != "linux" or platform.machine() != "x86_64"
            or os.environ.get(ENV_VAR, "").strip().lower() in ("off", "0", "false")):
        return False
    here = _wrapper_dir()
    search = _path_without_wrapper()
    compiler = system_compiler()
    if compiler is None:  # no compiler: MLX runs its ops unfused anyway
        return False
    script = f'#!/bin/sh\nexec "{compiler}" {FLAGS} "$@"\n'
    try:
        _write_wrapper(here / "g++", script)
        _clear_foreign_kernels()
    except OSError:  # a read-only home or tmp: MLX's own flags still work
        return False
    if os.environ.get("PATH", "").split(os.pathsep)[0] != str(here):
        os.environ["PATH"] = f"{here}{os.pathsep}{search}"
    return True


def _path_without_wrapper() -> str:
    here = _wrapper_dir()
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != here)


def system_compiler() -> str | None:
    """The machine's own g++, not the wrapper (engine/native/build.py passes its flags itself)."""
    return shutil.which("g++", path=_path_without_wrapper())


def _write_wrapper(path: Path, script: str) -> None:
    if path.is_file() and path.read_text() == script:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".g++.{os.getpid()}")
    tmp.write_text(script)
    tmp.chmod(0o755)
    os.replace(tmp, path)


def _clear_foreign_kernels() -> None:
    """Remove kernels MLX built without the flag (once per cache folder), so that each is built again."""
    from importlib.metadata import version
    folder = Path(tempfile.gettempdir()) / "mlx" / version("mlx") / "cpu"
    marker = folder / MARKER
    if marker.is_file() and marker.read_text() == FLAGS:
        return
    if folder.is_dir():
        for built in folder.iterdir():
            if built.suffix in (".so", ".cpp"):
                built.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(FLAGS)
