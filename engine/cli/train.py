"""The headless `train` command, and `train --eval-only`."""

from __future__ import annotations

import json
import signal
import sys

from engine.cli.args import UsageError, load_cfg
from engine.cli.exit_codes import EXIT_CONFIG, EXIT_DATA, EXIT_INTERRUPTED, EXIT_MODEL, EXIT_OK, EXIT_TRAINING
from engine.train.run_log import describe


def cmd_train(args) -> int:
    from engine.train.control import RunControl
    from engine.train.run import TrainingRun
    cfg = load_cfg(args)
    if args.iterations is not None:
        cfg.training.iterations = args.iterations
    if args.run_name:
        cfg.output.run_name = args.run_name
    if args.method:
        cfg.training.method = args.method
    if args.init_adapter:
        cfg.training.init_adapter = args.init_adapter
    if args.eval_only:
        return eval_only(cfg, args)
    control = RunControl()
    interrupted = {"n": 0}

    def on_signal(signum, frame):
        interrupted["n"] += 1
        if interrupted["n"] > 1:
            print("\nlora-tui: second interrupt: quitting without saving", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED)
        print(f"\nlora-tui: {signal.Signals(signum).name}: saving a checkpoint, then stopping "
              "(interrupt again to quit at once)", file=sys.stderr, flush=True)
        control.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def printer(event):
        line = describe(event)
        if line:
            print(line, flush=True)
        elif event.kind == "Phase" and sys.stderr.isatty():
            print(f"\r{event.name} [{event.fraction:4.0%}]\033[K", end="", file=sys.stderr, flush=True)

    try:
        result = TrainingRun(cfg, [printer], control, resume=args.resume, stop_after=args.stop_after,
                             overwrite=args.overwrite).run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if result.status == "failed":
        print(f"lora-tui: error: {result.message}", file=sys.stderr)
        return {"config": EXIT_CONFIG, "checkpoint": EXIT_CONFIG, "data": EXIT_DATA,
                "model": EXIT_MODEL}.get(result.error_kind, EXIT_TRAINING)
    if result.status == "stopped" and interrupted["n"]:
        print(f"lora-tui: {result.message}" if result.message else  # stopped before training: nothing to resume
              f"lora-tui: stopped at step {result.step}; resume with: lora-tui train --resume {result.run_dir}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if interrupted["n"]:  # during the end-of-run samples: training had finished
        print(f"lora-tui: interrupted after the last step: the adapter and report in {result.run_dir} are saved, "
              "the samples or the held-out evaluation cut short", file=sys.stderr)
        return EXIT_INTERRUPTED
    evaluation = (result.report or {}).get("evaluation") or {}
    if evaluation.get("metrics"):
        from engine.evaluate.compare import table
        print(f"held-out evaluation ({evaluation['items']} items of {evaluation['heldout']}):\n"
              + table(evaluation["metrics"]), flush=True)
    return EXIT_OK


def eval_only(cfg, args) -> int:
    """Validation loss/perplexity and the held-out metrics, base against tuned: one table on stdout, and the
    held-out block in the run's report.json ("evaluation") when the adapter belongs to a run."""
    from engine.data import prepare_dataset
    from engine.evaluate.compare import compare, load_heldout, table
    from engine.model.adapters import adapter_folder, adapters_disabled, load_with_adapter
    from engine.train.validation import perplexity, validation_loss
    if not args.resume:
        raise UsageError("--eval-only needs --resume PATH: the adapter or checkpoint folder to evaluate")
    # The held-out file (and a schema file) first: a bad row fails before a long model load.
    items, options = load_heldout(cfg, args.heldout_limit) if cfg.evaluation.heldout_path else ([], None)
    target = _eval_target(cfg, args.resume)
    model, tokenizer, _ = load_with_adapter(cfg, target)
    data = prepare_dataset(cfg, tokenizer)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id

    def val_loss():
        return validation_loss(model, data.valid, cfg.training.batch_size, pad, cfg.model.max_seq_length,
                               cfg.evaluation.val_batches)
    with adapters_disabled(model):
        base = val_loss()
    tuned = val_loss()
    rows = {"val_loss": {"base": base, "tuned": tuned},
            "perplexity": {"base": perplexity(base), "tuned": perplexity(tuned)}}
    block = compare(model, tokenizer, items, cfg, options, progress=_progress) if items else None
    if block is not None:
        block["adapter"] = str(adapter_folder(target))
        rows |= block["metrics"]
    print(table(rows), flush=True)
    if block is not None:
        _into_report(target, block)
    return EXIT_OK


def _progress(which: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\rheld-out answers, {which}: {done}/{total}\033[K", end="" if done < total else "\n",
              file=sys.stderr, flush=True)


def _into_report(target, block: dict) -> None:
    """The block as report.json's "evaluation", in the run folder the evaluated adapter belongs to (the run
    itself, its adapter/, or one of its checkpoints/step_*); a lone adapter has no report to write to."""
    from pathlib import Path

    from engine import atomic
    folder = Path(target).expanduser()
    run = folder.parent if folder.name == "adapter" else folder.parent.parent \
        if folder.parent.name == "checkpoints" else folder
    report = run / "report.json"
    if not report.is_file():
        return
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        print(f"lora-tui: {report}: not updated: unreadable ({exc})", file=sys.stderr)
        return
    atomic.write_json(report, data | {"evaluation": block})
    print(f"evaluation written to {report}", file=sys.stderr)


def _eval_target(cfg, resume: str):
    """What --eval-only evaluates: a folder as given, or for `latest` the run of output.run_name (its adapter/)."""
    from pathlib import Path

    if resume != "latest":
        return resume
    if not cfg.output.run_name:
        raise UsageError("--eval-only --resume latest needs output.run_name (or --run-name): which run?")
    return Path(cfg.output.dir).expanduser() / cfg.output.run_name
