"""The training run: LoRA fine-tuning you can watch, pause, stop and resume exactly.

Read top to bottom: `TrainingRun.run()` picks and claims the run folder, `prepare()` returns what the run
trains (model, adapters, data, optimizer: a `Prepared`) and where it starts (a `TrainerState`, maybe a
checkpoint's), then `_train()` runs optimizer steps, each queued on the device, then read (or the next
queued first: step_queue.py), reporting through typed events, and `_finish()` saves the adapter
and the report. All MLX work happens on the thread that calls `run()` (MLX streams are per thread).
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from engine import protocol as ev
from engine.config.schema import Config
from engine.model.memory import memory_stats
from engine.train import run_folder
from engine.train.batch_feed import BatchFeed, chunks_apply
from engine.train.checkpoints import CheckpointError
from engine.train.control import RunControl
from engine.train.distributed import DistributedError, World
from engine.train.errors import StoppedEarly, TrainingError
from engine.train.prepare import Prepared, check_stop, claim_run_folder, pick_run_dir, prepare
from engine.train.report import write_report
from engine.train.run_log import RunLog
from engine.train.saving import save_checkpoint, write_final_adapter, write_run_config
from engine.train.step import build_micro_step, checkpointed_layers
from engine.train.step_queue import QueuedStep, StepQueue, flat_vector, look_ahead_applies
from engine.train.trainer_state import TrainerState


@dataclass
class RunResult:
    status: str  # "finished", "stopped" or "failed"
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, this process
    report: dict = field(default_factory=dict)
    message: str = ""
    error_kind: str = ""  # for failures: "config", "data", "model", "checkpoint", "training", "disk"


class TrainingRun:
    """One run: `run()` below, the loop in `_train()`, its end in `_finish()`."""

    def __init__(self, cfg: Config, listeners: Sequence[ev.Listener] = (), control: RunControl | None = None,
                 resume: str | None = None, stop_after: int | None = None, overwrite: bool = False):
        self.cfg = cfg
        self.listeners = list(listeners)
        self.control = control or RunControl()
        self.resume_from = resume
        # The CLI's hidden --stop-after (tests, benchmarks): once a step reaches it, the run ends as a stop
        # does (a "stop" checkpoint, status "stopped"). Checked after each step: one step at least is trained.
        self.stop_after = stop_after
        self.overwrite = overwrite  # a fresh start may replace an earlier run in the same folder
        self.world = World(0, 1)  # set by run(): mlx.launch may have made this process one rank of several
        self.run_dir: Path | None = None  # known once run() has picked it
        self.lock: run_folder.RunLock | None = None  # held by rank 0 while it writes the run folder
        self.setup: Prepared | None = None  # what the run trains, once prepared
        self.state = TrainerState()  # the run's progress: the loop updates it, checkpoints save it

    # ------------------------------------------------------------ events

    def emit(self, event: ev.Event) -> None:
        if not self.world.is_main and not isinstance(event, (ev.Failed, ev.Warning)):
            return  # rank 0 reports for the whole group
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must never kill a training run
                pass

    def warn(self, message: str) -> None:
        self.emit(ev.Warning(message))

    # ------------------------------------------------------------ entry point

    def run(self) -> RunResult:
        """Prepare and train. Expected failures end in a Failed event and status 'failed', not an exception."""
        import mlx.core as mx
        # A GPU run caps MLX's memory near its step's need (prepare); chat, export and the next run share the
        # app's process and get MLX's limit back
        limit_before, log = mx.get_memory_limit(), None
        try:
            self.world = World.current(self.cfg.training.distributed_backend)
            self.world.on_lost = self._group_lost
            self.run_dir = pick_run_dir(self.cfg, self.resume_from, self.overwrite, self.world)
            self.lock = run_folder.RunLock(self.run_dir)
            claim_run_folder(self.lock, not self.resume_from, self.overwrite, self.world, self.warn)
            if self.world.is_main:  # only rank 0 writes the run folder
                log = RunLog(self.run_dir)  # first, so that even preparation warnings reach metrics.jsonl
                self.listeners.append(log)
            self.setup, self.state = prepare(self.cfg, self.world, self.run_dir, self.resume_from, self.emit,
                                             self.control)
            check_stop(self.control)
            self.emit(ev.Phase("ready", 1.0))
            with checkpointed_layers(self.setup.model, self.cfg.training.grad_checkpoint):
                return self._train()
        except StoppedEarly:
            return self._stopped_before_training()
        except TrainingError as exc:
            return self._fail(str(exc), exc.kind)
        except CheckpointError as exc:
            return self._fail(str(exc), "checkpoint")
        except DistributedError as exc:
            return self._fail(self._group_message(str(exc)), "distributed")
        except OSError as exc:  # e.g. a full disk or a read-only folder while writing logs or the adapter
            where = f"{exc.filename}: " if exc.filename else ""
            return self._fail(f"{where}{exc.strerror or exc}", "disk")
        except MemoryError:
            return self._fail("out of memory: lower training.batch_size or model.max_seq_length, or turn on "
                              "training.grad_checkpoint", "memory")
        except Exception as exc:  # a bug: one line for the user, the traceback kept in the run folder
            return self._fail(f"unexpected error: {type(exc).__name__}: {exc}{self._keep_traceback()}", "internal")
        finally:
            if log is not None:
                log.close()
            if self.lock is not None:
                self.lock.release()
            mx.set_memory_limit(limit_before)

    def _group_lost(self, message: str) -> None:
        """Called by the distributed watchdog (another thread) just before the process exits."""
        self.emit(ev.Failed(self.state.step, self._group_message(message), self.state.last_checkpoint))

    def _group_message(self, why: str) -> str:
        return (f"distributed run stopped: {why}; last checkpoint: {self.state.last_checkpoint or 'none yet'}; "
                f"resume with: lora-tui train --resume {self.run_dir or '<run folder>'}")

    def _keep_traceback(self) -> str:
        if self.run_dir is None or not self.run_dir.is_dir():
            return ""
        try:
            with open(self.run_dir / "crash.log", "a", encoding="utf-8") as fh:
                fh.write(traceback.format_exc() + "\n")
            return f" (traceback in {self.run_dir / 'crash.log'})"
        except OSError:
            return ""

    def _stopped_before_training(self) -> RunResult:
        """A stop during preparation: no checkpoint of an untrained step (it would look like a run to resume)."""
        message = ("stopped before training began: nothing was trained or saved" if not self.resume_from else
                   "stopped before training resumed: the run folder is as it was")
        self.emit(ev.Finished(self.state.step, True, None, None, "", ""))
        return RunResult("stopped", self.run_dir or Path(self.cfg.output.dir), self.state.step, self.state.losses,
                         message=message)

    def _fail(self, message: str, kind: str) -> RunResult:
        self.emit(ev.Failed(self.state.step, message, self.state.last_checkpoint))
        return RunResult("failed", self.run_dir or Path(self.cfg.output.dir), self.state.step, self.state.losses,
                         message=message, error_kind=kind)

    # ------------------------------------------------------------ the loop

    def _train(self) -> RunResult:
        cfg, setup, state = self.cfg, self.setup, self.state
        if self.world.is_main:
            write_run_config(setup.run_dir, cfg, setup.config_kept_as)
        self.emit(self._started())
        objective = setup.objective  # None for SFT; KTO, DPO and ORPO have their own step
        vector = flat_vector(setup.model, setup.optimizer, objective)  # the gradients as one vector
        look_ahead = look_ahead_applies(self.world.alone, objective, vector)
        micro_step = build_micro_step(setup.model, setup.optimizer, vector) if objective is None else \
            objective.build(setup.optimizer)
        feed = BatchFeed(setup, state, self.world, cfg.training.seed, cfg.data.shuffle, cfg.model.max_seq_length,
                         chunked=chunks_apply(look_ahead))  # the preference objectives take only next_rows
        steps = StepQueue(cfg.training, setup.rates, objective, micro_step, setup.model, setup.optimizer,
                          self.world, feed.next_batch, feed.next_rows, look_ahead, vector)
        start = time.perf_counter()
        window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
        rate = None
        status, last_loss = "finished", None

        queued = None  # a step on the device whose loss is not read yet (engine/train/step_queue.py)
        while state.step < setup.total_steps:
            if queued is None:
                if self.control.paused:
                    self.emit(ev.Paused(state.step))
                    while self.control.wait_until_resumed():  # a save asked for while paused: now, not after
                        self._save_while_paused(time.perf_counter() - start)
                    self.emit(ev.Resumed(state.step))
                    window_t = time.perf_counter()
                if self.world.any(self.control.stop_requested):  # every rank stops at the same step
                    status = "stopped"
                    break
                queued = self._progress(steps.queue(state.step, None))
            # With look-ahead (step_queue.py) the next step is queued before this one is read.
            ahead = self._progress(steps.queue(state.step + 1, queued.healthy)) \
                if look_ahead and self._nothing_due(state.step + 1) else None
            loss_value, norm_value = queued.loss.item(), queued.norm.item()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                return self._diverged(loss_value, norm_value)  # its update was not applied (step_queue.py)
            preference = objective.stats(loss_value, queued.sums)[1] if objective is not None else None
            lr, real, epoch = queued.lr, queued.real, queued.epoch
            self.world.step_took(time.perf_counter() - queued.queued_at)
            queued = ahead
            state.step += 1
            state.tokens_seen += real
            state.session_tokens += real
            state.losses.append(loss_value)
            last_loss = loss_value
            window_tokens += real
            window_steps += 1

            if state.step % cfg.output.log_every_steps == 0 or state.step == setup.total_steps:
                now = time.perf_counter()
                dt = max(now - window_t, 1e-9)
                sps = window_steps / dt
                rate = sps if rate is None else 0.7 * rate + 0.3 * sps
                self.emit(ev.Step(state.step, setup.total_steps, epoch, loss_value, lr, norm_value,
                                  window_tokens / dt, sps, (setup.total_steps - state.step) / max(rate, 1e-9),
                                  state.tokens_seen, memory_stats(), preference))
                window_t, window_tokens, window_steps = now, 0, 0

            evaluated, interval, stop_here = self._scheduled(state.step)
            val = self._evaluate() if evaluated and setup.data.valid else None
            improved = val is not None and val < state.best_val
            if improved:
                state.best_val = val
            manual = queued is None and self.control.take_save_request()  # not while a step is in flight
            if interval or improved or manual:
                reason = "manual" if manual else "interval" if interval else "best"
                self._checkpoint(reason, val, improved, time.perf_counter() - start)
            if stop_here:
                status = "stopped"
                break

        return self._finish(status, time.perf_counter() - start, last_loss)

    def _progress(self, queued: QueuedStep) -> QueuedStep:
        """Note where in the data a step just queued ends: its Step event is sent after the next is queued."""
        queued.epoch = self.state.epoch + self.state.pos / max(len(self.state.order), 1)
        return queued

    def _scheduled(self, step: int) -> tuple[bool, bool, bool]:
        """What the config has the loop do once `step` is done: validate, save a checkpoint, stop (stop_after)."""
        cfg = self.cfg
        return (bool(cfg.evaluation.every_steps and step % cfg.evaluation.every_steps == 0),
                bool(cfg.checkpoints.every_steps and step % cfg.checkpoints.every_steps == 0),
                self.stop_after is not None and step >= self.stop_after)

    def _nothing_due(self, step: int) -> bool:
        """Whether the loop may queue the step after `step` before reading `step`: nothing after `step` needs
        its weights (validation, a checkpoint, the end, a stop) and the UI has asked for nothing."""
        return step < self.setup.total_steps and not any(self._scheduled(step)) and not self.control.pending

    def _started(self) -> ev.Started:
        import mlx.core as mx
        from engine import cuda_graphs
        from engine.model import cpu_kernels
        from engine.model.loading import on_cuda
        setup, world = self.setup, self.world
        device = (str(mx.default_device()) + ("" if world.alone else f" x {world.size} ranks")
                  + cpu_kernels.device_note() + cuda_graphs.device_note(on_cuda()))
        if world.blas_threads:
            device += f" ({world.blas_threads} BLAS thread{'s' if world.blas_threads > 1 else ''} each)"
        return ev.Started(str(setup.run_dir), setup.total_steps, self.state.step,
                          setup.total_steps / max(setup.steps_per_epoch, 1), len(setup.data.train),
                          len(setup.data.valid), setup.trainable, setup.total_params,
                          setup.global_batch * self.cfg.training.grad_accumulation, device, setup.blas.name,
                          setup.info.dtype, tuple(setup.data.report.shape_lines()))

    def _evaluate(self) -> float:
        from engine.train.validation import perplexity, validation_batches, validation_loss
        cfg, setup, state = self.cfg, self.setup, self.state
        t0 = time.perf_counter()
        if setup.objective is None:
            val = validation_loss(setup.model, setup.data.valid, cfg.training.batch_size, setup.pad_id,
                                  cfg.model.max_seq_length, cfg.evaluation.val_batches, self.world)
            preference, ppl = None, perplexity(val)
        else:  # the preference loss: lower is better too, but no perplexity
            valid = setup.objective.splits["valid"]
            batches = validation_batches([valid.length(i) for i in range(len(valid))],
                                         cfg.training.batch_size * self.world.size, cfg.evaluation.val_batches)
            (val, preference), ppl = setup.objective.validate(batches, self.world), math.nan
        self.emit(ev.Eval(state.step, val, ppl, val < state.best_val, time.perf_counter() - t0, preference))
        state.last_val = val
        return val

    def _checkpoint(self, reason: str, val: float | None, is_best: bool, session_seconds: float) -> None:
        setup, state = self.setup, self.state
        if not self.world.is_main:  # rank 0 writes for the group; the path is the same on every rank
            state.last_checkpoint = str(setup.store.folder / f"step_{state.step:06d}")
            return
        path = save_checkpoint(setup.store, setup.model, setup.adapter_config, setup.optimizer, state, reason, val,
                               is_best, session_seconds, setup.objective)
        state.last_checkpoint = str(path)
        self.emit(ev.CheckpointSaved(state.step, str(path), reason, is_best,
                                     tuple(str(c.path) for c in setup.store.list())))

    def _saved_this_step(self) -> bool:
        last = self.state.last_checkpoint
        return bool(last) and last.endswith(f"step_{self.state.step:06d}")

    def _save_while_paused(self, session_seconds: float) -> None:
        state = self.state
        if self._saved_this_step():
            # Re-saving would replace that checkpoint's record (its validation loss) with a bare one.
            self.warn(f"step {state.step} is saved already: {state.last_checkpoint}")
            return
        self._checkpoint("manual", None, False, session_seconds)

    def _diverged(self, loss: float, norm: float) -> RunResult:
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        msg = (f"training diverged at step {self.state.step + 1}: {what} is {loss if what == 'loss' else norm} "
               f"(learning rate {self.cfg.training.learning_rate:g}). Lower training.learning_rate or check the "
               "data; the weights of this step were not applied and no checkpoint was written from them")
        self.emit(ev.Failed(self.state.step, msg, self.state.last_checkpoint))
        return RunResult("failed", self.run_dir, self.state.step, self.state.losses, message=msg,
                         error_kind="training")

    # ------------------------------------------------------------ the end

    def _finish(self, status: str, elapsed: float, last_loss: float | None) -> RunResult:
        """After the last step: a last validation (unless that step had one), the last checkpoint, then (rank
        0) the adapter, the report and the samples."""
        cfg, setup, state = self.cfg, self.setup, self.state
        final_val = None
        if status == "finished" and setup.data.valid and not (cfg.evaluation.every_steps and
                                                               state.step % cfg.evaluation.every_steps == 0):
            final_val = self._evaluate()
            if final_val < state.best_val:
                state.best_val = final_val
                self._checkpoint("best", final_val, True, elapsed)
        if not self._saved_this_step():
            self._checkpoint("stop" if status == "stopped" else "final", final_val, False, elapsed)
        if not self.world.is_main:
            return RunResult(status, setup.run_dir, state.step, state.losses)
        adapter_dir = write_final_adapter(setup.run_dir, setup.model, setup.adapter_config, state.last_checkpoint)
        report = write_report(cfg, setup, state, status, elapsed, last_loss, adapter_dir, self.control, self.emit)
        self.emit(ev.Finished(state.step, status == "stopped", last_loss,
                              None if math.isinf(state.best_val) else state.best_val,
                              str(adapter_dir), str(setup.run_dir / "report.json")))
        return RunResult(status, setup.run_dir, state.step, state.losses, report)
