"""Build and load lora-tui's own MLX primitives (C++ next to this file) on the machine that runs them.

A primitive is compiled with `-march=native` against the installed MLX's headers and libmlx, and bound to
Python with nanobind (the version whose ABI MLX's own bindings use, or arrays would not pass between
them), the first time it is asked for. The result is cached under ~/.cache/lora-tui/native/<key>, the key
covering the source, the shared header, the flags, MLX, nanobind, Python, the compiler, the environment and the
CPU, so a change of any rebuilds it. A build takes ~5 s on 2 cores; a failed one (no compiler, no Python
headers, a changed ABI) is remembered for the process and its one-line reason is kept in `reason()`: callers
fall back to MLX's own ops.
Linux x86-64 only; LORA_TUI_NATIVE=off disables it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ENV_VAR = "LORA_TUI_NATIVE"
HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_loaded: dict[str, object] = {}
_failed: dict[str, str] = {}


def load(name: str):
    """The extension module built from `<name>.cpp`, or None (see `reason(name)`)."""
    with _lock:
        if name in _loaded or name in _failed:
            return _loaded.get(name)
        try:
            module = _import(name, _build(name))
            _check_arrays_pass(module)
            _loaded[name] = module
        except Exception as err:  # any failure means MLX's own ops, with the reason kept
            _failed[name] = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        return _loaded.get(name)


def reason(name: str) -> str | None:
    """Why `load(name)` gave None, or None if it did not (or was not asked yet)."""
    return _failed.get(name)


def _check_arrays_pass(module) -> None:
    """nanobind hands an mx.array to our module only when both were built for one binding ABI (version,
    stable ABI or not); otherwise every call would fail, so the module is refused here, once."""
    import mlx.core as mx
    try:
        module.size_of(mx.zeros((2,)))
    except TypeError:
        raise RuntimeError(f"nanobind {version('nanobind')} does not share MLX {version('mlx')}'s binding ABI: "
                           "install the nanobind release MLX was built with") from None


def _stable_abi(mlx_dir: Path) -> list[str]:
    """MLX's bindings use Python's stable ABI where its wheel is abi3 (Python 3.12+); ours must match."""
    return ["-DPy_LIMITED_API=0x030C0000"] if list(mlx_dir.glob("core.abi3.*")) else []


def needs_build(name: str) -> bool:
    """Whether load(name) would compile (~5 s): nothing built for this machine yet. False where it would
    fail at once (no compiler, off) or is already loaded."""
    with _lock:
        if name in _loaded or name in _failed:
            return False
    try:
        return not _target(name)[0].is_file()
    except Exception:
        return False


def _target(name: str) -> tuple[Path, str]:
    """The cached library's path for this machine, and the compiler that builds it."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise RuntimeError("native primitives are built on Linux x86-64 only")
    if os.environ.get(ENV_VAR, "").strip().lower() in ("off", "0", "false"):
        raise RuntimeError(f"{ENV_VAR}=off")
    if importlib.util.find_spec("nanobind") is None:
        raise RuntimeError("nanobind is not installed: pip install 'nanobind>=3.0.1,<3.2'")
    from engine.native_jit import system_compiler
    compiler = system_compiler()
    if compiler is None:
        raise RuntimeError("no g++ on PATH: install a C++ compiler (Debian: apt install g++)")
    library = f"_lora_tui_{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    return _cache_dir(name, HERE / f"{name}.cpp", compiler) / library, compiler


def _build(name: str) -> Path:
    target, compiler = _target(name)  # first: its checks give the reasons
    import mlx.core
    import nanobind
    source = HERE / f"{name}.cpp"
    mlx_dir = Path(mlx.core.__file__).resolve().parent  # mlx is a namespace package
    nb_dir = Path(nanobind.__file__).resolve().parent
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    py_include = sysconfig.get_paths()["include"]
    if not (Path(py_include) / "Python.h").is_file():
        raise RuntimeError(f"no Python headers in {py_include}: install them (Debian: apt install python3-dev)")
    common = ["-std=gnu++20", "-O3", "-fPIC", "-fvisibility=hidden", "-DNDEBUG", f"-I{py_include}",
              f"-I{nb_dir / 'include'}", f"-I{HERE}", *_stable_abi(mlx_dir)]
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as folder:
        _compile(name, compiler, common, source, nb_dir, mlx_dir, Path(folder), target)
    return target


def _compile(name: str, compiler: str, common: list[str], source: Path, nb_dir: Path, mlx_dir: Path, tmp: Path,
             target: Path) -> None:
    binding = [compiler, *common, "-DNB_COMPACT_ASSERTIONS", "-fno-strict-aliasing",
               f"-isystem{nb_dir / 'ext' / 'robin_map' / 'include'}", "-c", str(nb_dir / "src" / "nb_combined.cpp"),
               "-o", str(tmp / "nanobind.o")]
    # -ffast-math only while compiling: at link time GCC would add crtfastmath.o, which flushes denormals
    # for the whole process.
    kernel = [compiler, *common, "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp",
              "-DNB_DOMAIN=mlx", f"-isystem{mlx_dir / 'include'}", "-c", str(source), "-o", str(tmp / f"{name}.o")]
    _run_all([binding, kernel])  # two processes: both cores
    partial = tmp / target.name
    _run_all([[compiler, "-shared", "-o", str(partial), str(tmp / f"{name}.o"), str(tmp / "nanobind.o"),
               f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}", "-lmvec", "-fopenmp"]])
    os.replace(partial, target)  # atomic: another process sees the whole library or none


def _run_all(commands: list[list[str]]) -> None:
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]
    outputs = [proc.communicate()[0] for proc in procs]  # every process waited for, failed or not
    for command, proc, output in zip(commands, procs, outputs):
        if proc.returncode != 0:
            first = next((line for line in output.splitlines() if "error" in line), output.strip()[:200])
            made = Path(command[command.index("-o") + 1]).name
            raise RuntimeError(f"building {made} failed: {first}")


def _cache_dir(name: str, source: Path, compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (source, HERE / "primitive.h", Path(__file__)):  # the kernel, what they share, the flags
        key.update(part.read_bytes())
    key.update(f"{Path(compiler).resolve()} {sys.prefix}".encode())  # links to this environment's libmlx
    for package in ("mlx", "nanobind"):
        try:
            key.update(version(package).encode())
        except PackageNotFoundError:
            key.update(b"?")
    key.update(sys.version.encode())
    key.update(subprocess.run([compiler, "-dumpfullversion"], capture_output=True, text=True).stdout.encode())
    key.update(_cpu_flags().encode())  # -march=native: a cache shared between machines must not mix CPUs
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora-tui" / "native" / f"{name}-{key.hexdigest()[:16]}"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"_lora_tui_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
