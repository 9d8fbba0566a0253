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
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

from engine import atomic, run_folder
from engine import events as ev
from engine.batches import collate, epoch_batches, steps_per_epoch
from engine.checkpoints import STATE_FILE, CheckpointError, CheckpointStore, checkpoint_problem, read_state
from engine.config import Config, check_against_total, to_yaml
from engine.control import RunControl
from engine.distributed import DistributedError, World
from engine.model.memory import memory_stats
from engine.monitor import RunLog


class TrainingError(RuntimeError):
    """A run cannot go on; the message says why and what to do. `kind` sorts it for exit codes."""

    def __init__(self, message: str, kind: str = "training"):
        super().__init__(message)
        self.kind = kind  # "config", "data", "model", "checkpoint", "training", "disk"


class StoppedEarly(Exception):
    """A stop asked for before the first step: nothing was trained, so nothing is saved."""


@dataclass
class RunResult:
    status: str  # "finished", "stopped" or "failed"
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, this process
    report: dict = field(default_factory=dict)
    message: str = ""
    error_kind: str = ""  # for failures: "config", "data", "model", "checkpoint", "training", "disk"


def write_problem(exc: BaseException, folder: Path) -> str:
    """Why a save failed, in words: MLX's safetensors writer raises RuntimeError("[write] Unable to write
    ...") where Python would raise OSError(ENOSPC), so ask the file system how much room is left."""
    import shutil
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < (1 << 20):
        return f"No space left on device ({free:,} bytes free)"
    if isinstance(exc, RuntimeError) and "write" not in str(exc).lower():
        raise exc  # not a write failure: let the caller report it as the bug it is
    return str(exc)


def build_schedule(cfg: Config, total_steps: int):
    import mlx.core as mx
    import mlx.optimizers as optim
    t = cfg.training
    lr, warm = t.learning_rate, min(t.warmup_steps, max(total_steps - 1, 0))
    end = lr * t.min_lr_ratio
    decay_steps = max(total_steps - warm, 1)
    if t.lr_schedule == "cosine":
        decay = optim.cosine_decay(lr, decay_steps, end)
    elif t.lr_schedule == "linear":
        decay = optim.linear_schedule(lr, end, decay_steps)
    else:
        decay = lambda step: mx.array(lr, dtype=mx.float32)  # noqa: E731  (the optimizer casts it)
    if warm == 0:
        return decay
    # Start at lr/(warm+1), not 0: a first step at lr 0 would be wasted.
    return optim.join_schedules([optim.linear_schedule(lr / (warm + 1), lr, warm), decay], [warm])


def build_optimizer(cfg: Config, schedule):
    """AdamW as PyTorch and Hugging Face define it (by default): MLX's own default skips the bias
    correction, which makes the first steps several times larger at the same learning rate (x3.2 at
    step 1, x6.5 at step 10; bench/check_adamw.py)."""
    import mlx.optimizers as optim
    t = cfg.training
    return optim.AdamW(learning_rate=schedule, weight_decay=t.weight_decay, bias_correction=t.adam_bias_correction)


@contextmanager
def checkpointed_layers(model, enabled: bool):
    """Gradient checkpointing of every transformer block for one run: each block keeps only its input and
    is recomputed in the backward pass.

    As mlx-lm's grad_checkpoint does, this patches the block's class, so it is put back when the run ends
    (the TUI trains many times in one process). Unlike it, the block's dropout masks come from a key drawn
    before the block (philox.dropout_keys): with mlx-lm's, the recompute draws new masks, and the gradients
    are not those of the loss the forward pass computed (tests/test_train.py)."""
    if not enabled:
        yield
        return
    block_class = type(model.layers[0])
    original = block_class.__call__
    block_class.__call__ = _checkpointed(original)
    try:
        yield
    finally:
        block_class.__call__ = original


