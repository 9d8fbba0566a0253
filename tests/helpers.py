"""What the tests share: the repository root, tiny datasets, one tiny training config, and the `lora-tui`
command line (in-process, or as a child process where the real console entry point is the subject)."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from engine.cli.main import run
from engine.config.loading import save_config
from engine.config.schema import Config

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


# ---------------------------------------------------------------------------------------------- tiny datasets

def addition_chats(n: int = 40, *, seed: int = 1, system: str | None = None,
                   undesirable_every: int = 0) -> list[dict]:
    """Short "a+b" conversations, so that a step on the embedded model takes well under a second on 2 cores;
    with `undesirable_every=k`, rows 0, k, 2k, ... are labelled undesirable."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(1, 50, 2))
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": str(a + b)}]
        bad = undesirable_every > 0 and i % undesirable_every == 0
        rows.append({"messages": messages, "label": "undesirable" if bad else "desirable"})
    return rows


def increments(n: int = 40) -> list[dict]:
    """Prompt/completion rows "i+1" -> "i+1's value", the headless CLI tests' data."""
    return [{"prompt": f"{i}+1", "completion": str(i + 1)} for i in range(n)]


def write_jsonl(path: Path, records) -> Path:
    """One line per record; a str record is written as it is (a deliberately bad line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------------ tiny config

# A run of a few steps on the embedded model that still validates, checkpoints and evaluates on the way.
TINY = {
    "model": {"max_seq_length": 128},
    "lora": {"rank": 4, "num_layers": 2},
    "training": {"iterations": 4, "batch_size": 2, "grad_accumulation": 1, "warmup_steps": 1,
                 "learning_rate": 1e-3},
    "checkpoints": {"every_steps": 2},
    "evaluation": {"every_steps": 2, "val_batches": 1, "sample_prompts": [], "max_tokens": 4, "heldout_path": ""},
    "output": {"run_name": "run"},
}


def tiny_config(tmp_path: Path, **sections: dict) -> Config:
    """TINY's config with runs under `tmp_path/runs`, each keyword a section whose keys override TINY's:
    `tiny_config(tmp_path, training={"iterations": 8}, lora={"dropout": 0.1})`. Without a `data={"path": ...}`
    it trains on `tmp_path/tiny.jsonl`, written with `addition_chats()` unless it is already there."""
    cfg = Config()
    cfg.output.dir = str(tmp_path / "runs")
    for name in TINY.keys() | sections.keys():
        _override(cfg, name, TINY.get(name, {}) | sections.get(name, {}))
    if "path" not in sections.get("data", {}):
        data = tmp_path / "tiny.jsonl"
        if not data.exists():
            write_jsonl(data, addition_chats())
        cfg.data.path = str(data)
    return cfg


def _override(cfg: Config, section: str, values: dict) -> None:
    target = getattr(cfg, section)  # an unknown section or key is a typo in the test: fail loudly
    known = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in known:
            raise KeyError(f"{section}.{key} is not a config key")
        setattr(target, key, list(value) if isinstance(value, list) else value)


def tiny_yaml(tmp_path: Path, name: str = "tiny.yaml", **sections: dict) -> Path:
    """`tiny_config(tmp_path, **sections)` saved as `tmp_path/name`, for a `lora-tui --config` child."""
    path = tmp_path / name
    save_config(tiny_config(tmp_path, **sections), path)
    return path


def run_in_thread(cfg: Config, listeners) -> tuple[threading.Thread, "RunControl", list]:
    """A run on its own thread, as the TUI's worker runs it: (thread, control, [result once done]). The
    thread releases its MLX streams before it ends, as every thread that used MLX must."""
    from engine import release_mlx_streams
    from engine.train.control import RunControl
    from engine.train.run import TrainingRun
    control, box = RunControl(), []

    def target():
        try:
            box.append(TrainingRun(cfg, listeners, control).run())
        finally:
            release_mlx_streams()

    thread = threading.Thread(target=target, name="lora-tui-train", daemon=False)
    thread.start()
    return thread, control, box


# ---------------------------------------------------------------------------------------- the command line

def cli(capsys, *args, stdin: str = "") -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lora-tui ARGS` run in this process, with `stdin` as its standard
    input (empty: `chat` ends at once); no call may end in a traceback."""
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = run([str(a) for a in args])
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def one_error_line(err: str) -> str:
    """The failure's one `lora-tui: error:` line; there must be exactly one."""
    lines = [line for line in err.splitlines() if line.startswith("lora-tui: error:")]
    assert len(lines) == 1, err
    return lines[0]


def lora_tui_cmd(*args) -> list[str]:
    """The argv of the real console entry point, `python -m tui ARGS`."""
    return [sys.executable, "-m", "tui", *map(str, args)]


def lora_tui(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`lora-tui ARGS` as a child process in the repository root, its output captured as text."""
    return subprocess.run(lora_tui_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
