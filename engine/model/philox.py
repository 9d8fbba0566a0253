"""Dropout masks on CUDA from Philox-4x32-10, the counter-based generator cuRAND and PyTorch's dropout use.

MLX draws a dropout mask as a float32 uniform per value (threefry), then compares it with the keep
probability: at Mistral-7B shapes, 64 masks a step of 16.8M values each. On CUDA one kernel can hash
(seed, index) straight into the boolean mask instead, four values per Philox call. The seed comes from
MLX's random state, so `mx.random.seed` still makes a run repeatable and a compiled step still threads the
state. Elsewhere (CPU, Metal) the mask is MLX's `bernoulli`: exactly mlx-lm's stream. Measured:
bench/RESULTS.md.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import mlx.core as mx

from engine.model.loading import on_cuda

_HEADER = r"""
template <int R>  // rounds: 10 is Philox-4x32-10 (R = PHILOX_ROUNDS; fewer only for bench/probe_gpu.py)
__device__ __forceinline__ uint4 philox4x32(uint4 c, uint2 k) {
  #pragma unroll
  for (int i = 0; i < R; ++i) {
    unsigned int hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    unsigned int hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += 0x9E3779B9u;
    k.y += 0xBB67AE85u;
  }
  return c;
}
"""

# One thread per four values. `like` is an input only for its shape, and so that a mask is made when the
# array it masks exists (not all at the start of the step, where the scheduler would hold every mask).
_SOURCE = r"""
  long long n = 1;
  for (int i = 0; i < like_ndim; ++i) n *= like_shape[i];
  long long t = cg::this_grid().thread_rank();
  if (t * 4 >= n) return;
  uint4 r = philox4x32<ROUNDS>(make_uint4((unsigned int)t, (unsigned int)(t >> 32), 0u, 0u),
                          make_uint2((unsigned int)seed[0], (unsigned int)seed[1]));
  unsigned int v[4] = {r.x, r.y, r.z, r.w};
  if (t * 4 + 3 < n) {  // four bools in one 32-bit store (the buffer is allocator-aligned)
    unsigned int packed = 0;
    #pragma unroll
    for (int j = 0; j < 4; ++j) packed |= (unsigned int)((int)(v[j] >> 8) < THRESHOLD) << (8 * j);
    reinterpret_cast<unsigned int*>(mask)[t] = packed;
  } else {
    for (int j = 0; t * 4 + j < n; ++j) mask[t * 4 + j] = (int)(v[j] >> 8) < THRESHOLD;
  }
"""

# The same draw applied in place of kept: x * mask / keep written straight from (seed, index), so no mask is
# ever stored. The backward pass calls it again with the same seed on an array of x's shape: the same mask.
_APPLY_SOURCE = r"""
  long long n = 1;
  for (int i = 0; i < x_ndim; ++i) n *= x_shape[i];
  long long t = cg::this_grid().thread_rank();
  if (t * 4 >= n) return;
  uint4 r = philox4x32<ROUNDS>(make_uint4((unsigned int)t, (unsigned int)(t >> 32), 0u, 0u),
                          make_uint2((unsigned int)seed[0], (unsigned int)seed[1]));
  unsigned int v[4] = {r.x, r.y, r.z, r.w};
  float s = static_cast<float>(scale[0]);
  struct alignas(4 * sizeof(T)) Four { T v[4]; };  // one load and one store of four values
  if (t * 4 + 3 < n) {
    Four in = reinterpret_cast<const Four*>(x)[t], o;
    #pragma unroll
    for (int j = 0; j < 4; ++j)
      o.v[j] = static_cast<T>((int)(v[j] >> 8) < THRESHOLD ? static_cast<float>(in.v[j]) * s : 0.0f);
    reinterpret_cast<Four*>(out)[t] = o;
  } else {
    for (int j = 0; t * 4 + j < n; ++j)
      out[t * 4 + j] = static_cast<T>((int)(v[j] >> 8) < THRESHOLD ? static_cast<float>(x[t * 4 + j]) * s : 0.0f);
  }
