"""lora-tui's MLX engine: config, data, model, training, evaluation, generation.

It never imports the UI. The optimized BLAS is preloaded here because it must be in place before the
first `import mlx.core` anywhere in the process.
"""

import atexit as _atexit
import sys as _sys

from engine import blas as _blas
from engine import cuda_graphs as _cuda_graphs
from engine import heap as _heap
from engine import native_jit as _native_jit

_blas.preload()
_heap.keep_freed_memory()  # before MLX's first buffers: a step's memory stays paged in
_native_jit.enable()  # before MLX builds its first fused CPU kernel
_cuda_graphs.limit_graph_size()  # before MLX makes its first CUDA command encoder


def release_mlx_streams() -> None:
    """Destroy the calling thread's MLX streams. MLX no longer cleans up at exit by itself: a thread
    that used MLX must call this before it ends, or the process may abort at exit (code 134)."""
    mx = _sys.modules.get("mlx.core")
    if mx is not None:
        try:
            mx.synchronize()
        except Exception:
            pass
        mx.clear_streams()


_atexit.register(release_mlx_streams)  # the main thread's streams

__version__ = "0.1.0"
