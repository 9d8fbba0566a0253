"""Times the host's share of each step inside `lora-tui train` (bench_gpu_e2e.py with BENCH_TIMES set), to find
where the end-to-end run loses to the bench step. Wraps StepQueue.queue (the whole graph build and async_eval of a
step) and the batch it collates, and writes one line a step to $BENCH_TIMES: wall and thread CPU time of each, and
the garbage collector's time since the line before (BENCH_GC_FREEZE=1: gc.freeze() once the first step is queued).
A queue whose wall time is far above its CPU time waited for the device: the look-ahead overlap is lost there."""

from __future__ import annotations

import gc
import os
import time


def install() -> None:
    from engine.train import step_queue
    out = open(os.environ["BENCH_TIMES"], "a")
    queue, init = step_queue.StepQueue.queue, step_queue.StepQueue.__init__
    batch_times, gc_time, gc_started = [], [0.0], [0.0]

    def on_gc(phase, info):  # the collector's time since the last line (the app's heap is larger than the bench's)
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - gc_started[0]
    gc.callbacks.append(on_gc)

    def timed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        next_batch = self.next_batch

        def timed_batch():
            t0 = time.perf_counter()
            batch = next_batch()
            batch_times.append(time.perf_counter() - t0)
            return batch
        self.next_batch = timed_batch

    def timed_queue(self, index, healthy):
        if os.environ.get("BENCH_GC_FREEZE") and index == 1:  # the heap so far is never scanned again
            gc.freeze()
        t0, c0 = time.perf_counter(), time.thread_time()
        batch_times.clear()
        queued = queue(self, index, healthy)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        print(f"step {index}: queue {1e3 * wall:.1f} ms (cpu {1e3 * cpu:.1f}), batch {1e3 * sum(batch_times):.1f} ms, "
              f"gc {1e3 * gc_time[0]:.1f} ms, ahead {healthy is not None}, at {time.perf_counter():.4f}", file=out,
              flush=True)
        gc_time[0] = 0.0
        return queued

    step_queue.StepQueue.__init__, step_queue.StepQueue.queue = timed_init, timed_queue
