"""A LoRA adapter's dropout fused into its rank-r products, as CUDA kernels (bf16 activations, Philox seeds).

With dropout, lean.lora_branch's seeded path makes, per adapter and step: a Philox pass writing a boolean
mask, a pass writing the dropped input, the product with lora_a; and in the backward pass the mask again, the
dropped input again, that product again (for lora_b's gradient), the product back to the input and a pass
masking it. On an H100 (Mistral-7B shape, LoRA on all seven layers) dropout 0.05 took 8-12% of a bf16 step
and 11% of a 4-bit one (bench/RESULTS.md). Here, for the same Philox draws (philox.py's layout: value j of
the call for flat index n // 8), three kernels:
- `down`: h = (scale / keep) * (mask * x) @ a, the mask drawn inside; x is read once, nothing is written but h.
- `dropped`: the backward pass's (scale / keep) * mask * x, written once, dropped values as -0.0 (a kept
  value that rounds to zero is written +0.0), so the mask travels in the sign of zero; lora_a's gradient is
  its product with h's gradient (cuBLAS).
- `masked_up`: x's gradient, (scale / keep) * mask * (dh @ a.T), the mask read back from `dropped`.
h itself (tokens x rank) is kept for lora_b's gradient instead of being computed again. Like the seeds, only
outside gradient-checkpointed blocks. On an H100 they gave the ops' values and gradients within bf16 rounding
(tests/test_lora_cuda.py: the kernel scales a float32 sum where the ops round x / keep to bf16 first); two lines
reformatted since were compiled with NVRTC (bench/nvrtc_check.py), not run again on a GPU. Not faster enough to
be on by default (USE_KERNELS below).
"""

from __future__ import annotations

import struct

import mlx.core as mx

from engine.model import philox
from engine.model.loading import cuda_default

# Off: on an H100 (Mistral-7B shape, LoRA on all seven layers, bench/RESULTS.md, thirteenth session) they gave
# +1.7% tokens/s in bf16 and +1.8% on a 4-bit base in alternated runs, inside the runs' own spread, at 0.4-0.7 GB
# more peak memory, and without the memory limit -0.8%. ncu timed them at 2-4x their memory's floor. True: on
# (bench_gpu.py's BENCH_LORA_KERNELS=1); None would mean on CUDA only.
USE_KERNELS: bool | None = False
MAX_RANK = 32  # down's shared memory: 8 warps x 16 rows x rank float32 sums next to the warps' tiles (34 KB at 32)
WARPS = 8  # down: warps splitting the width of a block's 16 rows
TILES_PER_WARP = 4  # masked_up: 64-column tiles a warp writes with one load of its 16 rows of dh

# philox._HEADER brings lora_tui_draw and lora_tui_kept: the mask kernel's own draws
_HEADER = philox._HEADER + r"""
__device__ __forceinline__ void lora_tui_mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
"""

