"""A run's preparation: pick and claim the run folder, then `prepare` loads the model, applies LoRA,
tokenizes the data, builds the optimizer and estimates the step's memory, and returns what the run trains
(`Prepared`) and where it starts (a TrainerState: step 0, or a checkpoint's, restored by resume.py)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from engine import protocol as ev
from engine.config.schema import Config
from engine.config.validation import check_against_total, run_name_problem
from engine.model import loading
from engine.train import run_folder
from engine.train.batches import epoch_batches, steps_per_epoch
from engine.train.checkpoints import STATE_FILE, CheckpointError, CheckpointStore
from engine.train.control import RunControl
from engine.train.distributed import World
from engine.train.errors import StoppedEarly, TrainingError
from engine.train.resume import check_same_run, continued_state, load_checkpoint_weights
from engine.train.schedule import build_optimizer, build_schedule, step_rates
from engine.train.trainer_state import TrainerState, find_resume

if TYPE_CHECKING:
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from engine.blas import BlasInfo
    from engine.data import PreparedData
    from engine.model.loading import LoadedModelInfo
    from engine.model.memory import MemoryEstimate
    from engine.train.objective import PreferenceObjective


@dataclass
class Prepared:
    """What a run trains, on what and with what, fixed once prepared (its progress is a TrainerState)."""
    run_dir: Path
    store: CheckpointStore
    model: nn.Module  # an mlx-lm model with LoRA layers
    tokenizer: TokenizerWrapper
    info: LoadedModelInfo
    adapter_config: dict  # adapter_config.json of every adapter the run saves
    data: PreparedData
    pad_id: int
    lengths: list[int]  # tokens of each training row
    global_batch: int  # rows per micro-step over all ranks
    steps_per_epoch: int
    total_steps: int
    rates: np.ndarray  # each step's learning rate, for the log (schedule.step_rates)
    optimizer: optim.Optimizer
    trainable: int
    total_params: int
    blas: BlasInfo
    memory_estimate: MemoryEstimate | None
    config_kept_as: str | None  # where a resume with changed settings keeps the old config.yaml
    objective: PreferenceObjective | None = None  # kto, dpo, orpo: their loss and reference log-probs
    world: World | None = None  # the ranks training together (report.json's communication share)


def pick_run_dir(cfg: Config, resume_from: str | None, overwrite: bool, world: World) -> Path:
    """The run folder: a resumed run keeps its own, a new one is output.dir/run_name (or a dated name)."""
    problem = run_name_problem(cfg.output.run_name)  # also a name set on the command line, after validation
    if problem:
        raise TrainingError(f"output.run_name: {problem}", "config")
    if resume_from and overwrite:
        raise TrainingError("--overwrite and --resume contradict each other: resume the run or replace it, "
                            "not both", "config")
    return _run_dir(cfg, resume_from, world).resolve()


def _run_dir(cfg: Config, resume_from: str | None, world: World) -> Path:
    if resume_from == "latest":
        if not cfg.output.run_name:
            raise TrainingError("--resume latest needs output.run_name (or a run folder): which run?", "config")
        base = Path(cfg.output.dir).expanduser() / cfg.output.run_name
        if not (base / "checkpoints").is_dir():
            raise CheckpointError(f"no checkpoint to resume in {base / 'checkpoints'}")
        return base
    if resume_from:
        path = Path(resume_from).expanduser()
        if (path / "checkpoints").is_dir():  # a run folder
            return path
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"{path}: not a checkpoint (no {STATE_FILE})")
        return path.resolve().parent.parent  # a checkpoint folder: run/checkpoints/step_N
    started = world.from_main(int(time.time()))  # every rank names the same folder
    name = cfg.output.run_name or time.strftime("run-%Y%m%d-%H%M%S", time.localtime(started))
    return Path(cfg.output.dir).expanduser() / name


def claim_run_folder(lock: run_folder.RunLock, fresh: bool, overwrite: bool, world: World,
                     warn: Callable[[str], None]) -> None:
    """Rank 0 (the only writer) takes the run folder's lock for this process and checks that writing there
    loses nothing (a fresh run clears what a failed one left); every rank stops together when it cannot."""
    problem = None
    if world.is_main:
        try:
            run_folder.check_written_paths(lock.run_dir)
            lock.acquire()
            if lock.unlocked:
                warn(lock.unlocked)
            if fresh:
                _start_fresh(lock.run_dir, overwrite)
        except run_folder.RunFolderError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"{exc.filename or lock.run_dir}: {exc.strerror or exc}"
    if world.any(problem is not None):
        raise TrainingError(problem or "rank 0 cannot use the run folder (its log says why)", "config")


def _start_fresh(run_dir: Path, overwrite: bool) -> None:
    if run_folder.holds_run(run_dir) and not overwrite:
        raise run_folder.RunFolderError(
            f"{run_dir} holds an earlier run (checkpoints, adapter or report): use --resume latest to "
            "continue it, --overwrite to replace it, or another --run-name")
    run_folder.clear(run_dir)  # the replaced run, or the logs of one that failed before its first step


def prepare(cfg: Config, world: World, run_dir: Path, resume_from: str | None, emit: ev.Listener,
            control: RunControl) -> tuple[Prepared, TrainerState]:
    """Everything the loop needs, and the state it starts from. A stop raises StoppedEarly between phases."""
    from engine import blas
    from engine.model.adapters import total_count, trainable_count
    from engine.model.memory import limit_gpu_queue

    t = cfg.training
    warn = lambda message: emit(ev.Warning(message))  # noqa: E731
    store = CheckpointStore(run_dir / "checkpoints", cfg.checkpoints.keep_last, cfg.checkpoints.keep_best)
    resume = find_resume(resume_from, store, warn)
    if resume is not None:  # settings first: a refusal should not wait for the model and the data
        check_same_run(*resume, run_folder.run_identity(cfg, None, world.size), warn)
    model, tokenizer, info, adapter_config = _load_model(cfg, emit, control)
    data = _tokenize(cfg, tokenizer, emit, control)
    identity = run_folder.run_identity(cfg, data, world.size)
    if resume is not None:
        check_same_run(*resume, identity, warn)
    for w in data.report.warnings + loading.SWITCH_WARNINGS + loading.cpu_training_warnings(info):
        warn(w)

    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    objective = _objective(cfg, model, pad_id, data) if t.method != "sft" else None
    lengths = [objective.splits["train"].length(i) for i in range(len(data.train))] if objective else \
        [len(e.encoded) for e in data.train]
    global_batch = t.batch_size * world.size
    per_epoch = steps_per_epoch(len(data.train), global_batch, t.grad_accumulation)
    total_steps = t.iterations if t.iterations > 0 else t.epochs * per_epoch
    for issue in check_against_total(cfg, total_steps):
        warn(f"{issue.field}: {issue.message}")
    schedule = build_schedule(cfg, total_steps)
    optimizer = build_optimizer(cfg, schedule)
    optimizer.init(model.trainable_parameters())
    model.train()
    _build_cpu_kernels(emit)
    trainable = trainable_count(model)
    estimate = _estimate_memory(cfg, model, info, data, lengths, trainable, warn)
    limit_gpu_queue(estimate, t.memory_limit_gb)

    if resume is None:
        order = epoch_batches(lengths, global_batch, t.seed, 0, cfg.data.shuffle)
        state = TrainerState(total_steps=total_steps, order=order, seed=t.seed, run=identity, config=cfg.to_dict())
        kept_as = None
    else:
        folder, saved = resume
        load_checkpoint_weights(folder, model, optimizer)
        state, kept_as = continued_state(folder, saved, cfg, identity, total_steps, len(data.train), warn)
    if objective is not None and t.method != "orpo":  # ORPO has no reference
        _score_reference(cfg, objective, resume[0] if resume else None, state, lengths, global_batch, world.size,
                         emit, control)
    setup = Prepared(run_dir=run_dir, store=store, model=model, tokenizer=tokenizer, info=info,
                     adapter_config=adapter_config, data=data, pad_id=pad_id, lengths=lengths,
                     global_batch=global_batch, steps_per_epoch=per_epoch, total_steps=total_steps,
                     rates=step_rates(schedule, total_steps), optimizer=optimizer, trainable=trainable,
                     total_params=total_count(model), blas=blas.active(), memory_estimate=estimate,
                     config_kept_as=kept_as, objective=objective, world=world)
    return setup, state


def check_stop(control: RunControl) -> None:
    if control.stop_requested:
        raise StoppedEarly()


def _load_model(cfg: Config, emit: ev.Listener, control: RunControl):
    """(model with LoRA applied, tokenizer, info, adapter config): 0-40% of the preparation's progress."""
    import mlx.core as mx

    from engine.model.adapters import AdapterError, apply_lora
    from engine.model.loading import ModelLoadError, load_model
    try:
        model, tokenizer, info = load_model(cfg.model, lambda what, f: emit(ev.Phase(what, 0.4 * f)))
    except ModelLoadError as exc:
        raise TrainingError(str(exc), "model") from None
    check_stop(control)
    mx.random.seed(cfg.training.seed)
    # The preference methods train without dropout, as TRL does: its noise would show up as reward.
    lora = cfg.lora if cfg.training.method == "sft" else dataclasses.replace(cfg.lora, dropout=0.0)
    try:
        adapter_config = apply_lora(model, lora)
        if cfg.training.init_adapter:
            _start_from(model, cfg.training.init_adapter, adapter_config)
    except AdapterError as exc:
        raise TrainingError(str(exc), "config") from None
    if info.quantized and mx.default_device() == mx.gpu:  # QLoRA: bf16 speed, 4-bit memory (see qlora.py)
        from engine.model.qlora import dequantize_just_in_time
        dequantize_just_in_time(model)
    return model, tokenizer, info, adapter_config


