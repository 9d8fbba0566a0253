"""What every headless command shares: argparse with one-line errors and typed options, the usage error,
the config an invocation reads (file, environment, --dataset) and progress lines on stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.exit_codes import EXIT_CONFIG

DEFAULT_CONFIG = "config.yaml"


class UsageError(Exception):
    pass


def print_err(msg: str) -> None:
    print(f"lora-tui: error: {msg}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """argparse with its errors in our one-line form, under its usage line (exit code 2)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        print_err(f"{command}{message} (see {self.prog} --help)")
        raise SystemExit(EXIT_CONFIG)


def config_value(path: str):
    """An argparse type for an option that overrides (or mirrors) config field `path`: the same type and
    valid range, so `--iterations -5` is refused as `training.iterations: -5` would be."""
    from engine.config.schema import SPECS
    from engine.config.validation import check_range, coerce
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


def package_version() -> str:
    """lora-tui's version: the installed package's metadata, else (a clone run without installing it)
    pyproject.toml's `version`, else "unknown"."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lora-tui")
    except PackageNotFoundError:
        pass
    try:
        import tomllib
        with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


class VersionAction(argparse.Action):
    """`--version`: `lora-tui X.Y.Z` on stdout, exit 0 (the version is looked up only when asked for)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"lora-tui {package_version()}")
        parser.exit()


def load_cfg(args):
    from engine.config.loading import load_config
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


def progress_printer(prefix: str):
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




def argparse_suppress():
    return argparse.SUPPRESS
