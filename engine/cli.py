"""Headless command line: `lora-tui train|validate|chat|fuse|config|import-model`.

A user's mistake ends in one line on stderr and a documented exit code, never a traceback:
  0 ok · 1 unexpected failure · 2 bad usage or config (also `fuse --out` onto an existing file or folder) ·
  3 bad dataset · 4 model or adapter cannot be loaded (also an adapter with NaN/inf values or scale) ·
  5 training failed (diverged, disk full; the last good checkpoint is kept), or a fused model came out wrong ·
  130 interrupted (Ctrl+C or SIGTERM; a checkpoint was saved first)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_DATA, EXIT_MODEL, EXIT_TRAINING, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
DEFAULT_CONFIG = "config.yaml"


class UsageError(Exception):
    pass


def _print_err(msg: str) -> None:
    print(f"lora-tui: error: {msg}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in our one-line form, under its usage line (exit code 2)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        _print_err(f"{command}{message} (see {self.prog} --help)")
        raise SystemExit(EXIT_CONFIG)


def config_value(path: str):
    """An argparse type for an option that overrides (or mirrors) config field `path`: the same type and
    valid range, so `--iterations -5` is refused as `training.iterations: -5` would be."""
    from engine.config import SPECS, check_range, coerce
    spec = SPECS[path]

    def parse(text: str):
        value, err = coerce(spec, text)
        err = err or check_range(spec, value)
        if err:
            raise argparse.ArgumentTypeError(f"{err} (as {path})")
        return value
    return parse


def whole_number(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is out of range (valid: x >= {minimum})")
        return value
    return parse


def _load_cfg(args):
    from engine.config import load_config
    path = args.config
    if path is None:
        path = DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None
    cfg, issues = load_config(path)
    for issue in issues:
        if issue.severity == "warning":
            print(f"lora-tui: {issue}", file=sys.stderr)
    if getattr(args, "dataset", None):
        cfg.data.path = args.dataset
    return cfg


def _progress_printer(prefix: str):
    state = {"last": -1}
    if not sys.stderr.isatty():
        return lambda what, frac=None: None

    def show(what, frac=None):
        pct = int((frac or 0) * 100)
        if pct != state["last"]:
            state["last"] = pct
            print(f"\r{prefix}: {what} [{pct:3d}%]\033[K", end="", file=sys.stderr, flush=True)
            if pct >= 100:
                print(file=sys.stderr)
    return show


def cmd_validate(args) -> int:
    from engine.data import validate_with_config
    from engine.model.loading import load_tokenizer
    cfg = _load_cfg(args)
    tokenizer = None if args.no_tokenize else load_tokenizer(cfg.model, _progress_printer("model"))
    show = _progress_printer("validating")
    report, _ = validate_with_config(cfg, tokenizer,
                                     progress=lambda d, t: show(f"{d / 1e6:.1f}/{t / 1e6:.1f} MB", d / t))
    if args.json:
        print(json.dumps(report.to_dict() | {"issue_list": [i.__dict__ for i in report.issues]}, indent=2))
    else:
        shown = report.issues[: args.max_issues]
        for issue in shown:
            print(f"{report.path}:{issue}" + ("" if issue.severity == "error" else " (warning)"))
        if report.issue_count > len(shown):
            print(f"... and {report.issue_count - len(shown)} more")
        print(report.summary())
        for warning in report.warnings:  # e.g. the file changed while it was read
            print(f"{report.path}: warning: {warning}")
    if report.failed:
        _print_err(f"{report.path}: dataset rejected: {report.error_lines} of {report.records} lines are bad "
                   f"({report.error_rate:.1%}; data.error_threshold is {report.error_threshold:.0%})"
                   if report.records else f"{report.path}: no conversations in the file")
        return EXIT_DATA
    return EXIT_OK


def cmd_import_model(args) -> int:
    from engine.model.loading import check_folder, resolve_model_path
    cfg = _load_cfg(args)
    path = resolve_model_path(cfg.model, _progress_printer("model"))
    check_folder(path)  # a folder printed here must be one that loads
    print(path)
    return EXIT_OK


def cmd_config(args) -> int:
    from engine.config import to_yaml
    cfg = _load_cfg(args)
    print(to_yaml(cfg), end="")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="lora-tui", description="LoRA fine-tuning on MLX, from one terminal "
                                 "screen. With no command, opens the app.")
    ap.add_argument("--config", "-c", help="YAML config (default: ./config.yaml if present, else built-in defaults)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    v = sub.add_parser("validate", help="validate and tokenize the dataset; list every bad line")
    v.add_argument("--dataset", "-d", help="JSONL file (default: data.path from the config)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--no-tokenize", action="store_true", help="check structure only (no tokenizer needed)")
    v.add_argument("--max-issues", type=whole_number(0), default=50, help="issues to print (default 50)")
    v.set_defaults(func=cmd_validate)
    m = sub.add_parser("import-model", help="resolve/import the configured model and print its directory")
    m.set_defaults(func=cmd_import_model)
    from engine.cli_train import add_commands
    add_commands(sub, _load_cfg)
    c = sub.add_parser("config", help="print the effective config (file + environment overrides) as YAML")
    c.set_defaults(func=cmd_config)
    ap.commands = frozenset(sub.choices)  # the words that run headless instead of opening the app (tui/cli.py)
    return ap


def run(argv: list[str] | None = None) -> int:
    """Run a headless command; map every expected failure to one line and an exit code."""
    from engine.config import ConfigError
    from engine.data import DatasetError
    from engine.model.loading import ModelLoadError

    from engine.export.fuse import FuseCheckError, FuseError, FuseTargetError
    AdapterError = _adapter_error()
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its usage line
        return EXIT_CONFIG if exc.code else EXIT_OK
    if not getattr(args, "func", None):
        ap.print_help()
        return EXIT_CONFIG
    try:
        return args.func(args)
    except ConfigError as exc:
        for issue in exc.issues:
            if issue.severity == "error":
                _print_err(f"{exc.source}: {issue.field + ': ' if issue.field else ''}{issue.message}"
                           if exc.source and exc.source not in issue.message else
                           f"{issue.field + ': ' if issue.field else ''}{issue.message}")
        return EXIT_CONFIG
    except DatasetError as exc:
        _print_err(str(exc))
        return EXIT_DATA
    except FuseTargetError as exc:  # --out unusable: bad usage
        _print_err(str(exc))
        return EXIT_CONFIG
    except FuseCheckError as exc:  # the fused model came out wrong
        _print_err(str(exc))
        return EXIT_TRAINING
    except (ModelLoadError, FuseError, AdapterError) as exc:
        _print_err(str(exc))
        return EXIT_MODEL
    except UsageError as exc:
        _print_err(str(exc))
        return EXIT_CONFIG
    except KeyboardInterrupt:
        _print_err("interrupted")
        return EXIT_INTERRUPTED


def _adapter_error():
    from engine.model.adapters import AdapterError
    return AdapterError


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))
