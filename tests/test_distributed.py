"""Data-parallel training with mx.distributed: 2 processes on localhost over the ring backend, started
with `mlx.launch` as a user would, against 1 process with twice the batch."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from helpers import ROOT, tiny_yaml, write_jsonl

BIN = Path(sys.executable).parent


def config(tmp_path: Path, name: str, batch: int, iterations: int, every: int = 0) -> Path:
    data = tmp_path / "tiny.jsonl"
    if not data.exists():
        write_jsonl(data, ({"prompt": f"{i} plus {i % 7}", "completion": str(i + i % 7)} for i in range(64)))
    return tiny_yaml(tmp_path, f"{name}.yaml", data={"path": str(data), "validation_split": 0.1},
                     lora={"dropout": 0.0}, training={"iterations": iterations, "batch_size": batch},
                     checkpoints={"every_steps": every, "keep_last": 3}, evaluation={"every_steps": 0},
                     output={"run_name": name})


def launch(cfg: Path, *extra: str) -> list[str]:
    return [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "--starting-port", str(5000 + os.getpid() % 2000),
            "--", str(BIN / "lora-tui"), "--config", str(cfg), "train", *extra]


def steps(run_dir: Path) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == "Step"]


@pytest.mark.parametrize("flat", ["0", "1"], ids=["per-array", "flat"])
def test_two_ranks_follow_one_process_with_twice_the_batch(tmp_path, embedded_dir, flat):
    """Also with the ranks' gradients summed as one vector and the optimizer over it (engine/train/flat_update.py,
    the default on CUDA), against one process updating array by array."""
    one = subprocess.run([str(BIN / "lora-tui"), "--config", str(config(tmp_path, "one", 4, 6)), "train"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LORA_TUI_FLAT_UPDATE": "0"})
    assert one.returncode == 0, one.stderr
    two = subprocess.run(launch(config(tmp_path, "two", 2, 6)), cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "LORA_TUI_FLAT_UPDATE": flat})
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert "effective batch 4" in two.stdout and "x 2 ranks" in two.stdout
    # Both ranks share this machine's cores: each caps its BLAS threads (on 2 cores, uncapped OpenMP threads
    # spinning against each other made a step take 4-27 s instead of ~1 s).
    assert re.search(r"x 2 ranks \(\d+ BLAS threads? each\)", two.stdout), two.stdout[:600]
    assert two.stdout.count("finished at step 6") == 1  # rank 0 speaks for the group
    a, b = steps(tmp_path / "runs" / "one"), steps(tmp_path / "runs" / "two")
    assert [s["step"] for s in b] == list(range(1, 7))
    la, lb = np.array([s["loss"] for s in a]), np.array([s["loss"] for s in b])
    print(f"losses, 1 process x batch 4: {np.round(la, 4).tolist()}\n          2 ranks x batch 2: "
          f"{np.round(lb, 4).tolist()} (largest relative difference {np.max(np.abs(lb - la) / la):.1e})")
    np.testing.assert_allclose(lb, la, rtol=2e-3)
    np.testing.assert_allclose([s["learning_rate"] for s in b], [s["learning_rate"] for s in a], rtol=1e-6)
    assert [s["tokens_seen"] for s in b] == [s["tokens_seen"] for s in a]  # both ranks' tokens counted
    # report.json says how much of the loop went to collectives (the measure asked for on GPU hosts too).
    dist = json.loads((tmp_path / "runs" / "two" / "report.json").read_text())["distributed"]
    print(f"communication: {dist}")
    assert dist["ranks"] == 2 and dist["backend"] == "ring" and 0 < dist["communication_share"] < 1, dist
    assert json.loads((tmp_path / "runs" / "one" / "report.json").read_text())["distributed"] is None
    # Validation is sharded (each rank scores half of each global batch), and scores the same examples.
    va, vb = ([e["val_loss"] for e in map(json.loads, (tmp_path / "runs" / n / "metrics.jsonl").read_text().splitlines())
               if e["event"] == "Eval"] for n in ("one", "two"))
    assert len(vb) == len(va) == 1
    np.testing.assert_allclose(vb, va, rtol=1e-5)
    import mlx.core as mx
    wa = mx.load(str(tmp_path / "runs" / "one" / "adapter" / "adapters.safetensors"))
    wb = mx.load(str(tmp_path / "runs" / "two" / "adapter" / "adapters.safetensors"))
    for key in wa:
        np.testing.assert_allclose(np.array(wb[key]), np.array(wa[key]), rtol=1e-2, atol=1e-5)


def test_a_killed_rank_ends_the_run_with_a_message_and_a_good_checkpoint(tmp_path, embedded_dir):
    cfg = config(tmp_path, "killed", 2, 400, every=2)
    proc = subprocess.Popen(launch(cfg), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LORA_TUI_DIST_TIMEOUT": "20"})  # not the 30 s+ default
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("step 5/"):
            victims = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if p.environ().get("MLX_RANK") == "1" and "train" in p.cmdline()]
            assert victims, "rank 1 not found"
            victims[0].send_signal(signal.SIGKILL)
            break
    try:
        rest, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        pytest.fail("the group hung after losing a rank")
    text = "".join(out) + rest
    # (mlx.launch itself exits 0 whatever its ranks return: the message and the run folder tell.)
    last_event = json.loads((tmp_path / "runs" / "killed" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last_event["event"] == "Failed" and "last checkpoint: " in last_event["message"]
    # Either MLX's ring notices the lost peer, or our watchdog does when the ring just waits.
    assert "distributed run stopped:" in text and "resume with: lora-tui train --resume" in text, text[-2000:]
    assert "no answer from the other ranks" in text or "connection to a peer was lost" in text
    assert "Traceback" not in text
    run_dir = tmp_path / "runs" / "killed"
    good = sorted((run_dir / "checkpoints").glob("step_*"))
    assert good, text[-2000:]
    # The last checkpoint is good: the two ranks resume it together and finish.
    last = int(good[-1].name.split("_")[1])
    cfg.write_text(cfg.read_text().replace("iterations: 400", f"iterations: {last + 2}"))
    r = subprocess.run(launch(cfg, "--resume", str(run_dir)), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert f"from step {last}" in r.stdout and r.stdout.count(f"finished at step {last + 2}") == 1, \
        r.stdout[-2000:] + r.stderr[-2000:]
    print(f"after rank 1 was killed at step 5:\n{text[-600:]}")


def test_a_collective_waits_for_slow_starters_then_for_ten_slow_steps(monkeypatch):
    from engine.train import distributed
    monkeypatch.setattr(distributed, "FIXED_WAIT", None)
    world = distributed.World(0, 2)
    assert world.patience() == distributed.START_WAIT  # another rank may still be loading its model
    world.step_took(40.0)  # the first step compiles: not counted
    assert world.patience() == distributed.START_WAIT
    world.step_took(1.0)
    assert world.patience() == distributed.MIN_WAIT
    world.step_took(7.0)
    assert world.patience() == 70.0
    monkeypatch.setattr(distributed, "FIXED_WAIT", "20")
    assert world.patience() == 20.0


def test_a_named_backend_this_mlx_lacks_ends_the_run_with_one_line(tmp_path, embedded_dir):
    """training.distributed_backend: nccl on a machine without MLX's CUDA build (this one): each rank stops
    before loading anything, saying what to install; no traceback, no hang."""
    cfg = config(tmp_path, "nccl", 2, 4)
    import yaml
    data = yaml.safe_load(cfg.read_text())
    data["training"]["distributed_backend"] = "nccl"
    cfg.write_text(yaml.safe_dump(data))
    r = subprocess.run(launch(cfg), cwd=ROOT, capture_output=True, text=True, timeout=120)
    text = r.stdout + r.stderr
    assert "training.distributed_backend is nccl, but this MLX has no nccl backend" in text, text[-2000:]
    assert "uv sync --extra cuda" in text and "Traceback" not in text
    assert "step 1/" not in text
