"""Queue the next optimizer step before reading this one, so the GPU never waits for Python.

A step ends in a read: its loss and gradient norm come back to the host, to be logged and to catch a
diverged step. Read as soon as the step is queued, the GPU then idles while Python builds the next step's
graph (an H100, Mistral-7B shape: ~10 ms of a 245 ms step with LoRA on q/v, 20-35 ms of 340 ms on all
seven linear layers). So on CUDA the loop queues step N+1 (`mx.async_eval`) before it reads step N, as
mlx-lm's generate does with tokens. The update is guarded on the device for that: it applies only while
every step so far was finite (`healthy`, sticky), so a diverged step and a step queued after it change
nothing, and the loop stops with the last good weights. Looking ahead only happens when nothing needs the
weights between the two steps: no validation, checkpoint or stop due, no request from the UI, one rank,
SFT. bench/RESULTS.md (issue 22, twelfth session) has the measurements.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from engine.model.loading import cuda_default
from engine.train.step import accumulate_gradients, clip_gradients, step_seed

# None: on CUDA only (measured there); True/False force it. LORA_TUI_LOOK_AHEAD=0/1 sets it for a process.
LOOK_AHEAD: bool | None = {"0": False, "1": True}.get(os.environ.get("LORA_TUI_LOOK_AHEAD", "").strip())


@dataclass
class QueuedStep:
    index: int  # the optimizer step this is: state.step before it is applied
    loss: Any  # mx.array, not read yet
    norm: Any
    healthy: Any  # mx.array(bool): this step and every one before it had a finite loss and norm
    real: int  # trained tokens (padding excluded), summed over ranks
    lr: float  # the learning rate its update uses
    sums: Any  # the preference objective's per-step sums (None for SFT)
    queued_at: float
    epoch: float = 0.0  # where in the data this step ends (epochs, fractional): set by the loop


def look_ahead_applies(one_rank: bool, objective) -> bool:
    """Queue a step ahead only with one rank (a group's collectives read values every step) and SFT (the
    preference objectives evaluate within their step)."""
    return cuda_default(LOOK_AHEAD) and one_rank and objective is None


class StepQueue:
    """Builds optimizer steps and queues them on the device; the loop reads each one's QueuedStep later."""

    def __init__(self, training, schedule, objective, micro_step, update, world,
                 next_batch: Callable[[], tuple], next_rows: Callable[[], list]):
        self.t, self.schedule, self.objective, self.world = training, schedule, objective, world
        self.micro_step, self.update = micro_step, update
        self.next_batch, self.next_rows = next_batch, next_rows  # the run's data order (TrainingRun)

    def queue(self, index: int, healthy) -> QueuedStep:
        """Step `index`: gradients, clipping and the update guarded by `healthy` (the previous step's, or
        None), queued on the device and not waited for."""
        import mlx.core as mx

        from engine.train.losses import loss_inputs
        queued_at, t, world = time.perf_counter(), self.t, self.world
        with mx.stream(mx.cpu):  # on the GPU's stream this scalar would wait for the step in flight
            lr = float(self.schedule(mx.array(index)))
        # Dropout's RNG is a pure function of (seed, step): a resumed run draws the same masks without
        # saving the key (MLX's per-thread RNG state cannot be set from a saved key).
        mx.random.seed(step_seed(t.seed, index))
        sums, real = None, 0
        if self.objective is None:
            def micro_batches():
                nonlocal real
                for _ in range(t.grad_accumulation):
                    inputs, targets, mask, n_real = self.next_batch()
                    real += n_real
                    yield loss_inputs(inputs, targets, mask)
            grads, loss = accumulate_gradients(self.micro_step, micro_batches(), world)
        else:
            grads, loss, sums, real = self.objective.step([self.next_rows() for _ in range(t.grad_accumulation)],
                                                          world)
        real = int(world.sum_number(real))
        grads, norm = clip_gradients(grads, t.max_grad_norm)
        finite = mx.isfinite(loss) & mx.isfinite(norm)
        healthy = finite if healthy is None else healthy & finite
        self.update(grads, healthy, loss, norm)
        return QueuedStep(index, loss, norm, healthy, real, lr, sums, queued_at)
