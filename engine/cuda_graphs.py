"""Smaller CUDA graphs: how many ops MLX's CUDA backend records into one graph before it launches it.

MLX keeps each op's inputs alive until the CUDA graph holding that op has run, and over its memory limit it
waits only while an earlier graph still runs, so the open graph's dead inputs count against the limit
(bench/RESULTS.md, ninth session). On an H100 MLX records up to 100 ops a graph, and a step kept near its
limit spends part of each step throttled. At 10 ops a graph, LoRA on all seven layers with gradient
checkpointing ran 11-14% faster at 0.6 GB less peak; q/v, all seven and 4-bit steps, with and without
checkpointing, stayed within 1.5% and never took more memory (H100, nineteenth session).

MLX reads MLX_MAX_OPS_PER_BUFFER once per process, when it makes its first CUDA command encoder, so
engine/__init__.py calls this at import, before any array exists. A value the user set is kept. Metal sizes its
command buffers with the same variable and the CPU ignores it: both are left to MLX.
"""

from __future__ import annotations

import os
import sys

ENV_VAR = "MLX_MAX_OPS_PER_BUFFER"
OPS_PER_GRAPH = 10


def limit_graph_size() -> str:
    """Set MLX's ops per CUDA graph for this process where it applies; returns what was done."""
    if os.environ.get(ENV_VAR, "").strip():
        return f"{ENV_VAR}={os.environ[ENV_VAR]} (set before the engine started)"
    if sys.platform != "linux":  # MLX's CUDA build is Linux-only: a Mac's start-up does not import MLX for this
        return "MLX's default (no CUDA)"
    import mlx.core as mx  # after the BLAS preload (engine/__init__.py)
    if not mx.cuda.is_available():
        return "MLX's default (no CUDA)"
    os.environ[ENV_VAR] = str(OPS_PER_GRAPH)
    return f"{OPS_PER_GRAPH} ops per CUDA graph"
