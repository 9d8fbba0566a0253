"""The run's micro-batches in order, as the MLX arrays a step takes; where the step queue looks ahead (CUDA),
uploaded a chunk of batches at a time.

The order is the TrainerState's: the epoch and the position in its batches (batches.epoch_batches), advanced
one micro-batch as it is taken, so a checkpoint saved between steps resumes at the first batch not trained.

Why chunks: an MLX array made from host data lives in CUDA managed memory. Freed, it waits in MLX's buffer
cache, and when the cache is trimmed (a cache miss above the memory limit, which a run near its limit meets in
every step) cudaFree synchronizes the whole device, so the GPU drains while the host is still queuing the next
step (step_queue.py). A step took four such arrays (tokens, targets, trained positions, weights); the bench step
makes its batch once. In one process on an H100 (Mistral-7B shape, LoRA on all seven layers, two rounds:
bench/gpu/session17) the step queue ran 355-360 ms a step with its arrays made each step, 343-352 ms with each
step's arrays views into one array uploaded before. Here the next CHUNK_BATCHES micro-batches of the epoch are
collated together, packed into one int32 array and uploaded: one host-made array a chunk, not four a step.
LORA_TUI_BATCH_CHUNKS=1 or 0 forces it on or off (any device).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from engine.model.loading import cuda_default, env_switch
from engine.train.batches import collate, epoch_batches
from engine.train.losses import loss_inputs, trained_positions

CHUNK_BATCHES = 32  # micro-batches per upload: one host-made array (and at most one cudaFree) per 32 steps
CHUNK_BYTES = 64 << 20  # and no more than this per upload (long rows, large batches)
# None: where the step queue looks ahead (CUDA with the flat update); 1 or 0 forces it for a process.
CHUNKED: bool | None = env_switch("LORA_TUI_BATCH_CHUNKS")


def chunks_apply(look_ahead: bool) -> bool:
    """By default only where the loop looks ahead, the only case measured (and one rank: look_ahead_applies)."""
    return cuda_default(CHUNKED) and (CHUNKED is not None or look_ahead)


class BatchFeed:
    """next_rows(): this rank's rows of the next micro-batch; next_batch(): its loss_inputs() arrays and its
    trained-token count. Both advance the run's position in its data."""

    def __init__(self, setup, state, world, seed: int, shuffle: bool, max_len: int, chunked: bool = False):
        self.setup, self.state, self.world = setup, state, world
        self.seed, self.shuffle, self.max_len, self.chunked = seed, shuffle, max_len, chunked
        # Uploaded micro-batches not taken yet: ((epoch, position), arrays, tokens), in order. At a chunk's end the
        # next is uploaded while the last one's views may still be queued: up to two chunks (2 x CHUNK_BYTES, a
        # few MB at common shapes) beside the step, which the memory estimate leaves out.
        self.uploaded: list = []

    def next_rows(self) -> list[int]:
        self._next_epoch_if_done()
        self.state.pos += 1
        return self.world.share(self.state.order[self.state.pos - 1])

    def next_batch(self) -> tuple[tuple, int]:
        if not self.chunked:
            batch = self.next_rows()
            return self._arrays(batch, self.state.order[self.state.pos - 1])
        self._next_epoch_if_done()
        here = (self.state.epoch, self.state.pos)
        while self.uploaded and self.uploaded[0][0] < here:  # passed by next_rows (a preference objective's)
            self.uploaded.pop(0)
        if not self.uploaded or self.uploaded[0][0] != here:
            self.uploaded = self._upload(here)
        _, arrays, tokens = self.uploaded.pop(0)
        self.state.pos += 1
        return arrays, tokens

    def _next_epoch_if_done(self) -> None:
        state = self.state
        if state.pos >= len(state.order):  # a new epoch's order
            state.epoch += 1
            state.pos = 0
            state.order = epoch_batches(self.setup.lengths, self.setup.global_batch, self.seed, state.epoch,
                                        self.shuffle)

    def _collated(self, rows: list[int], batch: list[int]):
        """This rank's `rows` of the global `batch`, collated."""
        setup = self.setup
        if not rows:  # a short last batch with fewer rows than ranks: this rank adds nothing
            inputs, targets, mask, _ = collate([setup.data.train[batch[0]]], setup.pad_id, self.max_len)
            return inputs, targets, mask & False, 0
        return collate([setup.data.train[i] for i in rows], setup.pad_id, self.max_len)

    def _arrays(self, rows: list[int], batch: list[int]) -> tuple[tuple, int]:
        inputs, targets, mask, tokens = self._collated(rows, batch)
        return loss_inputs(inputs, targets, mask), tokens

    def _upload(self, here: tuple[int, int]) -> list:
        """The micro-batches from `here` to the chunk's (or the epoch's) end, as views into one uploaded array."""
        epoch, start = here
        packed, entries = self._pack(start)
        chunk = mx.array(np.concatenate(packed))  # the one host-made array
        out, at = [], 0
        for pos, shapes, tokens in entries:
            views = []
            for shape in shapes:
                n = int(np.prod(shape))
                views.append(chunk[at:at + n].reshape(shape))  # a slice and a reshape: views, no copies
                at += n
            views[3] = views[3].view(mx.float32)  # the weights, packed as their bits
            out.append(((epoch, pos), tuple(views), tokens))
        return out

    def _pack(self, start: int) -> tuple[list, list]:
        """Host side: each micro-batch's tokens, targets, trained positions and weights (as int32 bits), flat."""
        order, packed, entries, size = self.state.order, [], [], 0
        for pos in range(start, min(start + CHUNK_BATCHES, len(order))):
            inputs, targets, mask, tokens = self._collated(self.world.share(order[pos]), order[pos])
            positions, weights = trained_positions(mask)
            arrays = [inputs, targets, positions, weights.view(np.int32)]  # collate's tokens are int32
            step_bytes = 4 * sum(a.size for a in arrays)
            if entries and size + step_bytes > CHUNK_BYTES:  # collated twice, at a cap's edge only
                break
            packed += [a.reshape(-1) for a in arrays]
            entries.append((pos, [a.shape for a in arrays], tokens))
            size += step_bytes
        return packed, entries
