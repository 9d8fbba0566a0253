#!/usr/bin/env python3
"""Compile the engine's CUDA kernel sources with NVRTC on a machine without a GPU: catches what would fail
at a device call's first step (syntax, types, a misspelt name) before device time is spent on it.

Each `mx.fast.cuda_kernel` source is wrapped as MLX 0.32 wraps it: its header, then a `__global__` function
taking `const T* name` per input (plus `name_shape` / `name_ndim` where the source reads them), `T* name` per
output, and the template parameters as `constexpr int` at the top of the body. Shape stands in for MLX's
own (`x_shape[i]` reads the same). Needs NVRTC and the CUDA headers, not a GPU; in their own venv:
  python3 -m venv /tmp/nvrtc && /tmp/nvrtc/bin/pip install nvidia-cuda-nvrtc==13.0.88 \
      "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
  PYTHONPATH=. python3 bench/nvrtc_check.py --cuda /tmp/nvrtc/lib/python3.11/site-packages/nvidia/cu13
(this script imports only the kernel sources, so the host's CPU MLX will do). Prints one line per kernel.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

_PRELUDE = """
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda/std/cstdint>
namespace cg = cooperative_groups;
struct Shape { int v[10]; __device__ int operator[](int i) const { return v[i]; } };
"""

_TYPES = {"bf16": "__nv_bfloat16", "f32": "float", "i32": "int32_t", "bool": "bool"}


def wrap(name, header, source, inputs, outputs, template):
    params = [f"const {_TYPES[t]}* {n}" for n, t in inputs]
    for n, _ in inputs:
        if f"{n}_shape" in source:
            params.append(f"const __grid_constant__ Shape {n}_shape")
        if f"{n}_ndim" in source:
            params.append(f"const __grid_constant__ int {n}_ndim")
    params += [f"{_TYPES[t]}* {n}" for n, t in outputs]
    consts = "".join(f"  constexpr int {k} = {v};\n" for k, v in template.items())
    return f'{_PRELUDE}{header}\nextern "C" __global__ void {name}({", ".join(params)}) {{\n{consts}{source}\n}}\n'


def kernels():
    """(name, header, source, inputs, outputs, template) for each kernel source of the engine."""
    from engine.model import lora_cuda, philox, swiglu_cuda
    lora = dict(THRESHOLD=62259, FACTOR_BITS=lora_cuda._bits(2 / 0.95))
    yield ("philox_mask", philox._HEADER, philox._SOURCE, [("seed", "i32"), ("like", "bf16")], [("mask", "bool")],
           dict(THRESHOLD=62259, PER_CALL=8))
    yield ("swiglu_pair_grad", "", swiglu_cuda._SOURCE, [("gate_up", "bf16"), ("cotangent", "bf16")],
           [("grad", "bf16")], dict(WIDTH=14336))
    for rank in (16, 32):
        yield (f"lora_down_r{rank}", lora_cuda._HEADER, lora_cuda._DOWN,
               [("x", "bf16"), ("aT", "bf16"), ("seed", "i32")], [("h", "bf16")],
               dict(lora, WIDTH=14336, RANK=rank, NW=lora_cuda.WARPS))
        yield (f"lora_masked_up_r{rank}", lora_cuda._HEADER, lora_cuda._MASKED_UP,
               [("grad_h", "bf16"), ("a", "bf16"), ("dropped", "bf16")], [("grad_x", "bf16")],
               dict(FACTOR_BITS=lora["FACTOR_BITS"], WIDTH=4096, RANK=rank, TILES_PER_WARP=lora_cuda.TILES_PER_WARP))
    yield ("lora_dropped", lora_cuda._HEADER, lora_cuda._DROPPED, [("x", "bf16"), ("seed", "i32")],
           [("out", "bf16")], lora)


def compile_one(nvrtc, include: Path, arch: str, name: str, code: str) -> tuple[bool, str]:
    prog = ctypes.c_void_p()
    src = code.encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, f"{name}.cu".encode(), 0, None, None) == 0
    opts = [f"--gpu-architecture={arch}", "-std=c++17", f"-I{include}", f"-I{include / 'cccl'}",
            "--device-as-default-execution-space", "--ptxas-options=-v"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    ok = nvrtc.nvrtcCompileProgram(prog, len(opts), arr) == 0
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return ok, log.value.decode(errors="replace")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", required=True, type=Path, help="folder with lib/libnvrtc.so.* and include/")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    for builtins in (args.cuda / "lib").glob("libnvrtc-builtins.so.*"):  # NVRTC opens it by name
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(str(next((args.cuda / "lib").glob("libnvrtc.so.*"))))
    failed = 0
    for name, header, source, inputs, outputs, template in kernels():
        if args.only and not any(o in name for o in args.only):
            continue
        ok, log = compile_one(nvrtc, args.cuda / "include", args.arch, name,
                                     wrap(name, header, source, inputs, outputs, template))
        usage = " ".join(line.split(":", 1)[-1].strip() for line in log.splitlines()
                         if "Used" in line or "spill" in line)
        print(f"{name:24s} {'ok' if ok else 'FAILED'}  {usage}")
        if not ok or "warning" in log.replace("warning : Registers are spilled", ""):
            print(log)
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
