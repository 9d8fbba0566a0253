"""`lora-tui init [DIR]`: a folder ready to run, with the default config.yaml and the sample task's data.

Nothing is ever overwritten: a file already there is kept, named, and skipped, and the others are written
(each atomically, and only where nothing exists, engine.atomic.create). So `init` in a folder that has its
own config.yaml still adds the sample data, and a second `init` restores only what was deleted.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.cli.args import UsageError
from engine.cli.exit_codes import EXIT_OK

WHAT = {"config.yaml": "the default settings, every key with its help",
        "data/tool_calls.jsonl": "the sample task: tool-calling conversations (data.path)",
        "data/heldout.jsonl": "held-out prompts with their expected calls (evaluation.heldout_path)",
        "data/heldout_answers.jsonl": "held-out final-answer items (the sample task's faithfulness score)"}


def sample_files() -> dict[str, bytes]:
    """{relative path: bytes} of what init writes: config.yaml is the built-in defaults (the repository's
    config.yaml is exactly these), the data files are the package's samples."""
    from engine.config.loading import to_yaml
    from engine.config.schema import Config
    from engine.samples import DATA, sample_path
    files = {"config.yaml": to_yaml(Config()).encode("utf-8")}
    for name in DATA:
        files[name] = sample_path(name).read_bytes()
    return files


def cmd_init(args) -> int:
    from engine import atomic
    if getattr(args, "config", None):
        raise UsageError("init: --config does not apply: init writes DIR/config.yaml (the defaults)")
    folder = Path(args.dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"init: {folder} is not a folder")
    try:
        files = sample_files()
    except FileNotFoundError as exc:
        raise UsageError(f"init: {exc}") from None
    wrote, kept = [], []
    for name, data in files.items():
        try:
            (wrote if atomic.create(folder / name, data) else kept).append(name)
        except OSError as exc:
            raise UsageError(f"init: cannot write {folder / name}: {exc.strerror or exc}") from None
    where = "this folder" if folder.resolve() == Path.cwd().resolve() else str(folder)
    width = max(map(len, files))
    if wrote:
        print(f"Wrote in {where}:")
        for name in wrote:
            print(f"  {name:<{width}}  {WHAT[name]}")
    if kept:
        print(f"Kept (already there, not overwritten): {', '.join(kept)}")
    print("Next:")
    if where != "this folder":
        print(f"  cd {_quoted(str(folder))}")
    print("  lora-tui validate   check the sample data (every bad line, token lengths)")
    print("  lora-tui            open the app (F1 config, F2 dataset, F3 train, F4 chat)")
    print("  lora-tui train      fine-tune headless")
    return EXIT_OK


def _quoted(path: str) -> str:
    import shlex
    return shlex.quote(path) if os.name != "nt" else f'"{path}"'
