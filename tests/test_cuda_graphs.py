"""engine/cuda_graphs.py: on CUDA the engine asks MLX for CUDA graphs of 10 ops (a checkpointed step was 11-14%
faster on an H100, bench/RESULTS.md, nineteenth session); a user's MLX_MAX_OPS_PER_BUFFER is kept, and where
there is no CUDA (Metal sizes its command buffers with the same variable) MLX's default stays."""

import os
import subprocess
import sys

import mlx.core as mx

from engine import cuda_graphs
from helpers import ROOT

READ_BACK = "import os, engine; print(os.environ.get('MLX_MAX_OPS_PER_BUFFER', 'unset'))"


def _engine_import_leaves(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != cuda_graphs.ENV_VAR}
    if env_value is not None:
        env[cuda_graphs.ENV_VAR] = env_value
    out = subprocess.run([sys.executable, "-c", READ_BACK], cwd=ROOT, env=env, check=True, capture_output=True,
                         text=True)
    return out.stdout.strip()


def test_without_cuda_the_engine_leaves_mlx_its_own_graph_size():
    assert not mx.cuda.is_available()  # this machine: the CPU build
    assert _engine_import_leaves(None) == "unset"


def test_a_graph_size_the_user_set_is_kept():
    assert _engine_import_leaves("37") == "37"


def test_on_cuda_the_engine_asks_for_ten_ops_a_graph(monkeypatch):
    monkeypatch.delenv(cuda_graphs.ENV_VAR, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")  # MLX's CUDA build is Linux-only
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)  # a GPU cannot run here: only its answer is faked
    try:
        assert cuda_graphs.limit_graph_size() == "10 ops per CUDA graph"
        assert os.environ[cuda_graphs.ENV_VAR] == "10"
        assert "set before the engine started" in cuda_graphs.limit_graph_size()  # once set, it stays
    finally:
        os.environ.pop(cuda_graphs.ENV_VAR, None)


def test_a_mac_is_left_to_metal_s_own_command_buffer_size(monkeypatch):
    monkeypatch.delenv(cuda_graphs.ENV_VAR, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)  # even so: Metal reads the same variable
    assert cuda_graphs.limit_graph_size() == "MLX's default (no CUDA)"
    assert cuda_graphs.ENV_VAR not in os.environ