"""

_kernel = None
_apply_kernel = None
PHILOX_ON_CUDA = True  # False: MLX's bernoulli on CUDA too (bench/probe_gpu.py's comparison)
PHILOX_ROUNDS = 10  # fewer only in bench/probe_gpu.py, to see what the generator's arithmetic costs


def keep_threshold(keep: float) -> int:
    """The 24-bit threshold: a value is kept when the top 24 bits of its random word fall below it."""
    return min(1 << 24, max(0, round(keep * (1 << 24))))


def philox_mask(seed: mx.array, like: mx.array, keep: float) -> mx.array:
    """Boolean mask shaped like `like`, True with probability `keep`; `seed` holds two int32 (CUDA only)."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="lora_tui_philox_mask", input_names=["seed", "like"],
                                      output_names=["mask"], source=_SOURCE, header=_HEADER)
    like = mx.stop_gradient(like)  # a custom kernel has no VJP, and the mask needs none
    return _kernel(inputs=[seed.astype(mx.int32), like], template=[("THRESHOLD", keep_threshold(keep)), ("ROUNDS", PHILOX_ROUNDS)],
                   grid=(max(1, -(-like.size // 4)), 1, 1), threadgroup=(256, 1, 1),
                   output_shapes=[like.shape], output_dtypes=[mx.bool_])[0]


def philox_dropout(x: mx.array, seed: mx.array, keep: float) -> mx.array:
    """x * philox_mask(seed, x, keep) / keep in one pass, in x's dtype, the mask never stored (CUDA only). The
    1/keep is rounded to x's dtype first, as `(mask * x) * (1 / keep)` does: the two agree bit for bit."""
    global _apply_kernel
    if _apply_kernel is None:
        _apply_kernel = mx.fast.cuda_kernel(name="lora_tui_philox_dropout", input_names=["seed", "scale", "x"],
                                            output_names=["out"], source=_APPLY_SOURCE, header=_HEADER)
    scale = mx.array([1 / keep], dtype=x.dtype)
    return _apply_kernel(inputs=[seed.astype(mx.int32), scale, mx.stop_gradient(x)],
                         template=[("T", x.dtype), ("THRESHOLD", keep_threshold(keep)), ("ROUNDS", PHILOX_ROUNDS)],
                         grid=(max(1, -(-x.size // 4)), 1, 1), threadgroup=(256, 1, 1),
                         output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


_keys = threading.local()  # the key the next mask splits its own from, inside dropout_keys()


@contextmanager
def dropout_keys(key: mx.array):
    """Inside, each mask comes from `key` (split once per mask, in draw order), not from MLX's global
    random state. Gradient checkpointing recomputes a block in the backward pass: drawn this way, the
    recompute gets the very masks the forward pass used."""
    outer = getattr(_keys, "key", None)
    _keys.key = key
    try:
        yield
    finally:
        _keys.key = outer


def _next_key() -> mx.array | None:
    key = getattr(_keys, "key", None)
    if key is None:
        return None
    key, _keys.key = mx.random.split(key)
    return key


def dropout_mask(keep: float, like: mx.array) -> mx.array:
    """nn.Dropout's mask for `like` (True = keep): Philox on CUDA, MLX's bernoulli elsewhere."""
    key = _next_key()
    if PHILOX_ON_CUDA and on_cuda():
        return philox_mask(_seed(key), like, keep)
    return mx.random.bernoulli(keep, like.shape, key=key)


def dropout_seed() -> mx.array | None:
    """The seed of the next mask, for philox_dropout, where masks are Philox (CUDA); else None, draw nothing."""
    return _seed(_next_key()) if PHILOX_ON_CUDA and on_cuda() else None


def _seed(key: mx.array | None) -> mx.array:
    return mx.random.randint(0, 2 ** 31 - 1, (2,), key=key)