def _checkpointed(call):
    import mlx.core as mx

    from engine.model.philox import dropout_keys

    def checkpointed_call(block, *args, **kwargs):
        key = mx.random.randint(0, 2 ** 31 - 1, (2,)).astype(mx.uint32)  # a closure: no gradient for it

        def inner(params, *args, **kwargs):
            block.update(params)
            with dropout_keys(key):
                return call(block, *args, **kwargs)
        return mx.checkpoint(inner)(block.trainable_parameters(), *args, **kwargs)
    return checkpointed_call


def build_micro_step(model, optimizer):
    """The compiled forward + backward of one micro-batch: (sum of token losses, token count, grads)."""
    import mlx.core as mx
    import mlx.nn as nn

    from engine.evaluate import masked_loss
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def micro_step(inputs, targets, positions, weights):
        (loss_sum, ntoks), grads = loss_and_grad(model, inputs, targets, positions, weights)
        return loss_sum, ntoks, grads

    return micro_step


def accumulate_gradients(micro_step, micro_batches, world=None):
    """Sum the gradients of several micro-batches (and, in a distributed run, of every rank), then scale by
    the trained-token count, so that the step equals one big batch. micro_batches yields loss_inputs()
    tuples; returns (grads, mean loss)."""
    import mlx.core as mx
    from mlx.utils import tree_map
    grads, loss_sum, ntoks = None, mx.array(0.0), mx.array(0.0)
    for arrays in micro_batches:
        s, n, g = micro_step(*arrays)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        loss_sum, ntoks = loss_sum + s, ntoks + n
        mx.eval(grads, loss_sum, ntoks)  # bound memory: one micro-batch graph at a time
    if world is not None and not world.alone:
        grads, loss_sum, ntoks = world.sum((grads, loss_sum, ntoks))  # token-weighted across ranks
    denom = mx.maximum(ntoks, 1)
    return tree_map(lambda g: g / denom, grads), loss_sum / denom


def clip_gradients(grads, max_grad_norm: float):
    """(clipped grads, global norm); max_grad_norm <= 0 only measures the norm."""
    return _compiled_clip(max_grad_norm if max_grad_norm > 0 else math.inf)(grads)


@lru_cache(maxsize=None)
def _compiled_clip(max_norm: float):
    import mlx.core as mx
    import mlx.optimizers as optim
    return mx.compile(lambda grads: optim.clip_grad_norm(grads, max_norm))


def apply_update(model, optimizer, grads) -> None:
    import mlx.core as mx
    optimizer.update(model, grads)
    mx.eval(model.trainable_parameters(), optimizer.state)


def build_update(model, optimizer):
    """apply_update, compiled: each parameter's optimizer arithmetic (~10 element-wise ops for AdamW) runs
    as one fused kernel, where run op by op it is ~10 launches for each of a LoRA's hundreds of arrays."""
    import mlx.core as mx
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads):
        optimizer.update(model, grads)
        return optimizer.state["step"]

    def apply(grads) -> None:
        update(grads)
        mx.eval(model.trainable_parameters(), optimizer.state)

    return apply


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def _set_leaf(tree, path: str, value) -> None:
    parts = path.split(".")
    node = tree
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


