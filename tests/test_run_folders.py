"""A run folder belongs to one run: its state as a UI sees it, the lock a training process holds, and
`lora-tui train` refusing to destroy, share or write through a run folder."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.train.run_folder import RunFolderError, RunLock, run_state
from helpers import ROOT, lora_tui, lora_tui_cmd, tiny_yaml
from test_faults import write_config


def hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from engine.train.run_folder import RunLock
        with RunLock({str(run_dir)!r}):
            print("locked", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_run_state_of_each_kind_of_folder(tmp_path):
    assert run_state(tmp_path / "missing").state == "empty"
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "Failed"}\n')  # a run that failed before its first step
    assert run_state(run).state == "empty"
    step = run / "checkpoints" / "step_000004"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text('{"step": 4}')
    assert run_state(run) == run_state(run).__class__("interrupted", 4)
    (run / "report.json").write_text(json.dumps({"status": "stopped"}))
    assert run_state(run).state == "interrupted" and run_state(run).resumable
    (run / "report.json").write_text(json.dumps({"status": "finished", "step": 4}))
    assert run_state(run).state == "finished" and run_state(run).last_step == 4
    # Resumed for more steps and killed at step 6: the old report says finished, the checkpoints say more.
    later = run / "checkpoints" / "step_000006"
    later.mkdir()
    (later / "trainer_state.json").write_text('{"step": 6}')
    assert run_state(run) == run_state(run).__class__("interrupted", 6)
    (run / "report.json").write_text(json.dumps({"status": "finished", "step": 6}))
    assert run_state(run).state == "finished"
    child = hold_lock_in_child(run)
    try:
        state = run_state(run)
        assert state.state == "running" and state.pid == child.pid and state.last_step == 6
        with pytest.raises(RunFolderError, match=f"process {child.pid} is training in this run folder"):
            RunLock(run).acquire()
    finally:
        child.communicate("")
    assert run_state(run).state == "finished"  # the lock died with its process
    with RunLock(run):
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    child = hold_lock_in_child(tmp_path)
    child.kill()
    child.wait()
    assert (tmp_path / "run.lock").read_text().strip() == str(child.pid)  # the file stays ...
    assert run_state(tmp_path).state == "empty"  # ... but nobody holds it
    with RunLock(tmp_path):
        assert run_state(tmp_path).state == "running"


# ---------------------------------------------------------------- through `lora-tui train`

def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lora-tui: error:")]


def test_two_trainings_on_one_run_name_cannot_both_write(tmp_path, embedded_dir):
    cfg = write_config(tmp_path, training={"iterations": 400, "warmup_steps": 1}, checkpoints={"every_steps": 2})
    first = subprocess.Popen(lora_tui_cmd("--config", cfg, "train"), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    for line in first.stdout:
        if line.startswith("step 2/400"):
            break
    run_dir = tmp_path / "runs" / "ref"
    second = lora_tui("--config", cfg, "train")
    again = lora_tui("--config", cfg, "train", "--overwrite")
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    for other in (second, again):
        assert other.returncode == 2, other.stderr
        assert error_lines(other.stderr) == [f"lora-tui: error: {run_dir}: process {first.pid} is training in this "
                                             "run folder; wait for it, stop it, or use another --run-name"]
        assert "Traceback" not in other.stderr
    assert first.returncode == 130, err
    # The folder holds the first run alone: one start in its log, its checkpoints, its stop.
    events = [json.loads(line)["event"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events.count("Started") == 1 and events[-1] == "Finished"
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    stopped_at = int(saved[-1].split("_")[1])
    assert f"finished at step {stopped_at} (stopped)" in out
    assert run_state(run_dir).state == "interrupted" and run_state(run_dir).last_step == stopped_at


def test_a_second_run_without_resume_or_overwrite_is_refused_and_the_first_left_untouched(tmp_path, embedded_dir,
                                                                                          capsys):
    from engine.cli.main import run
    cfg = write_config(tmp_path, training={"iterations": 3, "warmup_steps": 1})
    assert run(["--config", str(cfg), "train"]) == 0
    run_dir = tmp_path / "runs" / "ref"
    before = files(run_dir)
    assert run_state(run_dir) == run_state(run_dir).__class__("finished", 3)
    capsys.readouterr()
    assert run(["--config", str(cfg), "train"]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [f"lora-tui: error: {run_dir} holds an earlier run (checkpoints, adapter or report): use "
                                "--resume latest to continue it, --overwrite to replace it, or another --run-name"]
    assert files(run_dir) == before  # nothing written, not even to its logs
    # --overwrite replaces it whole: a fresh log, checkpoints and report of the new run only.
    cfg.write_text(cfg.read_text().replace("iterations: 3", "iterations: 2"))
    assert run(["--config", str(cfg), "train", "--overwrite"]) == 0
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("Started") == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000001", "step_000002"]
    assert json.loads((run_dir / "report.json").read_text())["step"] == 2


@pytest.mark.parametrize("link", ["checkpoints", "adapter", "metrics.jsonl", "checkpoints/step_000001"])
def test_run_folder_paths_that_are_symlinks_are_refused(link, tmp_path, embedded_dir, capsys):
    from engine.cli.main import run
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "runs" / "ref"
    (run_dir / link).parent.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside if "." not in link else outside / "file"
    (run_dir / link).symlink_to(target)
    code = run(["--config", str(cfg), "train"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert error_lines(err) == [f"lora-tui: error: {run_dir / link}: is a symbolic link (to {target}); a run writes "
                                "only inside its own folder: remove the link or use another --run-name"]
    assert list(outside.iterdir()) == []  # nothing went through the link
    assert not (run_dir / "metrics.jsonl").is_file() or (run_dir / "metrics.jsonl").is_symlink()


def test_a_file_system_without_locks_trains_unlocked_with_a_warning(tmp_path, monkeypatch):
    # Some NFS, CIFS and FUSE mounts answer flock with ENOLCK or EOPNOTSUPP (no such mount here: simulated).
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = RunLock(tmp_path / "r").acquire()
    assert "cannot lock files (No locks available)" in lock.unlocked
    lock.release()


def test_overwrite_and_resume_together_are_refused(tmp_path, embedded_dir, capsys):
    from engine.cli.main import run
    cfg = tiny_yaml(tmp_path, "c.yaml", training={"iterations": 2})
    code = run(["--config", str(cfg), "train", "--resume", "latest", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite and --resume contradict each other" in err, err
    assert not (tmp_path / "runs" / "run").exists()
