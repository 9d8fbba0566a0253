"""engine/cuda_graphs.py: on Linux, where MLX's CUDA backend is the only reader, importing the engine asks MLX for
CUDA graphs of 10 ops (a checkpointed step was 11-14% faster on an H100, bench/RESULTS.md, nineteenth session); a
user's MLX_MAX_OPS_PER_BUFFER is kept, and on macOS, where Metal sizes its command buffers with the same variable,
MLX's default stays."""

import os
import subprocess
import sys

from engine import cuda_graphs
from helpers import ROOT

# What a process that imports the engine runs with; PLATFORM stands in for sys.platform before the import.
READ_BACK = ("import os, sys; sys.platform = {platform!r}; import engine; "
             "print(os.environ.get('MLX_MAX_OPS_PER_BUFFER', 'unset'))")


def _after_engine_import(user_value: str | None, platform: str = "linux") -> str:
    env = {k: v for k, v in os.environ.items() if k != cuda_graphs.ENV_VAR}
    if user_value is not None:
        env[cuda_graphs.ENV_VAR] = user_value
    out = subprocess.run([sys.executable, "-c", READ_BACK.format(platform=platform)], cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def test_on_linux_importing_the_engine_asks_for_ten_ops_a_cuda_graph():
    assert _after_engine_import(None) == "10"


def test_a_graph_size_the_user_set_is_kept():
    assert _after_engine_import("37") == "37"


def test_a_mac_is_left_to_metal_s_own_command_buffer_size():
    assert _after_engine_import(None, platform="darwin") == "unset"


def test_a_cuda_run_s_device_line_names_the_graph_size(monkeypatch):
    monkeypatch.setenv(cuda_graphs.ENV_VAR, "10")
    assert cuda_graphs.device_note(on_cuda=True) == ", 10 ops per CUDA graph"
    assert cuda_graphs.device_note(on_cuda=False) == ""  # the CPU and Metal: MLX's own command buffers
