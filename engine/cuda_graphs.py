"""Smaller CUDA graphs: how many ops MLX's CUDA backend records into one graph before it launches it.

MLX keeps each op's inputs alive until the CUDA graph holding that op has run, and over its memory limit it
waits only while an earlier graph still runs, so the open graph's dead inputs count against the limit
(bench/RESULTS.md, ninth session). On an H100 MLX records up to 100 ops a graph, and a step kept near its
limit spends part of each step throttled. At 10 ops a graph, LoRA on all seven layers with gradient
checkpointing ran 11-14% faster at 0.6 GB less peak; the other rows measured moved within the bench's 3-5%
spread, at the same or lower peak (H100, nineteenth session).

MLX reads MLX_MAX_OPS_PER_BUFFER once per process, when it makes its first CUDA command encoder, so
engine/__init__.py sets it at import, before any array exists. On Linux only MLX's CUDA backend reads it (the
CPU backend ignores it), so it is set there without importing MLX. On macOS Metal sizes its command buffers
with the same variable: left to MLX. A value the user set is kept.
"""

from __future__ import annotations

import os
import sys

ENV_VAR = "MLX_MAX_OPS_PER_BUFFER"
OPS_PER_GRAPH = 10


def limit_graph_size() -> None:
    """Set MLX's ops per CUDA graph for this process where it applies (a value the user set is kept)."""
    if os.environ.get(ENV_VAR, "").strip() or sys.platform != "linux":  # Metal reads the variable too
        return
    os.environ[ENV_VAR] = str(OPS_PER_GRAPH)


def device_note(on_cuda: bool) -> str:
    """For a run's device line on CUDA: the graph size MLX runs with (the variable as set before MLX's first CUDA
    command encoder; engine/__init__.py sets it at import, so a later change would not reach MLX)."""
    value = os.environ.get(ENV_VAR, "").strip()
    return f", {value} ops per CUDA graph" if value and on_cuda else ""
