"""The headless `validate`, `import-model`, `config`, `chat` and `fuse` commands."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from engine.cli.args import UsageError, load_cfg, print_err, progress_printer
from engine.cli.exit_codes import EXIT_DATA, EXIT_OK, EXIT_TRAINING


def cmd_validate(args) -> int:
    from engine.data import method_use, validate_with_config
    from engine.model.loading import load_tokenizer
    cfg = load_cfg(args)
    tokenizer = None if args.no_tokenize else load_tokenizer(cfg.model, progress_printer("model"))
    show = progress_printer("validating")
    report, _ = validate_with_config(cfg, tokenizer, progress=lambda d, t: show(f"{d / t:.0%}", d / t))
    if args.json:
        print(json.dumps(report.to_dict() | {"issue_list": [i.__dict__ for i in report.issues]}, indent=2))
    else:
        shown = report.issues[: args.max_issues]
        for issue in shown:
            print(f"{issue.source or report.path}:{replace(issue, source='')}"
                  + ("" if issue.severity == "error" else " (warning)"))
        if report.issue_count > len(shown):
            print(f"... and {report.issue_count - len(shown)} more")
        for line in report.shape_lines():
            print(line)
        print(report.summary())
        if tokenizer is not None and not report.failed:  # what each training method would use
            uses = method_use(report, cfg.data.train_labels)
            print("training.method " + cfg.training.method + ": " + uses[cfg.training.method] + "; others: "
                  + "; ".join(line for m, line in uses.items() if m != cfg.training.method and m != "orpo"))
        for warning in report.warnings:  # e.g. the file changed while it was read
            print(f"{report.path}: warning: {warning}")
    if report.failed:
        for part in report.parts or [report]:
            if part.failed or not report.parts:
                print_err(rejection(part))
        return EXIT_DATA
    return EXIT_OK


def rejection(report) -> str:
    """Why a dataset is refused, in one line."""
    if report.unread:
        return f"{report.path}: dataset rejected: the read stopped at {report.unread}"
    if not report.records:
        return f"{report.path}: no conversations in the file"
    return (f"{report.path}: dataset rejected: {report.error_lines} of {report.records} {report.unit}s are bad "
            f"({report.error_rate:.1%}; data.error_threshold is {report.error_threshold:.0%})")


def cmd_import_model(args) -> int:
    from engine.model.loading import check_folder, resolve_model_path
    cfg = load_cfg(args)
    path = resolve_model_path(cfg.model, progress_printer("model"))
    check_folder(path)  # a folder printed here must be one that loads
    print(path)
    return EXIT_OK


def cmd_config(args) -> int:
    from engine.config.loading import to_yaml
    cfg = load_cfg(args)
    print(to_yaml(cfg), end="")
    return EXIT_OK


def cmd_chat(args) -> int:
    from engine.data.template import EncodeError
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
    from engine.data.encode import ChatEncoder
    from engine.data.template import EncodeError
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


def cmd_fuse(args) -> int:
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
