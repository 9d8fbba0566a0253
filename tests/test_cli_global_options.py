"""The command line as the README writes it: `--config/-c` before and after every command, `--version`, and
the `lora-tui` entry point's choice between the app and a headless command."""

from __future__ import annotations

import json
import shlex
import tomllib
from importlib.metadata import PackageNotFoundError

import pytest

from engine.cli.main import build_parser
from helpers import ROOT, lora_tui, tiny_yaml

# The smallest valid line for each command (its required arguments), without --config.
MINIMAL = {
    "init": ["init"],
    "validate": ["validate"],
    "import-model": ["import-model"],
    "train": ["train"],
    "chat": ["chat"],
    "fuse": ["fuse", "--adapter", "runs/a", "--out", "fused"],
    "export": ["export", "--to", "gguf", "--out", "m.gguf"],
    "import-adapter": ["import-adapter", "peft-dir", "--out", "runs/imported"],
    "config": ["config"],
}


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_every_command_is_covered():
    assert set(MINIMAL) == build_parser().commands


@pytest.mark.parametrize("command", sorted(MINIMAL))
@pytest.mark.parametrize("flag", ["--config", "-c"])
def test_config_before_and_after_every_command(command, flag):
    line = MINIMAL[command]
    assert parse(*line).config is None
    assert parse(flag, "a.yaml", *line).config == "a.yaml"
    assert parse(*line, flag, "b.yaml").config == "b.yaml"
    assert parse(*line[:1], flag, "b.yaml", *line[1:]).config == "b.yaml"  # right after the command word
    assert parse(f"{flag}=c.yaml" if flag == "--config" else "-cc.yaml", *line).config == "c.yaml"
    assert parse(flag, "a.yaml", *line, flag, "b.yaml").config == "b.yaml"  # the later one wins
    assert parse(*line).command == command


# Each command line the README shows, as it writes it (placeholders filled in), with the config it names.
README_LINES = [
    ("lora-tui validate", None),
    ("lora-tui validate --dataset data/tool_calls.jsonl --json", None),
    ("lora-tui validate --config config.yaml", "config.yaml"),
    ("lora-tui train", None),
    ("lora-tui train --config config.yaml", "config.yaml"),
    ("lora-tui train --config config.yaml --dataset data/tool_calls.jsonl --resume latest --overwrite "
     "--method kto --init-adapter runs/sft", "config.yaml"),
    ("lora-tui train --method kto", None),
    ("lora-tui train --eval-only --resume runs/my-run", None),
    ("lora-tui --config config.yaml train --run-name big", "config.yaml"),
    ("lora-tui chat --adapter runs/my-run", None),
    ("lora-tui fuse --adapter runs/my-run --out fused", None),
    ("lora-tui export --adapter runs/my-run --to gguf --quant q8_0 --out my-model.gguf", None),
    ("lora-tui export --adapter runs/my-run --to ollama --out my-model/", None),
    ("lora-tui export --adapter runs/my-run --to peft --out my-adapter/", None),
    ("lora-tui export --adapter runs/my-run --to mlx --out my-fused/", None),
    ("lora-tui import-adapter trained-with-peft/ --out runs/imported", None),
    ("lora-tui config", None),
    ("lora-tui config --config other.yaml", "other.yaml"),
    ("lora-tui import-model", None),
    ("lora-tui init", None),
    ("lora-tui init my-project", None),
]


@pytest.mark.parametrize("line,config", README_LINES)
def test_readme_lines_parse(line, config):
    argv = shlex.split(line)
    assert argv[0] == "lora-tui"
    args = parse(*argv[1:])
    assert args.config == config
    assert args.command == next(word for word in argv[1:] if word in MINIMAL)


@pytest.mark.parametrize("argv,headless", [
    (["--config", "x.yaml"], None),
    (["-c", "x.yaml"], None),
    (["--config=x.yaml"], None),
    ([], None),
    (["--config", "train"], None),  # a config file named like a command opens the app on it
    (["train", "--config", "x.yaml"], True),
    (["validate", "-c", "x.yaml"], True),
    (["--config", "x.yaml", "validate"], True),
    (["init"], True),
    (["--version"], True),
    (["--help"], True),
])
def test_entry_point_opens_the_app_or_runs_a_command(argv, headless, monkeypatch):
    """tui/cli.py: no command opens the app on --config's file; a command goes to argparse whole."""
    import engine.cli.main
    import tui.app
    from tui import cli
    seen = {}

    class FakeApp:
        return_code = 0

        def __init__(self, config_path):
            seen["app"] = config_path

        def run(self):
            pass

    monkeypatch.setattr(tui.app, "LoraTuiApp", FakeApp)
    monkeypatch.setattr(engine.cli.main, "run", lambda a: seen.setdefault("run", a) and 0)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    if headless:
        assert seen == {"run": argv}
    else:
        expected = argv[-1].removeprefix("--config=") if argv else None
        assert seen == {"app": expected}


def test_entry_point_refuses_a_stray_argument(capsys):
    from tui import cli
    with pytest.raises(SystemExit) as exc:
        cli.main(["--config", "x.yaml", "bogus"])
    assert exc.value.code == 2
    assert "unexpected argument 'bogus'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ --version

def pyproject_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["version"]


@pytest.mark.e2e
def test_version_prints_the_installed_version():
    from importlib.metadata import version
    r = lora_tui("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"lora-tui {version('lora-tui')}\n" and not r.stderr


def test_version_without_metadata_reads_pyproject(monkeypatch, capsys):
    """A clone run without installing it has no metadata: pyproject.toml's version."""
    import importlib.metadata

    from engine.cli.args import package_version
    from helpers import cli

    found = importlib.metadata.version

    def missing(name):  # only lora-tui's: a library imported meanwhile may look up its own (huggingface_hub does)
        if name == "lora-tui":
            raise PackageNotFoundError(name)
        return found(name)
    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert package_version() == pyproject_version()
    code, out, err = cli(capsys, "--version")
    assert code == 0 and out == f"lora-tui {pyproject_version()}\n"


# ------------------------------------------------------------------------------- as child processes, with a model

@pytest.mark.e2e
def test_validate_with_config_after_the_command(tmp_path, embedded_dir):
    config = tiny_yaml(tmp_path)
    r = lora_tui("validate", "--config", config)
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / 'tiny.jsonl'}: 40 of 40 conversations valid" in r.stdout
    r = lora_tui("validate", "-c", tmp_path / "missing.yaml")
    assert r.returncode == 2 and "does not exist" in r.stderr  # the option is read, not ignored


@pytest.mark.e2e
def test_train_with_config_after_the_command(tmp_path, embedded_dir):
    config = tiny_yaml(tmp_path, output={"run_name": "after"})
    r = lora_tui("train", "--config", config, "--iterations", "1")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "runs" / "after" / "report.json").read_text())
    assert (report["status"], report["step"], report["total_steps"]) == ("finished", 1, 1)
    assert (tmp_path / "runs" / "after" / "adapter" / "adapters.safetensors").is_file()