# Tensor cores through PTX's mma.sync (m16n8k16, bf16 in, float32 sums; <mma.h> is not in every CUDA install
# MLX's wheel depends on). Fragment layouts as in the PTX ISA: g = lane / 4 and t = lane % 4; A holds rows g and
# g + 8, columns 2t, 2t + 1 and 8 more; B columns n = g, rows 2t, 2t + 1 and 8 more; the sums rows g and g + 8,
# columns 2t and 2t + 1. A block of NW warps takes 16 rows; warp w sums its share of the width, 64 columns at a
# time: each lane loads four 8-value chunks, draws their masks (one Philox call each) and stores them masked
# into the warp's tile in shared memory (rows padded to 72 values: no bank conflicts on the fragment loads),
# then 4 x RANK / 8 products with lora_a's rows (aT: rank x width). The warps' sums meet in shared memory.
_DOWN = r"""
  constexpr int CHUNKS = WIDTH / 8, TILES = WIDTH / 64, PER_WARP = (TILES + NW - 1) / NW;
  __shared__ __align__(16) __nv_bfloat16 xs[NW][16][72];
  __shared__ float sums[NW][16][RANK];
  long long n = 1;
  for (int i = 0; i < x_ndim; ++i) n *= x_shape[i];
  long long rows = n / WIDTH, row0 = (long long)blockIdx.x * 16;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  float acc[RANK / 8][4];
  #pragma unroll
  for (int i = 0; i < RANK / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  int tile_end = min((warp + 1) * PER_WARP, TILES);
  for (int tile = warp * PER_WARP; tile < tile_end; ++tile) {
    #pragma unroll
    for (int m = 0; m < 4; ++m) {
      int q = lane + 32 * m, r = q >> 3, c = tile * 8 + (q & 7);  // row r of the block, chunk c of the row
      uint4 o8 = make_uint4(0u, 0u, 0u, 0u);
      if (row0 + r < rows) {
        uint4 x8 = *reinterpret_cast<const uint4*>(x + (row0 + r) * WIDTH + c * 8);
        uint4 rnd = lora_tui_draw((unsigned long long)(row0 + r) * CHUNKS + c, seed);
        const unsigned short* xv = reinterpret_cast<const unsigned short*>(&x8);
        unsigned short* o = reinterpret_cast<unsigned short*>(&o8);
        #pragma unroll
        for (int j = 0; j < 8; ++j) o[j] = lora_tui_kept(rnd, j, THRESHOLD) ? xv[j] : (unsigned short)0;
      }
      *reinterpret_cast<uint4*>(&xs[warp][r][(q & 7) * 8]) = o8;
    }
    __syncwarp();
    #pragma unroll
    for (int k = 0; k < 4; ++k) {
      const unsigned int* top = reinterpret_cast<const unsigned int*>(&xs[warp][g][k * 16]);
      const unsigned int* low = reinterpret_cast<const unsigned int*>(&xs[warp][g + 8][k * 16]);
      unsigned int fa[4] = {top[t], low[t], top[t + 4], low[t + 4]};
      long long col = (long long)tile * 64 + k * 16 + 2 * t;
      #pragma unroll
      for (int i = 0; i < RANK / 8; ++i) {
        const __nv_bfloat16* arow = aT + (long long)(i * 8 + g) * WIDTH + col;
        unsigned int fb[2] = {*reinterpret_cast<const unsigned int*>(arow),
                              *reinterpret_cast<const unsigned int*>(arow + 8)};
        lora_tui_mma(acc[i], fa, fb);
      }
    }
    __syncwarp();
  }
  #pragma unroll
  for (int i = 0; i < RANK / 8; ++i) {
    sums[warp][g][i * 8 + 2 * t] = acc[i][0];
    sums[warp][g][i * 8 + 2 * t + 1] = acc[i][1];
    sums[warp][g + 8][i * 8 + 2 * t] = acc[i][2];
    sums[warp][g + 8][i * 8 + 2 * t + 1] = acc[i][3];
  }
  __syncthreads();
  float factor = __int_as_float(FACTOR_BITS);
  for (int i = threadIdx.x; i < 16 * RANK; i += blockDim.x) {
    int r = i / RANK, col = i % RANK;
    if (row0 + r < rows) {
      float s = 0.0f;
      for (int w = 0; w < NW; ++w) s += sums[w][r][col];
      h[(row0 + r) * RANK + col] = __float2bfloat16_rn(s * factor);
    }
  }
"""

# One thread per Philox call (eight values), as philox.py's mask kernel.
_DROPPED = r"""
  long long n = 1;
  for (int i = 0; i < x_ndim; ++i) n *= x_shape[i];
  long long t = cg::this_grid().thread_rank();
  if (t * 8 >= n) return;
  uint4 x8 = *reinterpret_cast<const uint4*>(x + t * 8);
  uint4 rnd = lora_tui_draw((unsigned long long)t, seed);
  const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(&x8);
  float factor = __int_as_float(FACTOR_BITS);
  uint4 o8;
  unsigned short* o = reinterpret_cast<unsigned short*>(&o8);
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(x2[i]);
    unsigned short lo = __bfloat16_as_ushort(__float2bfloat16_rn(f.x * factor));
    unsigned short hi = __bfloat16_as_ushort(__float2bfloat16_rn(f.y * factor));
    if (!(lo & 0x7FFFu)) lo = 0;  // a kept zero is +0.0: -0.0 means dropped
    if (!(hi & 0x7FFFu)) hi = 0;
    o[2 * i] = lora_tui_kept(rnd, 2 * i, THRESHOLD) ? lo : (unsigned short)0x8000;
    o[2 * i + 1] = lora_tui_kept(rnd, 2 * i + 1, THRESHOLD) ? hi : (unsigned short)0x8000;
  }
  *reinterpret_cast<uint4*>(out + t * 8) = o8;
"""

