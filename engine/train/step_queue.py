"""Optimizer steps, queued on the device; optionally the next before this one is read (look-ahead).

A step ends in a read: its loss and gradient norm come back to the host, to be logged and to catch a
diverged step, whose update is then not applied. Read as soon as the step is queued, the GPU idles while
Python builds the next step's graph (an H100, Mistral-7B shape: ~10 ms of a 245 ms step with LoRA on q/v,
20-35 ms of 340 ms on all seven linear layers). With look-ahead the loop queues step N+1 (`mx.async_eval`)
before it reads step N, as mlx-lm's generate does with tokens, and the update is guarded on the device: it
applies only while every step so far was finite (`healthy`, sticky), so a diverged step and a step queued
after it change nothing. It only looks ahead when nothing needs the weights between the two steps: no
validation, checkpoint or stop due, no request from the UI, one rank, SFT.

On by default on CUDA, and there only with the flat update (flat_update.py), whose guard is a few element-wise ops
in its one fused kernel. With the per-array update the guard is three more kernels an array, and look-ahead was
2-5% slower than reading each step first (bench/RESULTS.md, issue 22, twelfth session); with the flat update it is
5-14% faster than both on an H100 (fifteenth session). LORA_TUI_LOOK_AHEAD=1 or 0 forces it on or off.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from engine.model.loading import cuda_default, env_switch
from engine.train.flat_update import FlatUpdate, ParameterVector, flat_parameters
from engine.train.step import accumulate_gradients, build_guarded_update, build_update, clip_gradients, step_seed

# None: on CUDA with the flat update only (the measured case); LORA_TUI_LOOK_AHEAD=1 or 0 forces it for a process.
LOOK_AHEAD: bool | None = env_switch("LORA_TUI_LOOK_AHEAD")


@dataclass
class QueuedStep:
    loss: Any  # mx.array, not read yet
    norm: Any
    healthy: Any  # mx.array(bool): this step and every one before it had a finite loss and norm
    real: int  # trained tokens (padding excluded), summed over ranks
    lr: float  # the learning rate its update uses
    sums: Any  # the preference objective's per-step sums (None for SFT)
    queued_at: float
    epoch: float = 0.0  # where in the data this step ends (epochs, fractional): set by the loop


def look_ahead_applies(one_rank: bool, objective, vector: ParameterVector | None) -> bool:
    """Queue a step ahead only with one rank (a group's collectives read values every step) and SFT (the
    preference objectives evaluate within their step); by default only where the update is flat (`vector`)."""
    wanted = cuda_default(LOOK_AHEAD) and (LOOK_AHEAD is not None or vector is not None)
    return wanted and one_rank and objective is None


def flat_vector(model, optimizer, objective) -> ParameterVector | None:
    """The vector SFT's micro step puts its gradients in for a flat update (flat_update.py, where on), or None (the
    preference objectives build their own step)."""
    return None if objective is not None else flat_parameters(model, optimizer)


class StepQueue:
    """Builds optimizer steps and queues them on the device; the loop reads each one's QueuedStep later."""

    def __init__(self, training, rates, objective, micro_step, model, optimizer, world,
                 next_batch: Callable[[], tuple], next_rows: Callable[[], list], look_ahead: bool, vector=None):
        """`rates`: each step's learning rate for the log (schedule.step_rates: no eval in the loop for it).
        `next_batch()`: the next micro-batch's losses.loss_inputs arrays and trained tokens (batch_feed.BatchFeed).
        `vector`: the flat_update.ParameterVector the micro step's gradients come in, if any; with it the
        update runs over one vector (flat_update.FlatUpdate)."""
        self.t, self.rates, self.objective, self.world = training, rates, objective, world
        self.micro_step, self.look_ahead = micro_step, look_ahead
        if vector is not None:
            self.update = FlatUpdate(model, optimizer, vector, guarded=look_ahead)
        else:
            self.update = (build_guarded_update if look_ahead else build_update)(model, optimizer)
        self.next_batch, self.next_rows = next_batch, next_rows  # the run's data order (batch_feed.BatchFeed)

    def queue(self, index: int, healthy) -> QueuedStep:
        """Step `index`: gradients, clipping and the update. With look-ahead the update is guarded by `healthy`
        (the previous step's flag, or None) and nothing waits; without, the loss and norm are read first."""
        import mlx.core as mx

        queued_at, t, world = time.perf_counter(), self.t, self.world
        # Dropout's RNG is a pure function of (seed, step): a resumed run draws the same masks without
        # saving the key (MLX's per-thread RNG state cannot be set from a saved key).
        mx.random.seed(step_seed(t.seed, index))
        sums, real = None, 0
        if self.objective is None:
            def micro_batches():
                nonlocal real
                for _ in range(t.grad_accumulation):
                    arrays, n_real = self.next_batch()  # losses.loss_inputs (batch_feed.py)
                    real += n_real
                    yield arrays
            grads, loss = accumulate_gradients(self.micro_step, micro_batches(), world)
        else:
            grads, loss, sums, real = self.objective.step([self.next_rows() for _ in range(t.grad_accumulation)],
                                                          world)
        real = int(world.sum_number(real))
        grads, norm = clip_gradients(grads, t.max_grad_norm)
        if self.look_ahead:  # nothing waits: the device applies the update only to a healthy run
            finite = mx.isfinite(loss) & mx.isfinite(norm)
            healthy = finite if healthy is None else healthy & finite
            self.update(grads, healthy, loss, norm)
        else:  # read first: a diverged step's update is never applied (the loop then stops)
            mx.eval(loss, norm)
            finite = math.isfinite(loss.item()) and math.isfinite(norm.item())
            healthy = mx.array(finite)
            if finite:
                self.update(grads)
        lr = float(self.rates[index])  # the loop queues only steps below total_steps, the table's length
        return QueuedStep(loss, norm, healthy, real, lr, sums, queued_at)
