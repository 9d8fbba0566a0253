"""A run folder belongs to one run: its state as a UI sees it, the lock a training process holds, and
`lora-tui train` refusing to destroy, share or write through a run folder."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.run_folder import RunFolderError, RunLock, run_state

ROOT = Path(__file__).resolve().parent.parent


def hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from engine.run_folder import RunLock
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
    (run / "report.json").write_text(json.dumps({"status": "finished"}))
    assert run_state(run).state == "finished" and run_state(run).last_step == 4
    child = hold_lock_in_child(run)
    try:
        state = run_state(run)
        assert state.state == "running" and state.pid == child.pid and state.last_step == 4
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
