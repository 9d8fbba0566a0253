"""lora-tui's own MLX primitives in C++, built on first use for the machine that runs them (build.py)."""


def threads() -> int:
    """Threads for a primitive's OpenMP tasks. Each task runs MKL on one thread of its own; OpenBLAS has no
    per-thread setting, so with it a primitive keeps to one thread and lets OpenBLAS spread each product."""
    from engine import blas
    return 1 if blas.active().name == "openblas" else blas.threads()
