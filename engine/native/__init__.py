"""lora-tui's own MLX primitives in C++, built on first use for the machine that runs them (build.py)."""


def threads(calls_blas: bool = False) -> int:
    """Threads for a primitive's OpenMP tasks. A primitive that calls the BLAS from its tasks gives each task
    MKL on its share of the threads; other libraries have no per-thread setting, so with them such a primitive
    keeps to one thread and lets the BLAS spread each product."""
    from engine import blas
    return 1 if calls_blas and blas.active().name != "mkl" else blas.threads()