# mma.sync again: a warp takes 16 rows (their dh rows staged in shared memory, zeros past the last row) and
# TILES_PER_WARP tiles of 64 columns; a tile is 8 x RANK / 16 products with lora_a's rows (B from a: rank x
# width read as columns), stored to shared memory, then each lane masks and writes four 16-byte chunks of it.
_MASKED_UP = r"""
  constexpr int TILES = WIDTH / 64, GROUPS = (TILES + TILES_PER_WARP - 1) / TILES_PER_WARP;
  __shared__ __align__(16) __nv_bfloat16 gs[4][16][RANK + 8];
  __shared__ __align__(16) float out[4][16][68];
  long long n = 1;
  for (int i = 0; i < dropped_ndim; ++i) n *= dropped_shape[i];
  long long rows = n / WIDTH;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  long long unit = (long long)blockIdx.x * 4 + warp;
  long long row0 = (unit / GROUPS) * 16;
  int first = (int)(unit % GROUPS) * TILES_PER_WARP;
  if (row0 >= rows) return;  // whole warps only: no block-wide barrier below
  for (int i = lane; i < 16 * RANK; i += 32) {
    int r = i / RANK;
    gs[warp][r][i % RANK] = row0 + r < rows ? grad_h[(row0 + r) * RANK + i % RANK] : __float2bfloat16_rn(0.0f);
  }
  __syncwarp();
  unsigned int fg[RANK / 16][4];
  #pragma unroll
  for (int k = 0; k < RANK / 16; ++k) {
    const unsigned int* top = reinterpret_cast<const unsigned int*>(&gs[warp][g][k * 16]);
    const unsigned int* low = reinterpret_cast<const unsigned int*>(&gs[warp][g + 8][k * 16]);
    fg[k][0] = top[t]; fg[k][1] = low[t]; fg[k][2] = top[t + 4]; fg[k][3] = low[t + 4];
  }
  float factor = __int_as_float(FACTOR_BITS);
  int last = min(first + TILES_PER_WARP, TILES);
  for (int tile = first; tile < last; ++tile) {
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const __nv_bfloat16* arow = a + ((long long)tile * 64 + nt * 8 + g) * RANK + 2 * t;
      #pragma unroll
      for (int k = 0; k < RANK / 16; ++k) {
        unsigned int fb[2] = {*reinterpret_cast<const unsigned int*>(arow + k * 16),
                              *reinterpret_cast<const unsigned int*>(arow + k * 16 + 8)};
        lora_tui_mma(acc, fg[k], fb);
      }
      out[warp][g][nt * 8 + 2 * t] = acc[0];
      out[warp][g][nt * 8 + 2 * t + 1] = acc[1];
      out[warp][g + 8][nt * 8 + 2 * t] = acc[2];
      out[warp][g + 8][nt * 8 + 2 * t + 1] = acc[3];
    }
    __syncwarp();
    #pragma unroll
    for (int m = 0; m < 4; ++m) {
      int q = lane + 32 * m, r = q >> 3, c = (q & 7) * 8;
      if (row0 + r < rows) {
        long long at = (row0 + r) * WIDTH + tile * 64 + c;
        uint4 d8 = *reinterpret_cast<const uint4*>(dropped + at);
        const unsigned short* d = reinterpret_cast<const unsigned short*>(&d8);
        uint4 o8;
        unsigned short* o = reinterpret_cast<unsigned short*>(&o8);
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
          float v = out[warp][r][c + j] * factor;
          o[j] = d[j] == 0x8000u ? (unsigned short)0 : __bfloat16_as_ushort(__float2bfloat16_rn(v));
        }
        *reinterpret_cast<uint4*>(grad_x + at) = o8;
      }
    }
    __syncwarp();
  }
"""

_kernels: dict[str, object] = {}


def _kernel(name: str, inputs: list[str], output: str, source: str):
    if name not in _kernels:
        _kernels[name] = mx.fast.cuda_kernel(name=f"lora_tui_{name}", input_names=inputs, output_names=[output],
                                             source=source, header=_HEADER)
    return _kernels[name]


def applies(x: mx.array, a: mx.array, keep: float) -> bool:
    """Whether these kernels take an adapter: CUDA, bf16 activations, a width of a multiple of 64, a rank of a
    multiple of 16 up to MAX_RANK (the tensor cores' tiles), dropout on, masks of eight values a Philox call."""
    rank = a.shape[-1]
    return (cuda_default(USE_KERNELS) and keep < 1.0 and philox.PER_CALL == 8 and x.dtype == mx.bfloat16
            and x.shape[-1] % 64 == 0 and a.shape[0] == x.shape[-1] and rank % 16 == 0 and rank <= MAX_RANK)


