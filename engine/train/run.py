"""The training run: LoRA fine-tuning you can watch, pause, stop and resume exactly.

Read top to bottom: `TrainingRun.run()` prepares (model, adapters, data, optimizer, maybe a checkpoint),
then `_loop()` runs optimizer steps, each one `mx.eval`, reporting through typed events. All MLX work
happens on the thread that calls `run()` (MLX streams are per thread).
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from engine import atomic
from engine import protocol as ev
from engine.config.loading import to_yaml
from engine.config.schema import Config
from engine.model.memory import memory_stats
from engine.train import run_folder
from engine.train.batches import collate, epoch_batches
from engine.train.checkpoints import CheckpointError
from engine.train.control import RunControl
from engine.train.distributed import DistributedError, World
from engine.train.errors import StoppedEarly, TrainingError
from engine.train.prepare import Preparing
from engine.train.report import Reporting
from engine.train.resume import Resuming
from engine.train.run_log import RunLog
from engine.train.saving import Saving
from engine.train.step import accumulate_gradients, build_micro_step, build_update, checkpointed_layers, \
    clip_gradients, step_seed


@dataclass
class RunResult:
    status: str  # "finished", "stopped" or "failed"
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, this process
    report: dict = field(default_factory=dict)
    message: str = ""
    error_kind: str = ""  # for failures: "config", "data", "model", "checkpoint", "training", "disk"


class TrainingRun(Preparing, Resuming, Saving, Reporting):
    """One run: `run()` below, the loop in `_loop()`; preparation, resuming, saving and the report are in
    prepare.py, resume.py, saving.py and report.py beside this file."""

    def __init__(self, cfg: Config, listeners=(), control: RunControl | None = None,
                 resume: str | None = None, run_dir: str | Path | None = None, stop_after: int | None = None,
                 overwrite: bool = False):
        self.cfg = cfg
        self.listeners = list(listeners)
        self.world = World(0, 1)  # set by run(): mlx.launch may have made this process one rank of several
        self.control = control or RunControl()
        self.resume_from = resume
        self._run_dir = Path(run_dir) if run_dir else None
        self.stop_after = stop_after  # for tests and benchmarks: behave as if stopped after this step
        self.overwrite = overwrite  # a fresh start may replace an earlier run in the same folder
        self.lock: run_folder.RunLock | None = None
        self.resumes: list[dict] = []  # each resume of this run: step, checkpoint, settings changed
        self.config_kept_as: str | None = None  # where a resume with changed settings keeps the old config.yaml
        self.identity: dict = {}
        self.step = 0
        self.last_checkpoint: str | None = None
        self.losses: list[float] = []

    # ------------------------------------------------------------ events

    def emit(self, event) -> None:
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
        log = None
        try:
            self.world = World.current()
            self.world.on_lost = self._group_lost
            self._locate()
            if self.world.is_main:  # only rank 0 writes the run folder
                log = RunLog(self.run_dir)  # first, so that even preparation warnings reach metrics.jsonl
                self.listeners.append(log)
            self._prepare(*self._find_resume())
            with checkpointed_layers(self.model, self.cfg.training.grad_checkpoint):
                return self._loop()
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

    def _group_lost(self, message: str) -> None:
        """Called by the distributed watchdog (another thread) just before the process exits."""
        self.emit(ev.Failed(self.step, self._group_message(message), self.last_checkpoint))

    def _group_message(self, why: str) -> str:
        return (f"distributed run stopped: {why}; last checkpoint: {self.last_checkpoint or 'none yet'}; "
                f"resume with: lora-tui train --resume {getattr(self, 'run_dir', '<run folder>')}")

    def _keep_traceback(self) -> str:
        run_dir = getattr(self, "run_dir", None)
        if run_dir is None or not Path(run_dir).is_dir():
            return ""
        try:
            with open(Path(run_dir) / "crash.log", "a", encoding="utf-8") as fh:
                fh.write(traceback.format_exc() + "\n")
            return f" (traceback in {Path(run_dir) / 'crash.log'})"
        except OSError:
            return ""

    def _stopped_before_training(self) -> RunResult:
        """A stop during preparation: no checkpoint of an untrained step (it would look like a run to resume)."""
        message = ("stopped before training began: nothing was trained or saved" if not self.resume_from else
                   "stopped before training resumed: the run folder is as it was")
        self.emit(ev.Finished(self.step, True, None, None, "", ""))
        run_dir = getattr(self, "run_dir", Path(self.cfg.output.dir))
        return RunResult("stopped", run_dir, self.step, self.losses, message=message)

    def _check_stop(self) -> None:
        if self.control.stop_requested:
            raise StoppedEarly()

    def _fail(self, message: str, kind: str) -> RunResult:
        self.emit(ev.Failed(self.step, message, self.last_checkpoint))
        run_dir = getattr(self, "run_dir", Path(self.cfg.output.dir))
        return RunResult("failed", run_dir, self.step, self.losses, message=message, error_kind=kind)

    # ------------------------------------------------------------ the loop

    def _next_batch(self):
        t = self.cfg.training
        if self.pos >= len(self.order):
            self.epoch += 1
            self.pos = 0
            self.order = epoch_batches(self.lengths, self.global_batch, t.seed, self.epoch, self.cfg.data.shuffle)
        mine = self.world.share(self.order[self.pos])
        self.pos += 1
        if not mine:  # a short last batch with fewer rows than ranks: this rank adds nothing
            inputs, targets, mask, _ = collate([self.data.train[self.order[self.pos - 1][0]]], self.pad_id,
                                               self.cfg.model.max_seq_length)
            return inputs, targets, mask & False, 0
        return collate([self.data.train[i] for i in mine], self.pad_id, self.cfg.model.max_seq_length)

    def _loop(self) -> RunResult:
        import mlx.core as mx

        from engine.train.losses import loss_inputs
        from engine.train.validation import perplexity, validation_loss

        cfg, t = self.cfg, self.cfg.training
        if self.world.is_main:
            current = self.run_dir / "config.yaml"
            if self.config_kept_as and current.is_file():
                atomic.write_text(self.run_dir / self.config_kept_as, current.read_text())
            atomic.write_text(current, to_yaml(cfg))
        device = str(mx.default_device()) + ("" if self.world.alone else f" x {self.world.size} ranks")
        if self.world.blas_threads:
            device += f" ({self.world.blas_threads} BLAS thread{'s' if self.world.blas_threads > 1 else ''} each)"
        self.emit(ev.Started(str(self.run_dir), self.total_steps, self.step,
                             self.total_steps / max(self.steps_per_epoch, 1),
                             len(self.data.train), len(self.data.valid), self.trainable, self.total_params,
                             self.global_batch * t.grad_accumulation, device, self.blas.name, self.info.dtype))
        micro_step = build_micro_step(self.model, self.optimizer)
        update = build_update(self.model, self.optimizer)
        start = time.perf_counter()
        window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
        rate = None
        status, last_loss = "finished", None

        while self.step < self.total_steps:
            if self.control.paused:
                self.emit(ev.Paused(self.step))
                while self.control.paused and not self.control.stop_requested:
                    self.control._running.wait(0.2)
                self.emit(ev.Resumed(self.step))
                window_t = time.perf_counter()
            if self.world.any(self.control.stop_requested):  # every rank stops at the same step
                status = "stopped"
                break
            step_start = time.perf_counter()
            lr = float(self.schedule(mx.array(self.step)))  # the rate this step's update will use
            # Dropout's RNG is a pure function of (seed, step): a resumed run draws the same masks without
            # saving the key (MLX's per-thread RNG state cannot be set from a saved key).
            mx.random.seed(step_seed(t.seed, self.step))
            real = 0

            def micro_batches():
                nonlocal real
                for _ in range(t.grad_accumulation):
                    inputs, targets, mask, n_real = self._next_batch()
                    real += n_real
                    yield loss_inputs(inputs, targets, mask)
            grads, loss = accumulate_gradients(micro_step, micro_batches(), self.world)
            real = int(self.world.sum_number(real))
            grads, norm = clip_gradients(grads, t.max_grad_norm)
            mx.eval(loss, norm)
            loss_value, norm_value = loss.item(), norm.item()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                return self._diverged(loss_value, norm_value)  # before the update: these weights stay good
            update(grads)
            self.world.step_took(time.perf_counter() - step_start)
            self.step += 1
            self.tokens_seen += real
            self.session_tokens += real
            self.losses.append(loss_value)
            last_loss = loss_value
            window_tokens += real
            window_steps += 1

            if self.step % cfg.output.log_every_steps == 0 or self.step == self.total_steps:
                now = time.perf_counter()
                dt = max(now - window_t, 1e-9)
                sps = window_steps / dt
                rate = sps if rate is None else 0.7 * rate + 0.3 * sps
                self.emit(ev.Step(self.step, self.total_steps, self.epoch + self.pos / max(len(self.order), 1),
                                  loss_value, lr, norm_value, window_tokens / dt, sps,
                                  (self.total_steps - self.step) / max(rate, 1e-9), self.tokens_seen,
                                  memory_stats()))
                window_t, window_tokens, window_steps = now, 0, 0

            evaluated = cfg.evaluation.every_steps and self.step % cfg.evaluation.every_steps == 0
            val = self._evaluate(validation_loss, perplexity) if evaluated and self.data.valid else None
            improved = val is not None and val < self.best_val
            if improved:
                self.best_val = val
            interval = cfg.checkpoints.every_steps and self.step % cfg.checkpoints.every_steps == 0
            if interval or improved or self.control._save.is_set():
                reason = "manual" if self.control._save.is_set() else "interval" if interval else "best"
                self.control._save.clear()
                self._checkpoint(reason, val, improved, time.perf_counter() - start)
            if self.stop_after is not None and self.step >= self.stop_after:
                status = "stopped"
                break

        elapsed = time.perf_counter() - start
        final_val = None
        if status == "finished" and self.data.valid and not (cfg.evaluation.every_steps and
                                                              self.step % cfg.evaluation.every_steps == 0):
            final_val = self._evaluate(validation_loss, perplexity)
            if final_val < self.best_val:
                self.best_val = final_val
                self._checkpoint("best", final_val, True, elapsed)
        if not self.last_checkpoint or not self.last_checkpoint.endswith(f"step_{self.step:06d}"):
            self._checkpoint("stop" if status == "stopped" else "final", final_val, False, elapsed)
        if not self.world.is_main:
            return RunResult(status, self.run_dir, self.step, self.losses, None)
        adapter_dir = self._write_final_adapter()
        report = self._report(status, elapsed, last_loss, adapter_dir)
        self.emit(ev.Finished(self.step, status == "stopped", last_loss,
                              None if math.isinf(self.best_val) else self.best_val,
                              str(adapter_dir), str(self.run_dir / "report.json")))
        return RunResult(status, self.run_dir, self.step, self.losses, report)

    def _evaluate(self, validation_loss, perplexity) -> float:
        t0 = time.perf_counter()
        val = validation_loss(self.model, self.data.valid, self.cfg.training.batch_size, self.pad_id,
                              self.cfg.model.max_seq_length, self.cfg.evaluation.val_batches, self.world)
        self.emit(ev.Eval(self.step, val, perplexity(val), val < self.best_val, time.perf_counter() - t0))
        self.last_val = val
        return val

    def _diverged(self, loss: float, norm: float) -> RunResult:
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        msg = (f"training diverged at step {self.step + 1}: {what} is {loss if what == 'loss' else norm} "
               f"(learning rate {self.cfg.training.learning_rate:g}). Lower training.learning_rate or check the "
               "data; the weights of this step were not applied and no checkpoint was written from them")
        self.emit(ev.Failed(self.step, msg, self.last_checkpoint))
        return RunResult("failed", self.run_dir, self.step, self.losses, message=msg, error_kind="training")

def run_in_thread(cfg: Config, listeners=(), **kwargs) -> tuple[threading.Thread, RunControl, list]:
    """Start a run on a new thread; returns (thread, control, [result once done])."""
    control = kwargs.pop("control", None) or RunControl()
    box: list = []

    def target():
        from engine import release_mlx_streams
        try:
            box.append(TrainingRun(cfg, listeners, control, **kwargs).run())
        finally:
            release_mlx_streams()

    thread = threading.Thread(target=target, name="lora-tui-train", daemon=False)
    thread.start()
    return thread, control, box
