"""Headless command line: `lora-tui init|train|validate|chat|fuse|export|import-adapter|config|import-model`
(exit codes: exit_codes.py). `--config/-c` is taken before the command and after it, `--version` before."""

from __future__ import annotations

import argparse
import sys

from engine.cli.args import (Parser, UsageError, VersionAction, argparse_suppress, config_value, print_err,
                             whole_number)
from engine.cli.commands import cmd_chat, cmd_config, cmd_fuse, cmd_import_model, cmd_validate
from engine.cli.exit_codes import EXIT_CONFIG, EXIT_DATA, EXIT_INTERRUPTED, EXIT_MODEL, EXIT_OK, EXIT_TRAINING
from engine.cli.export import cmd_export, cmd_import_adapter
from engine.cli.init import cmd_init
from engine.cli.train import cmd_train
from engine.export.formats import FORMATS
from engine.export.gguf import QUANTS


CONFIG_HELP = "YAML config (default: ./config.yaml if present, else built-in defaults)"


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="lora-tui", description="LoRA fine-tuning on MLX, from one terminal "
                                 "screen. With no command, opens the app.")
    ap.add_argument("--config", "-c", help=CONFIG_HELP)
    ap.add_argument("--version", action=VersionAction, help="print lora-tui's version and exit")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    n = sub.add_parser("init", help="write config.yaml and the sample data into a folder (never over a file)")
    n.add_argument("dir", nargs="?", default=".", metavar="DIR", help="the folder (default: this one)")
    n.set_defaults(func=cmd_init)
    v = sub.add_parser("validate", help="validate and tokenize the dataset; list every bad line")
    v.add_argument("--dataset", "-d", help="a dataset file, folder or hub id; several: "
                   "a.jsonl*0.7,b.csv*0.3 (default: data.path)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--no-tokenize", action="store_true", help="check structure only (no tokenizer needed)")
    v.add_argument("--max-issues", type=whole_number(0), default=50, help="issues to print (default 50)")
    v.set_defaults(func=cmd_validate)
    m = sub.add_parser("import-model", help="resolve/import the configured model and print its directory")
    m.set_defaults(func=cmd_import_model)
    t = sub.add_parser("train", help="fine-tune headless, printing progress; Ctrl+C saves and stops")
    t.add_argument("--dataset", "-d", help="a dataset file, folder or hub id; several: "
                   "a.jsonl*0.7,b.csv*0.3 (default: data.path)")
    t.add_argument("--resume", help="a checkpoint folder, a run folder, or 'latest' (with output.run_name)")
    t.add_argument("--eval-only", action="store_true", help="evaluate --resume's adapter against the base")
    t.add_argument("--iterations", type=config_value("training.iterations"), help="override training.iterations")
    t.add_argument("--run-name", help="override output.run_name")
    t.add_argument("--method", type=config_value("training.method"), help="override training.method: sft, kto, "
                   "dpo or orpo")
    t.add_argument("--init-adapter", help="start from this adapter, checkpoint or run folder (training.init_adapter;"
                   " e.g. SFT first, then --method kto on top)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the run folder (its checkpoints, adapter and report)")
    t.add_argument("--stop-after", type=whole_number(1), help=argparse_suppress())
    t.add_argument("--heldout-limit", type=whole_number(1), default=None,
                   help="with --eval-only: first N held-out prompts")
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("chat", help="a plain terminal chat with the base model or an adapter")
    c.add_argument("--adapter", help="adapter, checkpoint or run folder (default: the base model)")
    c.add_argument("--system", help="a system prompt")
    c.add_argument("--max-tokens", type=config_value("evaluation.max_tokens"), default=256)
    c.add_argument("--temperature", type=config_value("evaluation.temperature"), default=0.7)
    c.add_argument("--top-p", type=config_value("evaluation.top_p"), default=0.9)
    c.set_defaults(func=cmd_chat)
    f = sub.add_parser("fuse", help="merge an adapter into the base: a model folder mlx_lm.load opens")
    f.add_argument("--adapter", required=True, help="adapter, checkpoint or run folder")
    f.add_argument("--out", required=True, help="new folder for the fused model (absent or empty)")
    f.set_defaults(func=cmd_fuse)
    e = sub.add_parser("export", help="base + adapter as GGUF (llama.cpp, LM Studio), an Ollama folder, a PEFT "
                       "adapter or a fused MLX model")
    e.add_argument("--adapter", help="adapter, checkpoint or run folder (gguf/ollama without it: the base alone)")
    e.add_argument("--to", required=True, choices=FORMATS, help="gguf, ollama, peft or mlx")
    e.add_argument("--quant", help=f"GGUF type: {', '.join(QUANTS)} (default q8_0)")
    e.add_argument("--out", required=True, help="the new file (gguf) or folder (ollama, peft, mlx)")
    e.set_defaults(func=cmd_export)
    i = sub.add_parser("import-adapter", help="a PEFT adapter (PEFT, TRL, Unsloth) as ours: chat with it or "
                       "continue training it (training.init_adapter)")
    i.add_argument("peft_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    i.add_argument("--out", required=True, help="new folder for the adapter")
    i.set_defaults(func=cmd_import_adapter)
    c = sub.add_parser("config", help="print the effective config (file + environment overrides) as YAML")
    c.set_defaults(func=cmd_config)
    for name, command in sub.choices.items():
        # The global option after the command too (`lora-tui train --config x.yaml`); SUPPRESS: when it is
        # not given there, the value given before the command (or None) is kept, not overwritten. (init
        # reads no config: it refuses one, in one line, and its help leaves it out.)
        command.add_argument("--config", "-c", default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS if name == "init" else CONFIG_HELP)
    ap.commands = frozenset(sub.choices)  # the words that run headless instead of opening the app (tui/cli.py)
    return ap


def run(argv: list[str] | None = None) -> int:
    """Run a headless command; map every expected failure to one line and an exit code."""
    from engine.config.schema import ConfigError
    from engine.data import DatasetError
    from engine.model.loading import ModelLoadError
    from engine.export.fuse import FuseCheckError, FuseError, FuseTargetError
    from engine.model.adapters import AdapterError
    from engine.export.errors import ExportError, ExportUsageError
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
                print_err(f"{exc.source}: {issue.field + ': ' if issue.field else ''}{issue.message}"
                          if exc.source and exc.source not in issue.message else
                          f"{issue.field + ': ' if issue.field else ''}{issue.message}")
        return EXIT_CONFIG
    except DatasetError as exc:
        print_err(str(exc))
        return EXIT_DATA
    except (FuseTargetError, ExportUsageError) as exc:  # --out unusable: bad usage
        print_err(str(exc))
        return EXIT_CONFIG
    except FuseCheckError as exc:  # the fused model came out wrong
        print_err(str(exc))
        return EXIT_TRAINING
    except (ModelLoadError, FuseError, AdapterError, ExportError) as exc:
        print_err(str(exc))
        return EXIT_MODEL
    except UsageError as exc:
        print_err(str(exc))
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print_err("interrupted")
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))
