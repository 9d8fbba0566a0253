"""engine/atomic.py: a folder or file replaced so that a failure at any point leaves one complete version."""

import os

import pytest

from engine import atomic


def make(folder, text):
    with atomic.folder(folder) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text(text)
    return (folder / "sub" / "a.txt").read_text()


def test_a_folder_is_written_then_replaced_with_no_leftovers(tmp_path):
    target = tmp_path / "adapter"
    assert make(target, "one") == "one"
    assert make(target, "two") == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_an_error_inside_keeps_the_old_version_and_drops_the_new(tmp_path):
    target = tmp_path / "adapter"
    make(target, "one")
    with pytest.raises(OSError, match="No space"):
        with atomic.folder(target) as tmp:
            (tmp / "half.bin").write_bytes(b"\0")
            raise OSError(28, "No space left on device")
    assert (target / "sub" / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_failed_swap_puts_the_old_version_back(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    make(target, "one")
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new version's rename into place
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError):
        make(target, "two")
    monkeypatch.undo()
    assert (target / "sub" / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
    target = tmp_path / "adapter"
    make(target, "one")
    os.rename(target, atomic.aside(target))  # what a SIGKILL right after the first rename leaves
    assert not target.exists()
    assert atomic.recover(target)
    assert (target / "sub" / "a.txt").read_text() == "one"
    assert not atomic.recover(target)  # nothing left to recover
    assert make(target, "two") == "two"  # and a stale aside copy would not block the next swap


def test_the_next_swap_after_a_kill_leaves_no_aside_copy(tmp_path):
    target = tmp_path / "adapter"
    make(target, "one")
    os.rename(target, atomic.aside(target))  # killed between the two renames, and never read since
    assert make(target, "two") == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_keep_existing_lets_the_first_finisher_win(tmp_path):
    target = tmp_path / "model"
    with atomic.folder(target, keep_existing=True) as tmp:
        (tmp / "config.json").write_text("ours")
        make(target, "theirs")  # another process finished the same import first
    assert not (target / "config.json").exists() and (target / "sub" / "a.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_write_text_replaces_a_file_whole(tmp_path):
    path = tmp_path / "deep" / "config.yaml"
    atomic.write_text(path, "a: 1\n")
    atomic.write_json(path.with_suffix(".json"), {"a": 1})
    atomic.write_text(path, "a: 2\n")
    assert path.read_text() == "a: 2\n" and path.with_suffix(".json").read_text() == '{\n "a": 1\n}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", "config.yaml"]
