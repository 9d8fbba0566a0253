"""Headless `train`, `chat` and `fuse` commands (registered by engine.cli)."""

from __future__ import annotations

import json
import signal
import sys

from engine.train.run_log import describe


def cmd_train(args, load_cfg) -> int:
    from engine.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_TRAINING
    from engine.train.control import RunControl
    from engine.train.run import TrainingRun
    cfg = load_cfg(args)
    if args.iterations is not None:
        cfg.training.iterations = args.iterations
    if args.run_name:
        cfg.output.run_name = args.run_name
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
        from engine.cli import EXIT_CONFIG, EXIT_DATA, EXIT_MODEL
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
    from engine.cli import EXIT_OK, UsageError
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

    from engine.cli import UsageError
    if resume != "latest":
        return resume
    if not cfg.output.run_name:
        raise UsageError("--eval-only --resume latest needs output.run_name (or --run-name): which run?")
    return Path(cfg.output.dir).expanduser() / cfg.output.run_name


def cmd_chat(args, load_cfg) -> int:
    from engine.cli import EXIT_OK, UsageError
    from engine.data.encode import EncodeError
    from engine.generate.decoding import PromptCache, load_for_chat
    from engine.generate.reply import GenerationSettings, stream_reply
    cfg = load_cfg(args)
    if args.system and not _is_text(args.system):
        raise UsageError("--system: not UTF-8 text")
    model, tokenizer, _ = load_for_chat(cfg, args.adapter)
    _check_template(tokenizer, args.system)
    prompt_cache = PromptCache()
    settings = GenerationSettings(args.max_tokens, args.temperature, args.top_p)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {cfg.model.name}" + (f" + {args.adapter}" if args.adapter else "") +
              " — /reset clears, /quit or Ctrl+D leaves", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except UnicodeDecodeError:
            line = "\udcff"  # reported just below, like a line read with surrogateescape
        if not _is_text(line):  # bytes that are not UTF-8: the tokenizer cannot take them
            print("lora-tui: that line is not UTF-8 text: skipped", file=sys.stderr)
            continue
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        print("assistant> " if interactive else "", end="", flush=True)
        parts = []
        try:
            for chunk in stream_reply(model, tokenizer, history, settings, prompt_cache=prompt_cache):
                parts.append(chunk.text)
                print(chunk.text, end="", flush=True)
        except EncodeError as exc:  # the template refused this conversation: drop the turn, the chat goes on
            print(f"\nlora-tui: no answer: {exc}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": "".join(parts).strip()})
    return EXIT_OK


def _check_template(tokenizer, system: str | None) -> None:
    """A chat template that cannot render a first turn (it does not compile, say) fails every turn: say so
    once, as a model that cannot be used (exit 4), instead of once per line."""
    from engine.data.encode import ChatEncoder, EncodeError
    from engine.model.loading import ModelLoadError
    first = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "hi"}]
    try:
        ChatEncoder(tokenizer).prompt_text(first)
    except EncodeError as exc:
        raise ModelLoadError(f"model.name: {exc}") from None


def _is_text(text: str) -> bool:
    """False for a string holding lone surrogates (undecodable bytes read with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def cmd_fuse(args, load_cfg) -> int:
    from engine.cli import EXIT_OK, EXIT_TRAINING
    from engine.export.fuse import fuse
    cfg = load_cfg(args)
    result = fuse(cfg, args.adapter, args.out)
    print(json.dumps(result, indent=2))
    if not result["same_greedy_output"]:
        why = "gives NaN or infinite outputs" if not result["finite_output"] else \
            "does not reproduce base + adapter's greedy output"
        print(f"lora-tui: error: {result['path']}: the fused model {why}", file=sys.stderr)
        return EXIT_TRAINING
    return EXIT_OK


def add_commands(sub, load_cfg) -> None:
    t = sub.add_parser("train", help="fine-tune headless, printing progress; Ctrl+C saves and stops")
    t.add_argument("--dataset", "-d", help="JSONL file (default: data.path from the config)")
    t.add_argument("--resume", help="a checkpoint folder, a run folder, or 'latest' (with output.run_name)")
    t.add_argument("--eval-only", action="store_true", help="evaluate --resume's adapter against the base")
    from engine.cli import config_value, whole_number
    t.add_argument("--iterations", type=config_value("training.iterations"), help="override training.iterations")
    t.add_argument("--run-name", help="override output.run_name")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the run folder (its checkpoints, adapter and report)")
    t.add_argument("--stop-after", type=whole_number(1), help=argparse_suppress())
    t.add_argument("--heldout-limit", type=whole_number(1), default=None,
                   help="with --eval-only: first N held-out prompts")
    t.set_defaults(func=lambda a: cmd_train(a, load_cfg))
    c = sub.add_parser("chat", help="a plain terminal chat with the base model or an adapter")
    c.add_argument("--adapter", help="adapter, checkpoint or run folder (default: the base model)")
    c.add_argument("--system", help="a system prompt")
    c.add_argument("--max-tokens", type=config_value("evaluation.max_tokens"), default=256)
    c.add_argument("--temperature", type=config_value("evaluation.temperature"), default=0.7)
    c.add_argument("--top-p", type=config_value("evaluation.top_p"), default=0.9)
    c.set_defaults(func=lambda a: cmd_chat(a, load_cfg))
    f = sub.add_parser("fuse", help="merge an adapter into the base: a model folder mlx_lm.load opens")
    f.add_argument("--adapter", required=True, help="adapter, checkpoint or run folder")
    f.add_argument("--out", required=True, help="new folder for the fused model (absent or empty)")
    f.set_defaults(func=lambda a: cmd_fuse(a, load_cfg))


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS
