"""Faults done for real to the headless trainer (`lora-tui train`, as a user runs it): kill -9 at random
steps and resume, a disk that fills up during a save, SIGTERM. Each must cost no work: resume finishes
with the same adapter, the last good checkpoint stays intact, and the user reads one line, never a
traceback."""

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, increments, lora_tui, lora_tui_cmd, tiny_yaml, write_jsonl

ITERATIONS = 8
# The run these faults interrupt: a checkpoint after every step, no validation until the end.
REF = {
    "lora": {"dropout": 0.1},
    "training": {"iterations": ITERATIONS, "warmup_steps": 2},
    "checkpoints": {"every_steps": 1, "keep_last": 2},
    "evaluation": {"every_steps": 0, "max_tokens": 128},
    "output": {"run_name": "ref"},
}


def write_config(tmp_path: Path, **sections: dict) -> Path:
    """REF as `tmp_path/tiny.yaml`, each keyword a section whose keys override REF's; it trains on
    `increments()` in `tmp_path/tiny.jsonl` unless `data={"path": ...}` names other rows."""
    if "data" not in sections:
        sections["data"] = {"path": str(write_jsonl(tmp_path / "tiny.jsonl", increments()))}
    return tiny_yaml(tmp_path, **{name: REF.get(name, {}) | sections.get(name, {})
                                  for name in REF.keys() | sections.keys()})


def big_dataset(tmp_path: Path) -> Path:
    """Rows enough that tokenizing them takes a while on 2 cores."""
    return write_jsonl(tmp_path / "big.jsonl", ({"prompt": f"What is {i} plus one? Answer in words.",
                                                 "completion": f"{i + 1}"} for i in range(20000)))


def adapter(run_dir: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx
    return {k: np.array(v) for k, v in mx.load(str(run_dir / "adapter" / "adapters.safetensors")).items()}


def test_kill_9_at_random_steps_then_resume_matches_the_uninterrupted_run(tmp_path, embedded_dir):
    cfg = write_config(tmp_path)
    ref = lora_tui("--config", cfg, "train")
    assert ref.returncode == 0, ref.stderr
    expected = adapter(tmp_path / "runs" / "ref")
    rng = random.Random(20261125)
    mid_write = 0
    for trial in range(10):
        name = f"kill{trial}"
        kill_after, delay = rng.randint(2, ITERATIONS - 1), rng.choice([0.0, 0.002, 0.01, 0.03, 0.08])
        proc = subprocess.Popen(lora_tui_cmd("--config", cfg, "train", "--run-name", name), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:
            # "step k/N" is printed after step k's update, right before its checkpoint is written:
            # a short delay lands the kill before, inside or after that write.
            if line.startswith(f"step {kill_after}/"):
                if delay:
                    import time
                    time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"trial {trial}: the run ended before it was killed"
        run_dir = tmp_path / "runs" / name
        mid_write += any(p.name.endswith(".tmp") for p in (run_dir / "checkpoints").iterdir())
        resumed = lora_tui("--config", cfg, "train", "--resume", run_dir)
        assert resumed.returncode == 0, f"trial {trial} (killed after step {kill_after}): {resumed.stderr}"
        assert f"finished at step {ITERATIONS}" in resumed.stdout
        got = adapter(run_dir)
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-6,
                                       err_msg=f"trial {trial}, killed after step {kill_after}: {key}")
    print(f"10 kill -9 trials resumed to the uninterrupted adapter; {mid_write} left a half-written "
          "checkpoint behind")


def _small_disk() -> list[str] | None:
    """A command prefix that runs a shell with a size-limited tmpfs of its own (no root needed where user
    namespaces are allowed); None where this machine allows neither."""
    probe = "mount -t tmpfs -o size=64k none \"$1\""
    for prefix in (["unshare", "-rm"], ["unshare", "-m"]):
        if shutil.which(prefix[0]) is None:
            continue
        target = Path(os.environ.get("TMPDIR", "/tmp"))
        r = subprocess.run(prefix + ["sh", "-c", probe, "sh", str(target)], capture_output=True)
        if r.returncode == 0:
            return prefix
    return None


def test_disk_full_during_a_save_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, embedded_dir):
    prefix = _small_disk()
    if prefix is None:
        pytest.skip("this machine allows no private tmpfs mount (unshare), so no disk can be filled")
    disk, saved = tmp_path / "disk", tmp_path / "after"
    disk.mkdir(), saved.mkdir()
    cfg = write_config(tmp_path, output={"dir": str(disk / "runs"), "run_name": "full"},
                       checkpoints={"keep_last": 100}, training={"iterations": 60, "warmup_steps": 1})
    # Each checkpoint of this tiny adapter is ~230 kB with its optimizer state: 1 MB holds a few.
    script = (f"mount -t tmpfs -o size=1m none {shlex.quote(str(disk))} || exit 99; "
              f"{shlex.join(lora_tui_cmd('--config', cfg, 'train'))}; code=$?; "
              f"cp -a {shlex.quote(str(disk))}/. {shlex.quote(str(saved))}/; exit $code")
    r = subprocess.run(prefix + ["sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 5, (r.returncode, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("lora-tui: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    run_dir = saved / "runs" / "full"
    good = sorted((run_dir / "checkpoints").glob("step_*"))
    assert good, "no checkpoint survived"
    # The newest complete checkpoint is intact: resuming it on a roomy disk finishes the run.
    last = int(good[-1].name.split("_")[1])
    cfg.write_text(cfg.read_text().replace("iterations: 60", f"iterations: {last + 2}"))
    resumed = lora_tui("--config", cfg, "train", "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {last}" in resumed.stdout and f"finished at step {last + 2}" in resumed.stdout


def test_sigterm_saves_then_exits_cleanly(tmp_path, embedded_dir):
    cfg = write_config(tmp_path, checkpoints={"every_steps": 0}, training={"iterations": 400, "warmup_steps": 1})
    proc = subprocess.Popen(lora_tui_cmd("--config", cfg, "train"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 2/400"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM: saving a checkpoint, then stopping" in err and "Traceback" not in err
    assert "checkpoint saved (stop)" in out
    assert sorted((tmp_path / "runs" / "ref" / "checkpoints").glob("step_*"))


def test_kill_9_inside_a_checkpoint_write_then_resume(tmp_path, embedded_dir):
    """SIGKILL the moment a checkpoint's temp folder appears (a bigger adapter makes the write last long
    enough to be caught): the half-written folder is ignored and cleaned up, resume takes the one before."""
    import time
    cfg = write_config(tmp_path, lora={"rank": 64, "num_layers": -1,
                                       "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                       training={"iterations": 12, "warmup_steps": 1}, checkpoints={"every_steps": 2, "keep_last": 3})
    caught = None
    for attempt in range(5):
        name = f"write{attempt}"
        folder = tmp_path / "runs" / name / "checkpoints"
        proc = subprocess.Popen(lora_tui_cmd("--config", cfg, "train", "--run-name", name), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            try:
                entries = [e.name for e in os.scandir(folder)]
            except FileNotFoundError:
                entries = []
            done = [e for e in entries if e.startswith("step_")]
            if done and any(e.endswith(".tmp") for e in entries):  # a second checkpoint is being written
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.0005)
        proc.wait(timeout=60)
        if proc.returncode == -signal.SIGKILL and any(p.name.endswith(".tmp") for p in folder.iterdir()):
            caught = tmp_path / "runs" / name
            break
    assert caught is not None, "no kill landed inside a checkpoint write in 5 attempts"
    before = sorted(p.name for p in (caught / "checkpoints").glob("step_*"))
    resumed = lora_tui("--config", cfg, "train", "--resume", caught)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {int(before[-1].split('_')[1])}" in resumed.stdout
    assert "finished at step 12" in resumed.stdout
    assert not any(p.name.endswith(".tmp") for p in (caught / "checkpoints").iterdir())
    print(f"killed inside the write of the checkpoint after {before[-1]} (attempt {attempt + 1})")


def test_sigterm_during_dataset_preparation_stops_without_a_checkpoint(tmp_path, embedded_dir):
    """A stop before the first step used to wait for the whole dataset to be tokenized and then save an
    untrained step_000000 that looked like a run to resume. Now it ends the preparation and saves nothing."""
    import time

    from engine.train.run_folder import run_state
    cfg = write_config(tmp_path, data={"path": str(big_dataset(tmp_path))})
    run_dir = tmp_path / "runs" / "ref"
    proc = subprocess.Popen(lora_tui_cmd("--config", cfg, "train"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while not (run_dir / "metrics.jsonl").exists() and proc.poll() is None:  # preparation has begun
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "lora-tui: stopped before training began: nothing was trained or saved" in err and "Traceback" not in err
    assert "started:" not in out  # no step was run ...
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "adapter").exists()  # ... nor saved
    assert not (run_dir / "report.json").exists() and run_state(run_dir).state == "empty"


def test_sigterm_during_the_end_of_run_samples_ends_them(tmp_path, embedded_dir):
    """The samples (base and adapter answering each prompt) come after the adapter and the report are saved;
    a SIGTERM there used to be ignored until every prompt was answered."""
    import time
    prompts = [f"Count from {i} to 500, separated by commas." for i in range(6)]
    cfg = write_config(tmp_path, training={"iterations": 2, "warmup_steps": 1},
                       evaluation={"sample_prompts": prompts, "max_tokens": 64})
    run_dir = tmp_path / "runs" / "ref"
    proc = subprocess.Popen(lora_tui_cmd("--config", cfg, "train"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while not (run_dir / "report.json").exists() and proc.poll() is None:  # written just before the samples
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "lora-tui: interrupted after the last step: the adapter and report" in err and "Traceback" not in err
    assert (run_dir / "adapter" / "adapters.safetensors").is_file()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "finished" and report["step"] == 2
    assert len(report["samples"]) < len(prompts) and out.count("sample: ") == len(report["samples"])


def test_a_stop_while_tokenizing_ends_the_tokenizing(tmp_path, embedded_dir):
    """The stop a SIGTERM makes (RunControl.stop), arriving in the middle of tokenizing: the tokenizing ends
    there (the progress goes no further), nothing is trained or saved."""
    from engine.config.loading import load_config
    from engine.train.control import RunControl
    from engine.protocol import Phase
    from engine.train.run import TrainingRun
    from engine.train.run_folder import run_state
    cfg, _ = load_config(write_config(tmp_path, data={"path": str(big_dataset(tmp_path))}))
    control = RunControl()
    tokenizing: list[float] = []

    def listener(event):
        if isinstance(event, Phase) and event.name == "tokenizing the dataset" and event.fraction > 0.45:
            tokenizing.append(event.fraction)
            control.stop()  # mid-way: some lines are tokenized, most are not
    result = TrainingRun(cfg, [listener], control).run()
    assert result.status == "stopped" and result.step == 0, result
    assert tokenizing and max(tokenizing) < 0.6, tokenizing  # 0.9 would mean the whole file was tokenized
    run_dir = tmp_path / "runs" / "ref"
    assert not (run_dir / "checkpoints").exists() and run_state(run_dir).state == "empty"