def _bits(value: float) -> int:
    """A float32's bits as an int: the kernels' template parameters are integers."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _templates(keep: float, factor: float, **extra) -> list[tuple[str, int]]:
    return [("THRESHOLD", philox.keep_threshold(keep)), ("FACTOR_BITS", _bits(factor)), *extra.items()]


def down(x: mx.array, a_t: mx.array, seed: mx.array, keep: float, factor: float) -> mx.array:
    """factor * (mask * x) @ a_t.T for bf16 x (..., width) and bf16 a_t (rank, width): (..., rank), bf16."""
    rank, width = a_t.shape
    rows = x.size // width
    return _kernel("down", ["x", "aT", "seed"], "h", _DOWN)(
        inputs=[x, a_t, seed], template=_templates(keep, factor, WIDTH=width, RANK=rank, NW=WARPS),
        grid=(-(-rows // 16) * 32 * WARPS, 1, 1), threadgroup=(32 * WARPS, 1, 1),
        output_shapes=[(*x.shape[:-1], rank)], output_dtypes=[x.dtype])[0]


def dropped(x: mx.array, seed: mx.array, keep: float, factor: float) -> mx.array:
    """factor * mask * x, bf16, dropped values written as -0.0 (what masked_up reads the mask from)."""
    return _kernel("dropped", ["x", "seed"], "out", _DROPPED)(
        inputs=[x, seed], template=_templates(keep, factor), grid=(max(1, x.size // 8), 1, 1),
        threadgroup=(256, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


def masked_up(grad_h: mx.array, a: mx.array, dropped_x: mx.array, factor: float) -> mx.array:
    """factor * mask * (grad_h @ a.T), the mask read from `dropped_x` (dropped(): -0.0 where dropped)."""
    width, rank = a.shape
    rows = dropped_x.size // width
    units = -(-rows // 16) * -(-(width // 64) // TILES_PER_WARP)  # a warp each: 16 rows x TILES_PER_WARP tiles
    return _kernel("masked_up", ["grad_h", "a", "dropped"], "grad_x", _MASKED_UP)(
        inputs=[grad_h, a, dropped_x],
        template=[("FACTOR_BITS", _bits(factor)), ("WIDTH", width), ("RANK", rank),
                  ("TILES_PER_WARP", TILES_PER_WARP)],
        grid=(-(-units // 4) * 128, 1, 1), threadgroup=(128, 1, 1), output_shapes=[dropped_x.shape],
        output_dtypes=[dropped_x.dtype])[0]


def dropped_down(keep: float, scale: float):
    """f(x, a, seed) = scale * dropout(x) @ a, the mask drawn from `seed` (philox.philox_mask's draw), as one
    custom function: x (bf16) and the seed kept for the backward pass, nothing full width."""
    factor = scale / keep

    @mx.custom_function
    def f(x, a, seed):
        return down(x, a.T.astype(x.dtype), seed, keep, factor)  # a.T: the kernel reads lora_a by rank

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, a32, seed = primals
        x = mx.depends(x, cotangent)  # not drawn early and held (lean.py's note)
        a = a32.astype(x.dtype)
        xd = dropped(x, seed, keep, factor)
        width, rank = a.shape
        da = xd.reshape(-1, width).T @ cotangent.reshape(-1, rank)
        return masked_up(cotangent, a, xd, factor), da.astype(a32.dtype), mx.zeros_like(seed)

    return f


@mx.custom_function
def add_up(y, h, b):
    """y + h @ b (b cast to h's dtype), as the rank-r matmul's epilogue; y's gradient is the cotangent itself."""
    return mx.addmm(y, h, b.astype(h.dtype))


@add_up.vjp
def _add_up_vjp(primals, cotangent, output):
    y, h, b32 = primals
    b = b32.astype(h.dtype)
    g = cotangent.reshape(-1, cotangent.shape[-1])
    grad_h = (cotangent @ b.T).astype(h.dtype)
    grad_b = h.reshape(-1, h.shape[-1]).T @ g
    return cotangent, grad_h, grad_b.astype(b32.dtype)
