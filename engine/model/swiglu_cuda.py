"""The backward pass of the fused gate + up SwiGLU (lean.swiglu_pair) as one CUDA kernel.

Under mx.compile the same gradient is one fused element-wise kernel, but it reads gate and up as strided
halves of the (tokens x 2 x width) product and writes the result through a broadcast select, and MLX's
generic indexing for that ran at ~1.7 TB/s on an H100: 347 us a layer at Mistral-7B's shape, where reading
gate, up and the cotangent and writing both gradients (5 x 117 MB) needs ~200 us at the memory's rate
(bench/gpu/issue22_h100_ncu_base.txt). Here each thread takes eight columns of one row: 16-byte loads and
stores, float32 arithmetic, one rounding to bf16 at the end (the ops round after each step).
bf16 on CUDA only, widths a multiple of 8; everything else keeps the ops (lean._swiglu_pair_vjp).
"""

from __future__ import annotations

import mlx.core as mx

from engine.model.loading import cuda_default

_SOURCE = r"""
  long long n = 1;
  for (int i = 0; i < cotangent_ndim; ++i) n *= cotangent_shape[i];
  long long t = cg::this_grid().thread_rank();
  if (t * 8 >= n) return;
  long long row = (t * 8) / WIDTH, col = (t * 8) % WIDTH;
  const __nv_bfloat16* in = gate_up + row * 2 * WIDTH + col;
  uint4 g8 = *reinterpret_cast<const uint4*>(in);
  uint4 u8 = *reinterpret_cast<const uint4*>(in + WIDTH);
  uint4 c8 = *reinterpret_cast<const uint4*>(cotangent + t * 8);
  uint4 dg8, du8;
  const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&g8);
  const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&u8);
  const __nv_bfloat162* c2 = reinterpret_cast<const __nv_bfloat162*>(&c8);
  __nv_bfloat162* dg2 = reinterpret_cast<__nv_bfloat162*>(&dg8);
  __nv_bfloat162* du2 = reinterpret_cast<__nv_bfloat162*>(&du8);
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 g = __bfloat1622float2(g2[i]), u = __bfloat1622float2(u2[i]), c = __bfloat1622float2(c2[i]);
    float sx = 1.0f / (1.0f + __expf(-g.x)), sy = 1.0f / (1.0f + __expf(-g.y));
    float fx = g.x * sx, fy = g.y * sy;  // silu(gate)
    dg2[i] = __floats2bfloat162_rn(c.x * u.x * (sx + fx * (1.0f - sx)), c.y * u.y * (sy + fy * (1.0f - sy)));
    du2[i] = __floats2bfloat162_rn(c.x * fx, c.y * fy);
  }
  __nv_bfloat16* out = grad + row * 2 * WIDTH + col;
  *reinterpret_cast<uint4*>(out) = dg8;
  *reinterpret_cast<uint4*>(out + WIDTH) = du8;
"""

_kernel = None
USE_KERNEL: bool | None = None  # None: on CUDA; False: the ops everywhere (bench/bench_gpu.py's BENCH_SWIGLU_KERNEL)


def applies(gate_up: mx.array, cotangent: mx.array) -> bool:
    """Whether swiglu_pair_grad can take this gradient: bf16, a width of a multiple of 8, on CUDA."""
    if not cuda_default(USE_KERNEL):
        return False
    return (gate_up.dtype == cotangent.dtype == mx.bfloat16 and cotangent.shape[-1] % 8 == 0
            and gate_up.shape[-1] == 2 * cotangent.shape[-1])


def swiglu_pair_grad(gate_up: mx.array, cotangent: mx.array) -> mx.array:
    """d(silu(gate) * up) / d(gate_up) times `cotangent`, shaped like gate_up ([..., gate | up])."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="lora_tui_swiglu_pair_grad", input_names=["gate_up", "cotangent"],
                                      output_names=["grad"], source=_SOURCE)
    width = cotangent.shape[-1]
    return _kernel(inputs=[gate_up, cotangent], template=[("WIDTH", width)],
                   grid=(max(1, cotangent.size // 8), 1, 1), threadgroup=(256, 1, 1),
                   output_shapes=[gate_up.shape], output_dtypes=[gate_up.dtype])[0]
