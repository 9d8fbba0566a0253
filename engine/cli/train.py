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
              "the samples cut short", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def eval_only(cfg, args) -> int:
    """Validation loss/perplexity and the held-out behaviour metric, base against adapter."""
    from engine.model.adapters import adapters_disabled
    from engine.data import prepare_dataset
    from engine.train.validation import perplexity, validation_loss
    from engine.evaluate.tool_calls import load_heldout, tool_call_score
    from engine.model.adapters import load_with_adapter
    if not args.resume:
        raise UsageError("--eval-only needs --resume PATH: the adapter or checkpoint folder to evaluate")
    heldout = load_heldout(cfg.evaluation.heldout_path, args.heldout_limit) if cfg.evaluation.heldout_path else []
    model, tokenizer, _ = load_with_adapter(cfg, _eval_target(cfg, args.resume))
    data = prepare_dataset(cfg, tokenizer)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    result = {}
    for name in ("base", "adapter"):
        def measure():
            loss = validation_loss(model, data.valid, cfg.training.batch_size, pad, cfg.model.max_seq_length,
                                   cfg.evaluation.val_batches)
            out = {"val_loss": loss, "perplexity": perplexity(loss)}
            if heldout:
                out["tool_calls"] = tool_call_score(model, tokenizer, heldout).to_dict()
            return out
        if name == "base":
            with adapters_disabled(model):
                result[name] = measure()
        else:
            result[name] = measure()
    print(json.dumps(result, indent=2))
    return EXIT_OK


def _eval_target(cfg, resume: str):
    """What --eval-only evaluates: a folder as given, or for `latest` the run of output.run_name (its adapter/)."""
    from pathlib import Path

    if resume != "latest":
        return resume
    if not cfg.output.run_name:
        raise UsageError("--eval-only --resume latest needs output.run_name (or --run-name): which run?")
    return Path(cfg.output.dir).expanduser() / cfg.output.run_name
