"""A run's preparation: pick and claim the run folder, load the model, apply LoRA, tokenize the data, build
the optimizer and estimate the step's memory; a resume restores its checkpoint here too (resume.py)."""

from __future__ import annotations

import math
import time
from pathlib import Path

from engine import protocol as ev
from engine.config.validation import check_against_total, run_name_problem
from engine.train import run_folder
from engine.train.batches import epoch_batches, steps_per_epoch
from engine.train.checkpoints import STATE_FILE, CheckpointError, CheckpointStore
from engine.train.errors import TrainingError
from engine.train.schedule import build_optimizer, build_schedule


class Preparing:
    """TrainingRun's preparation steps (TrainingRun inherits them; the state they set lives on the run)."""

    def _locate(self) -> None:
        """Pick the run folder (a resumed run keeps its own) and claim it."""
        cfg = self.cfg
        problem = run_name_problem(cfg.output.run_name)  # also a name set on the command line, after validation
        if problem:
            raise TrainingError(f"output.run_name: {problem}", "config")
        if self.resume_from and self.overwrite:
            raise TrainingError("--overwrite and --resume contradict each other: resume the run or replace it, "
                                "not both", "config")
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
                if self.lock.unlocked:
                    self.warn(self.lock.unlocked)
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

        from engine.train.batches import PAD_MULTIPLE
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
