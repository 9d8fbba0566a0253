"""Dropout masks on CUDA from Philox-4x32-10, the counter-based generator cuRAND and PyTorch's dropout use.

MLX draws a dropout mask as a float32 uniform per value (threefry), then compares it with the keep
probability: at Mistral-7B shapes, 64 masks a step of 16.8M values each. On CUDA one kernel can hash
(seed, index) straight into the boolean mask instead, eight values per Philox call. The seed comes from MLX's
random state, so `mx.random.seed` still makes a run repeatable and a compiled step still threads the state. Since
a mask is a function of its seed, a LoRA adapter outside gradient-checkpointed blocks keeps the seed (two int32)
and draws the mask again in the backward pass instead of keeping it (lean.SEEDED_DROPOUT). Elsewhere (CPU, Metal)
the mask is MLX's `bernoulli`: exactly mlx-lm's stream. Measured: bench/RESULTS.md.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import mlx.core as mx

from engine.model.loading import on_cuda

_HEADER = r"""
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
  #pragma unroll
  for (int i = 0; i < 10; ++i) {
    unsigned int hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    unsigned int hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += 0x9E3779B9u;
    k.y += 0xBB67AE85u;
  }
  return c;
}
__device__ __forceinline__ uint4 lora_tui_draw(unsigned long long t, const int* seed) {
  // the Philox call for counter t: four 32-bit words
  return philox4x32_10(make_uint4((unsigned int)t, (unsigned int)(t >> 32), 0u, 0u),
                       make_uint2((unsigned int)seed[0], (unsigned int)seed[1]));
}
__device__ __forceinline__ bool lora_tui_kept(uint4 r, int j, unsigned int threshold) {
  // eight values a call: value j is the (j & 1) 16-bit half of word j / 2, kept below the threshold
  unsigned int w = j < 2 ? r.x : j < 4 ? r.y : j < 6 ? r.z : r.w;
  return ((w >> (16 * (j & 1))) & 0xFFFFu) < threshold;
}
"""

# One thread per Philox call. PER_CALL = 8 takes two 16-bit draws from each of its four 32-bit words, so the
# keep probability becomes a multiple of 1/65,536 (p is off by at most 7.6e-6: 0.05 -> 0.050003). PER_CALL = 4
# takes one 24-bit draw per word: the form before, kept for bench/probe_gpu.py's comparison. Halving the Philox
# calls matters because the kernel is bound by Philox's integer multiplies, not by its one-byte stores. `like`
# is an input only for its shape, and so that a mask is made when the array it masks exists (not all at the
# start of the step, where the scheduler would hold every mask; in the backward pass, lean.py passes an x tied
# to the incoming gradient for the same reason).
_SOURCE = r"""
  long long n = 1;
  for (int i = 0; i < like_ndim; ++i) n *= like_shape[i];
  long long t = cg::this_grid().thread_rank();
  if (t * PER_CALL >= n) return;
  uint4 r = lora_tui_draw((unsigned long long)t, seed);
  unsigned int v[4] = {r.x, r.y, r.z, r.w};
  unsigned int packed[PER_CALL / 4] = {0u};
  #pragma unroll
  for (int j = 0; j < PER_CALL; ++j) {
    unsigned int keep = PER_CALL == 4 ? (v[j & 3] >> 8) < (unsigned int)THRESHOLD
                                      : lora_tui_kept(r, j, (unsigned int)THRESHOLD);
    if (t * PER_CALL + PER_CALL - 1 < n) {
      packed[j / 4] |= keep << (8 * (j % 4));
    } else if (t * PER_CALL + j < n) {
      mask[t * PER_CALL + j] = keep;
    }
  }
  if (t * PER_CALL + PER_CALL - 1 < n) {  // all PER_CALL bools in 32-bit stores (the buffer is allocator-aligned)
    #pragma unroll
    for (int i = 0; i < PER_CALL / 4; ++i) reinterpret_cast<unsigned int*>(mask)[t * (PER_CALL / 4) + i] = packed[i];
  }
"""

_kernel = None
PHILOX_ON_CUDA = True  # False: MLX's bernoulli on CUDA too (bench/probe_gpu.py's comparison)
PER_CALL = 8  # mask values per Philox call: 8 (16-bit draws) or 4 (24-bit draws, the form measured before)


def keep_threshold(keep: float, per_call: int | None = None) -> int:
    """A value is kept when its draw (16 bits with 8 values a call, 24 bits with 4) falls below this."""
    bits = 16 if (per_call or PER_CALL) == 8 else 24
    return min(1 << bits, max(0, round(keep * (1 << bits))))


def philox_mask(seed: mx.array, like: mx.array, keep: float) -> mx.array:
    """Boolean mask shaped like `like`, True with probability `keep`; `seed` holds two int32 (CUDA only)."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="lora_tui_philox_mask", input_names=["seed", "like"],
                                      output_names=["mask"], source=_SOURCE, header=_HEADER,
                                      ensure_row_contiguous=False)  # `like` is never read: a broadcast is not copied
    like = mx.stop_gradient(like)  # a custom kernel has no VJP, and the mask needs none
    return _kernel(inputs=[seed.astype(mx.int32), like],
                   template=[("THRESHOLD", keep_threshold(keep)), ("PER_CALL", PER_CALL)],
                   grid=(max(1, -(-like.size // PER_CALL)), 1, 1), threadgroup=(256, 1, 1),
                   output_shapes=[like.shape], output_dtypes=[mx.bool_])[0]


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


def in_keyed_block() -> bool:
    """Whether a dropout_keys() is active: inside a gradient-checkpointed block (engine/train/step.py)."""
    return getattr(_keys, "key", None) is not None


def next_mask_key() -> mx.array | None:
    """The key the next mask is drawn from (split off the block's), or None outside dropout_keys(). Public for a
    caller that draws the same mask more than once (checkpointed_lora_mlp.py)."""
    key = getattr(_keys, "key", None)
    if key is None:
        return None
    key, _keys.key = mx.random.split(key)
    return key


def philox_masks() -> bool:
    """Whether dropout masks come from the Philox kernel here (CUDA), rather than MLX's bernoulli."""
    return PHILOX_ON_CUDA and on_cuda()


def dropout_mask(keep: float, like: mx.array) -> mx.array:
    """nn.Dropout's mask for `like` (True = keep): Philox on CUDA, MLX's bernoulli elsewhere."""
    return keyed_mask(next_mask_key(), keep, like)


def keyed_mask(key: mx.array | None, keep: float, like: mx.array) -> mx.array:
    """The mask for `like` from `key` (None: MLX's random state); `like` is read only for its shape."""
    if philox_masks():
        return philox_mask(_seed(key), like, keep)
    return mx.random.bernoulli(keep, like.shape, key=key)


def dropout_seed() -> mx.array | None:
    """The seed of the next mask (philox_mask draws it from that) where masks are Philox (CUDA) and no
    dropout_keys() is active; else None, and nothing is drawn. Under dropout_keys (a checkpointed block) the
    None is needed for correct gradients, not only for speed: a seed drawn here would come from MLX's global
    state, and the block's recompute would draw another one, so another mask."""
    if not philox_masks() or in_keyed_block():
        return None
    return _seed(None)  # from MLX's random state, as an unkeyed mask is


def _seed(key: mx.array | None) -> mx.array:
    return mx.random.randint(0, 2 ** 31 - 1, (2,), key=key)