class TrainingRun:
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

    # ------------------------------------------------------------ preparation

    def _locate(self) -> None:
        """Pick the run folder (a resumed run keeps its own) and claim it."""
        cfg = self.cfg
        from engine.config import run_name_problem
        problem = run_name_problem(cfg.output.run_name)  # also a name set on the command line, after validation
        if problem:
            raise TrainingError(f"output.run_name: {problem}", "config")
        self.run_dir = self._pick_run_dir().resolve()
        self.store = CheckpointStore(self.run_dir / "checkpoints", cfg.checkpoints.keep_last, cfg.checkpoints.keep_best)
        self._claim_folder()

    def _pick_run_dir(self) -> Path:
        if self.resume_from == "latest":
            base = self._run_dir or (Path(self.cfg.output.dir).expanduser() / self.cfg.output.run_name
                                     if self.cfg.output.run_name else None)
            if base is None:
                raise TrainingError("--resume latest needs output.run_name (or a run folder): which run?", "config")
            if not (base / "checkpoints").is_dir():
                raise CheckpointError(f"no checkpoint to resume in {base / 'checkpoints'}")
            return base
        if self.resume_from:
            path = Path(self.resume_from).expanduser()
            if (path / "checkpoints").is_dir():  # a run folder
                return path
            if not (path / STATE_FILE).is_file():
                raise CheckpointError(f"{path}: not a checkpoint (no {STATE_FILE})")
            return path.resolve().parent.parent  # a checkpoint folder: run/checkpoints/step_N
        if self._run_dir:
            return self._run_dir
        started = self.world.from_main(int(time.time()))  # every rank names the same folder
        name = self.cfg.output.run_name or time.strftime("run-%Y%m%d-%H%M%S", time.localtime(started))
        return Path(self.cfg.output.dir).expanduser() / name

    def _claim_folder(self) -> None:
        """Rank 0 (the only writer) locks the run folder for this process and checks that writing there
        loses nothing; every rank stops together when it cannot."""
        problem = None
        if self.world.is_main:
            try:
                run_folder.check_written_paths(self.run_dir)
                self.lock = run_folder.RunLock(self.run_dir).acquire()
                if not self.resume_from:
                    self._start_fresh()
            except run_folder.RunFolderError as exc:
                problem = str(exc)
            except OSError as exc:
                problem = f"{exc.filename or self.run_dir}: {exc.strerror or exc}"
        if self.world.any(problem is not None):
            raise TrainingError(problem or "rank 0 cannot use the run folder (its log says why)", "config")

    def _start_fresh(self) -> None:
        if run_folder.holds_run(self.run_dir) and not self.overwrite:
            raise run_folder.RunFolderError(
                f"{self.run_dir} holds an earlier run (checkpoints, adapter or report): use --resume latest to "
                "continue it, --overwrite to replace it, or another --run-name")
        run_folder.clear(self.run_dir)  # the replaced run, or the logs of one that failed before its first step

    def _prepare(self, resume_state: dict | None, resume_dir: Path | None) -> None:
        import mlx.core as mx

        from engine import blas
        from engine.model.adapters import AdapterError, apply_lora, total_count, trainable_count
        from engine.data import DatasetError, prepare_dataset
        from engine.model.memory import limit_gpu_queue
        from engine.model.loading import ModelLoadError, load_model

        cfg, t = self.cfg, self.cfg.training
        if resume_state is not None:  # settings first: a refusal should not wait for the model and the data
            self._check_same_run(resume_dir, resume_state, run_folder.run_identity(cfg, None, self.world.size))

        phase = lambda name, frac: self.emit(ev.Phase(name, frac))  # noqa: E731
        try:
            model, tokenizer, info = load_model(cfg.model, lambda w, f: phase(w, 0.4 * f))
        except ModelLoadError as exc:
            raise TrainingError(str(exc), "model") from None
        self._check_stop()
        mx.random.seed(t.seed)
        try:
            self.adapter_config = apply_lora(model, cfg.lora)
        except AdapterError as exc:
            raise TrainingError(str(exc), "config") from None
        if info.quantized and mx.default_device() == mx.gpu:  # QLoRA: bf16 speed, 4-bit memory (see qlora.py)
            from engine.model.qlora import dequantize_just_in_time
            dequantize_just_in_time(model)
        self.model, self.tokenizer, self.info = model, tokenizer, info
        phase("tokenizing the dataset", 0.45)
        try:
            data = prepare_dataset(cfg, tokenizer, progress=lambda d, n: phase("tokenizing the dataset",
                                                                                   0.45 + 0.45 * d / n),
                                   should_stop=lambda: self.control.stop_requested)
        except DatasetError as exc:
            self._check_stop()  # a dataset cut short by a stop is not a bad dataset
            raise TrainingError(str(exc), "data") from None
        self._check_stop()
        self.data = data
        self.identity = run_folder.run_identity(cfg, data, self.world.size)
        if resume_state is not None:
            self._check_same_run(resume_dir, resume_state, self.identity)
        for w in data.report.warnings:
            self.warn(w)

        self.pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        self.lengths = [len(e.encoded) for e in data.train]
        self.global_batch = t.batch_size * self.world.size  # rows per micro-step over all ranks
        self.steps_per_epoch = steps_per_epoch(len(data.train), self.global_batch, t.grad_accumulation)
        self.total_steps = t.iterations if t.iterations > 0 else t.epochs * self.steps_per_epoch
        for issue in check_against_total(cfg, self.total_steps):
            self.warn(f"{issue.field}: {issue.message}")

        self.schedule = build_schedule(cfg, self.total_steps)
        self.optimizer = build_optimizer(cfg, self.schedule)
        self.optimizer.init(model.trainable_parameters())
        model.train()
        self.trainable = trainable_count(model)
        self.total_params = total_count(model)
        self.blas = blas.active()
        self.memory_estimate = self._estimate_memory()
        self.memory_limit = limit_gpu_queue(self.memory_estimate, t.memory_limit_gb)

        # Data position and run history (a resume overwrites them from the checkpoint).
        self.epoch, self.pos = 0, 0
        self.order = epoch_batches(self.lengths, self.global_batch, t.seed, 0, cfg.data.shuffle)
        self.best_val = math.inf
        self.tokens_seen = 0
        self.session_tokens = 0
        self.elapsed_before = 0.0
        if resume_state is not None:
            self._restore(resume_dir, resume_state)
        self._check_stop()
        phase("ready", 1.0)

    def _estimate_memory(self):
        """Warn before the first step when the worst batch (the longest rows, the most trained tokens) is
        not expected to fit in memory."""
        from mlx.utils import tree_flatten

        from engine.batches import PAD_MULTIPLE
        from engine.model.memory import ModelShape, available_bytes, estimate_step_memory, fused_attention
        try:
            shape = ModelShape.of(self.model)
        except AttributeError:  # an architecture without the usual ModelArgs: no estimate
            return None
        t = self.cfg.training
        length = min(-(-max(self.lengths) // PAD_MULTIPLE) * PAD_MULTIPLE, self.cfg.model.max_seq_length)
        trained = max(float(e.encoded.trained[:length].mean()) for e in self.data.train)
        weights = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        act_bytes = 4 if self.info.dtype == "float32" else 2
        estimate = estimate_step_memory(shape, weights, self.trainable, t.batch_size, length, trained,
                                        t.grad_checkpoint, act_bytes, fused_attention())
        available = available_bytes()
        if estimate.total > available:
            self.warn(f"memory: a step on the longest batch ({t.batch_size} x {length} tokens) is estimated to "
                      f"need {estimate.describe()}, but {available / 1e9:.1f} GB is available: lower "
                      "training.batch_size or model.max_seq_length, or turn on training.grad_checkpoint")
        return estimate

    def _find_resume(self) -> tuple[dict | None, Path | None]:
        if not self.resume_from:
            return None, None
        path = Path(self.resume_from).expanduser()
        if self.resume_from != "latest" and (path / STATE_FILE).is_file():
            candidates = [path]
        else:
            candidates = [c.path for c in self.store.newest_first()]
        reasons = []
        for folder in candidates:  # newest first; an unusable one falls back to the one before
            try:
                state = read_state(folder)
                problem = checkpoint_problem(folder)
                if problem:
                    raise CheckpointError(problem)
                return state, folder
            except CheckpointError as exc:
                reasons.append(str(exc))
                if len(candidates) > 1:
                    self.warn(f"skipping unusable checkpoint {folder.name}: {exc}")
        more = f" (and {len(reasons) - 1} older checkpoint(s) unusable too)" if len(reasons) > 1 else ""
        raise TrainingError(f"cannot resume: {reasons[0]}{more}", "checkpoint")

    def _check_same_run(self, folder: Path, state: dict, identity: dict) -> None:
        """Refuse a resume that cannot continue the checkpoint's run exactly (other data, seed, batch, LoRA)."""
        old = state.get("run")
        if old is None:
            if identity.get("data_sha256"):  # warn once, when the data are known
                self.warn(f"{folder.name} was saved by an older lora-tui that did not record its dataset, seed, "
                          "batch and LoRA settings: they cannot be checked against this run's")
            return
        conflicts = run_folder.resume_conflicts(old, identity)
        if conflicts:
            raise TrainingError(f"cannot resume {folder} exactly: {'; '.join(conflicts)}. Set them back to resume "
                                "it, or start a new run (--overwrite replaces it, or another --run-name)", "config")

    def _record_changes(self, folder: Path, state: dict) -> None:
        """Settings that may change on a resume (learning rate, length, intervals...): said and recorded."""
        changes = run_folder.config_changes(state["config"], self.cfg.to_dict()) if "config" in state else {}
        self.resumes = state.get("resumes", []) + [
            {"step": state["step"], "checkpoint": str(folder), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "changed": changes}]
        if changes:
            self.config_kept_as = f"config.step_{state['step']:06d}.yaml"
            said = ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in changes.items())
            self.warn(f"resuming step {state['step']} with changed settings: {said}; the run's config.yaml is "
                      f"updated, the previous one kept as {self.config_kept_as}")

    def _restore(self, folder: Path, state: dict) -> None:
        import mlx.core as mx

        from engine.model.adapters import AdapterError, load_adapter_weights
        try:
            load_adapter_weights(self.model, folder)
            opt = mx.load(str(folder / "optimizer.safetensors"))
        except AdapterError as exc:
            raise TrainingError(f"cannot resume: {exc}", "checkpoint") from None
        except Exception as exc:
            raise TrainingError(f"cannot resume: {folder / 'optimizer.safetensors'} unreadable ({exc})",
                                "checkpoint") from None
        for key, value in opt.items():
            try:
                _set_leaf(self.optimizer.state, key, value)
            except (KeyError, IndexError, ValueError):
                raise TrainingError(f"cannot resume: optimizer state {key!r} does not fit this config",
                                    "checkpoint") from None
        rows = max((i for batch in state["order"] for i in batch), default=-1)
        if rows >= len(self.data.train):  # only an old checkpoint without a data fingerprint gets here
            raise TrainingError(f"cannot resume {folder}: its data order uses training row {rows}, this dataset "
                                f"has {len(self.data.train)}: resume with the run's dataset", "config")
        self._record_changes(folder, state)
        self.step = state["step"]
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.order = state["order"]
        self.best_val = state.get("best_val_loss") or math.inf
        self.tokens_seen = state.get("tokens_seen", 0)
        self.elapsed_before = state.get("elapsed", 0.0)
        self.last_checkpoint = str(folder)
        if state.get("total_steps") != self.total_steps:
            self.warn(f"the checkpoint was made for {state.get('total_steps')} steps, this run has "
                      f"{self.total_steps}: the schedule follows the new total")

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

        from engine.evaluate import loss_inputs, perplexity, validation_loss

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

    # ------------------------------------------------------------ saving

    def _checkpoint(self, reason: str, val: float | None, is_best: bool, elapsed: float) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from engine.model.adapters import save_adapters

        def write(folder: Path) -> None:
            save_adapters(self.model, self.adapter_config, folder)
            flat = dict(tree_flatten(self.optimizer.state))
            mx.save_safetensors(str(folder / "optimizer.safetensors"), flat)

        if not self.world.is_main:  # rank 0 writes for the group; the path is the same on every rank
            self.last_checkpoint = str(self.store.folder / f"step_{self.step:06d}")
            return
        state = {"step": self.step, "total_steps": self.total_steps, "epoch": self.epoch, "pos": self.pos,
                 "order": [list(map(int, b)) for b in self.order], "val_loss": val,
                 "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
                 "tokens_seen": self.tokens_seen, "elapsed": self.elapsed_before + elapsed,
                 "seed": self.cfg.training.seed, "rng": "mx.random.seed(step_seed(seed, step)) each step",
                 "reason": reason, "run": self.identity, "config": self.cfg.to_dict(), "resumes": self.resumes}
        try:
            path = self.store.save(self.step, write, state, is_best)
        except (OSError, RuntimeError) as exc:
            raise TrainingError(f"could not save the checkpoint at step {self.step} to {self.store.folder}: "
                                f"{write_problem(exc, self.store.folder)}; the previous checkpoint is intact",
                                "disk") from None
        self.last_checkpoint = str(path)
        self.emit(ev.CheckpointSaved(self.step, str(path), reason, is_best,
                                     tuple(str(c.path) for c in self.store.list())))

    def _write_final_adapter(self) -> Path:
        """run_dir/adapter: the adapter of the last step, in mlx-lm's format (atomic swap)."""
        from engine.model.adapters import save_adapters
        final = self.run_dir / "adapter"
        try:
            with atomic.folder(final) as tmp:
                save_adapters(self.model, self.adapter_config, tmp)
        except (OSError, RuntimeError) as exc:
            raise TrainingError(f"could not write the adapter to {final}: {write_problem(exc, self.run_dir)}; "
                                f"the last checkpoint ({self.last_checkpoint}) is intact", "disk") from None
        return final

    def _report(self, status: str, elapsed: float, last_loss: float | None, adapter_dir: Path) -> dict:
        import mlx.core as mx

        from engine.evaluate import perplexity
        best = self.store.best()
        mem = memory_stats()
        report = {
            "status": status, "step": self.step, "total_steps": self.total_steps,
            "final_train_loss": last_loss,
            "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
            "best_val_perplexity": None if math.isinf(self.best_val) else perplexity(self.best_val),
            "last_val_loss": getattr(self, "last_val", None),
            "trainable_params": self.trainable, "total_params": self.total_params,
            "tokens_seen": self.tokens_seen,
            "seconds": round(self.elapsed_before + elapsed, 2), "seconds_this_session": round(elapsed, 2),
            "tokens_per_sec": round(self.session_tokens / elapsed, 1) if elapsed > 0 else None,
            "peak_memory": {"mlx_peak_bytes": mx.get_peak_memory(), "rss_bytes": mem.rss_bytes,
                            "estimated_bytes": self.memory_estimate.total if self.memory_estimate else None},
            "device": str(mx.default_device()), "blas": self.blas.name, "dtype": self.info.dtype,
            "adapter": str(adapter_dir), "best_checkpoint": str(best.path) if best else None,
            "checkpoints": [str(c.path) for c in self.store.list()],
            "losses": self.losses, "data": self.data.report.to_dict(), "config": self.cfg.to_dict(),
            "resumes": self.resumes, "samples": [],
        }
        atomic.write_json(self.run_dir / "report.json", report)  # before the samples: a stop there loses nothing
        report["samples"] = self._samples()
        if report["samples"]:
            atomic.write_json(self.run_dir / "report.json", report)
        return report

    def _samples(self) -> list[dict]:
        """The configured prompts answered by the base model and by the adapter (one model in memory); a stop
        ends them between prompts or tokens."""
        from engine.model.adapters import adapters_disabled
        from engine.generate.reply import GenerationSettings
        e = self.cfg.evaluation
        settings = GenerationSettings(e.max_tokens, e.temperature, e.top_p)
        out = []
        self.model.eval()
        for prompt in e.sample_prompts:
            messages = [{"role": "user", "content": prompt}]
            adapter = self._answer(messages, settings)
            with adapters_disabled(self.model):
                base = None if adapter is None else self._answer(messages, settings)
            if base is None:
                break  # a user who pressed stop wants out, not more generation
            self.emit(ev.Sample(self.step, prompt, base, adapter))
            out.append({"prompt": prompt, "base": base, "adapter": adapter})
        return out

    def _answer(self, messages: list[dict], settings) -> str | None:
        """The model's reply, or None when a stop came first."""
        from contextlib import closing

        from engine.generate.reply import stream_reply
        parts = []
        if self.control.stop_requested:
            return None
        with closing(stream_reply(self.model, self.tokenizer, messages, settings)) as chunks:
            for chunk in chunks:
                if self.control.stop_requested:
                    return None
                parts.append(chunk.text)
        return None if self.control.stop_requested else "".join(parts).strip()


def _shown(value) -> str:
    return "unset" if value is None else repr(value)


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