def _tokenize(cfg: Config, tokenizer, emit: ev.Listener, control: RunControl) -> PreparedData:
    """The dataset validated, tokenized and split: 45-90% of the preparation's progress."""
    from engine.data import DatasetError, prepare_dataset
    name = "tokenizing the dataset"
    emit(ev.Phase(name, 0.45))
    try:
        data = prepare_dataset(cfg, tokenizer, progress=lambda d, n: emit(ev.Phase(name, 0.45 + 0.45 * d / n)),
                               should_stop=lambda: control.stop_requested)
    except DatasetError as exc:
        check_stop(control)  # a dataset cut short by a stop is not a bad dataset
        raise TrainingError(str(exc), "data") from None
    check_stop(control)
    return data


def _build_cpu_kernels(emit: ev.Listener) -> None:
    """A machine's first CPU run compiles the step's C++ primitives (engine/native/, ~5 s each): named as a
    phase, not a silent wait before the first step."""
    from engine.model import cpu_kernels
    if cpu_kernels.to_build():
        emit(ev.Phase("building the CPU kernels (once per machine)", 0.9))
    cpu_kernels.prepare()


def _estimate_memory(cfg: Config, model, info: LoadedModelInfo, data: PreparedData, lengths: list[int],
                     trainable: int, warn: Callable[[str], None]) -> MemoryEstimate | None:
    """Warn before the first step when the worst batch (the longest rows, the most trained tokens) is
    not expected to fit in memory."""
    from mlx.utils import tree_flatten

    from engine.model.memory import AdapterPlacement, ModelShape, available_bytes, estimate_step_memory
    from engine.train.losses import estimated_logit_rows
    from engine.train.batches import PAD_MULTIPLE
    try:
        shape = ModelShape.of(model)
    except AttributeError:  # an architecture without the usual ModelArgs: no estimate
        return None
    t = cfg.training
    length = min(-(-max(lengths) // PAD_MULTIPLE) * PAD_MULTIPLE, cfg.model.max_seq_length)
    trained = max(float(e.encoded.trained[:length].mean()) for e in data.train)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    act_bytes = 4 if info.dtype == "float32" else 2
    # DPO and ORPO put both answers of each pair in the micro-batch; KTO's z0 forward has as many rows as its step
    # (its logits, all at once, are why estimated_logit_rows counts KTO's whole)
    rows = t.batch_size * (2 if t.method in ("dpo", "orpo") else 1)
    logit_rows = estimated_logit_rows(model, act_bytes, t.grad_checkpoint, t.method)
    estimate = estimate_step_memory(shape, weights, trainable, rows, length, trained, t.grad_checkpoint, act_bytes,
                                    placement=AdapterPlacement.of(model, t.grad_checkpoint), quantized=info.quantized,
                                    logit_rows=logit_rows)
    available = available_bytes()
    if estimate.total > available:
        warn(f"memory: a step on the longest batch ({rows} x {length} tokens) is estimated to "
             f"need {estimate.describe()}, but {available / 1e9:.1f} GB is available: lower "
             "training.batch_size or model.max_seq_length, or turn on training.grad_checkpoint")
    return estimate


def _start_from(model, init_adapter: str, adapter_config: dict) -> None:
    """training.init_adapter's weights into the fresh adapters (their lora settings must match)."""
    from engine.model.adapters import AdapterError, adapter_folder, load_adapter_weights, read_saved_adapter
    folder = adapter_folder(init_adapter)
    saved, _ = read_saved_adapter(folder)  # its config's values and a whole file of finite numbers
    ours = adapter_config
    for key in ("fine_tune_type", "num_layers"):
        if saved.get(key, "lora" if key == "fine_tune_type" else None) != ours.get(key):
            raise AdapterError(f"training.init_adapter: {folder} has {key} {saved.get(key)!r}, this run "
                               f"{ours.get(key)!r}: set the lora.* settings to the adapter's (its adapter_config.json)")
    for key in ("rank", "scale"):
        if saved["lora_parameters"][key] != ours["lora_parameters"][key]:
            raise AdapterError(f"training.init_adapter: {folder} has {key} {saved['lora_parameters'][key]!r}, this "
                               f"run {ours['lora_parameters'][key]!r}: set lora.rank and lora.alpha to the adapter's")
    try:
        load_adapter_weights(model, folder)
    except AdapterError as exc:
        raise AdapterError(f"training.init_adapter: {exc}: set the lora.* settings to the adapter's "
                           f"(its adapter_config.json)") from None


def _objective(cfg: Config, model, pad_id: int, data: PreparedData) -> PreferenceObjective:
    from engine.train.objective import PreferenceObjective
    from engine.train.preference_batches import PreferenceRows
    rows = [PreferenceRows(cfg.training.method, part, cfg.model.max_seq_length, cfg.training.seed)
            for part in (data.train, data.valid)]
    return PreferenceObjective(cfg, model, pad_id, *rows)


def _score_reference(cfg: Config, objective: PreferenceObjective, checkpoint: Path | None, state: TrainerState,
                     lengths: list[int], global_batch: int, ranks: int, emit: ev.Listener,
                     control: RunControl) -> None:
    """The reference log-probs of every row the run will reach (90-100% of the preparation): a resumed
    run's from its checkpoint, any it never scored (a longer run) with the reference restored."""
    from engine.train.preference_batches import rows_ahead
    from engine.train.reference import load_reference, score_rows
    from engine.train.validation import validation_batches
    t = cfg.training
    if checkpoint is not None:
        load_reference(objective, checkpoint)
    train = rows_ahead(lengths, global_batch, t.seed, cfg.data.shuffle, state.epoch, state.pos, state.order,
                       (state.total_steps - state.step) * t.grad_accumulation)
    valid_lengths = [objective.splits["valid"].length(i) for i in range(len(objective.splits["valid"]))]
    valid = sorted({i for b in validation_batches(valid_lengths, t.batch_size * ranks,
                                                  cfg.evaluation.val_batches) for i in b})
    name = "reference log-probs"
    for split, rows, lo in (("train", train, 0.9), ("valid", valid, 0.98)):
        span = 0.08 if split == "train" else 0.02
        score_rows(objective, split, rows, t.init_adapter, 2 * t.batch_size,
                   lambda f, lo=lo, span=span: emit(ev.Phase(name, lo + span * f)),
                   lambda: control.stop_requested)
