"""`lora-tui init [DIR]`: the default config.yaml and the sample data, written atomically, never over a file;
where the samples come from (engine/samples.py); the hint for a folder without them."""

from __future__ import annotations

import os
import subprocess

import pytest

from engine import atomic
from engine.config.loading import load_config, to_yaml
from engine.config.schema import Config
from engine.config.validation import validate
from engine.data import DatasetError
from engine.samples import DATA, SAMPLES, sample_path
from helpers import ROOT, cli, lora_tui_cmd, one_error_line

WRITTEN = ("config.yaml", *DATA)


def test_init_writes_the_config_and_the_sample_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "init")
    assert code == 0, err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(WRITTEN)
    assert (tmp_path / "config.yaml").read_text() == to_yaml(Config()) == (ROOT / "config.yaml").read_text()
    for name in DATA:
        assert (tmp_path / name).read_bytes() == (ROOT / name).read_bytes()
    assert "Wrote in this folder:" in out and all(name in out for name in WRITTEN)
    assert "lora-tui validate" in out and "lora-tui " in out and "Kept" not in out
    mode = (tmp_path / "config.yaml").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # an ordinary file, not mkstemp's private 0600


def test_init_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("lora:\n  rank: 4\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "heldout.jsonl").write_text("mine\n")
    code, out, err = cli(capsys, "init")
    assert code == 0, err
    assert (tmp_path / "config.yaml").read_text() == "lora:\n  rank: 4\n"
    assert (tmp_path / "data" / "heldout.jsonl").read_text() == "mine\n"
    assert (tmp_path / "data" / "tool_calls.jsonl").read_bytes() == (ROOT / "data/tool_calls.jsonl").read_bytes()
    assert "Kept (already there, not overwritten): config.yaml, data/heldout.jsonl" in out
    # A second init writes nothing and says so; a deleted file comes back alone.
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    code, out, _ = cli(capsys, "init")
    assert code == 0 and "Wrote" not in out and "Kept" in out
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
    (tmp_path / "data" / "heldout_answers.jsonl").unlink()
    code, out, _ = cli(capsys, "init")
    assert code == 0 and "Wrote in this folder:\n  data/heldout_answers.jsonl" in out
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")]  # no temp files left behind


def test_init_into_a_new_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "init", "projects/first")
    assert code == 0, err
    assert all((tmp_path / "projects" / "first" / name).is_file() for name in WRITTEN)
    assert "Wrote in projects/first:" in out and "cd projects/first" in out


@pytest.mark.parametrize("args,needle", [
    (["init", "file.txt"], "init: file.txt is not a folder"),
    (["init", "--config", "x.yaml"], "init: --config does not apply"),
    (["init", "blocked"], "cannot write blocked/data/"),
])
def test_init_mistakes_are_one_line(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "data").write_text("a file where the data folder goes")
    code, _, err = cli(capsys, *args)
    assert code == 2 and needle in one_error_line(err)


def test_the_written_config_loads_and_validates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "init")[0] == 0
    cfg, issues = load_config(str(tmp_path / "config.yaml"), environ={})
    assert not issues and not validate(cfg)
    assert cfg == Config()
    assert cfg.data.path == "data/tool_calls.jsonl" and cfg.evaluation.heldout_path == "data/heldout.jsonl"


@pytest.mark.e2e
def test_the_written_data_validates_in_that_folder(tmp_path, embedded_dir):
    """`lora-tui init` then `lora-tui validate` in a folder that is not the repository."""
    folder = tmp_path / "project"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_TUI__")}
    for args in (("init", folder), ("validate",)):
        r = subprocess.run(lora_tui_cmd(*args), cwd=folder if args == ("validate",) else tmp_path,
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
    assert "data/tool_calls.jsonl: 1440 of 1440 conversations valid" in r.stdout


# --------------------------------------------------------------------------------------------- the samples

def test_sample_path_finds_the_repository_files_in_a_clone():
    for name in SAMPLES:
        assert sample_path(name) == ROOT / name
    with pytest.raises(FileNotFoundError, match="not a sample"):
        sample_path("pyproject.toml")


def test_sample_path_prefers_the_packaged_copy(tmp_path, monkeypatch):
    """An installed wheel carries the samples in engine/_samples/ (pyproject.toml's force-include)."""
    import engine.samples
    packaged = tmp_path / "_samples"
    (packaged / "data").mkdir(parents=True)
    (packaged / "data" / "heldout.jsonl").write_text("{}\n")
    monkeypatch.setattr(engine.samples, "PACKAGED", packaged)
    assert sample_path("data/heldout.jsonl") == packaged / "data" / "heldout.jsonl"
    assert sample_path("data/tool_calls.jsonl") == ROOT / "data" / "tool_calls.jsonl"  # not packaged: the clone's
    monkeypatch.setattr(engine.samples, "REPOSITORY", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="reinstall"):
        sample_path("data/tool_calls.jsonl")


def test_a_missing_sample_data_file_says_run_init(tmp_path, monkeypatch):
    from engine.data.sources import open_source
    monkeypatch.chdir(tmp_path)
    for name in ("data/tool_calls.jsonl", "./data/heldout.jsonl"):
        with pytest.raises(DatasetError) as exc:
            open_source(name)
        assert str(exc.value) == f"{name.removeprefix('./')}: no such file: run `lora-tui init` to write the " \
                                  "sample data here"
    with pytest.raises(DatasetError) as exc:  # any other missing file: no hint
        open_source("other/tool_calls.jsonl")
    assert str(exc.value) == "other/tool_calls.jsonl: no such file"


def test_a_missing_default_dataset_is_one_line_with_the_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "validate", "--no-tokenize")
    assert code == 3
    assert one_error_line(err) == ("lora-tui: error: data/tool_calls.jsonl: no such file: run `lora-tui init` "
                                   "to write the sample data here")


# ------------------------------------------------------------------------------------------- atomic.create

def test_create_never_replaces_anything(tmp_path):
    target = tmp_path / "a" / "new.txt"
    assert atomic.create(target, b"one") and target.read_bytes() == b"one"
    assert not atomic.create(target, b"two") and target.read_bytes() == b"one"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert not atomic.create(dangling, b"x") and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "dangling", "new.txt"]


def test_create_without_hard_links_still_refuses_an_existing_file(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "f"
    assert atomic.create(target, b"one") and target.read_bytes() == b"one"
    assert not atomic.create(target, b"two") and target.read_bytes() == b"one"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
