"""`lora-tui train --resume` continues exactly or refuses: another dataset, seed, batch or LoRA is refused
with one line (exit 2) and the run left as it was; a changed learning rate or length is said, recorded and
applied; a bad or truncated newest checkpoint falls back to the one before it. Through the real command
line (in-process, as tests/test_bad_input.py does) on the embedded model."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from engine.cli.main import run
from helpers import increments, write_jsonl
from test_faults import write_config


def files(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the lock file aside) with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "run.lock"}


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lora-tui: error:")]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, embedded_dir):
    """A run of 8 steps stopped after step 3: checkpoints step_000002 and step_000003."""
    base = tmp_path_factory.mktemp("stopped")
    cfg = write_config(base)
    assert run(["--config", str(cfg), "train", "--stop-after", "3"]) == 0
    return base


@pytest.fixture()
def copy(stopped_run, tmp_path):
    """A private copy of the stopped run and its config (its output.dir points at the copy)."""
    shutil.copytree(stopped_run, tmp_path, dirs_exist_ok=True)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(cfg.read_text().replace(str(stopped_run), str(tmp_path)))
    return cfg, tmp_path / "runs" / "ref"


def edit(cfg: Path, old: str, new: str) -> None:
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new))


def other_data(cfg: Path, rows: int) -> None:
    data = write_jsonl(cfg.parent / f"other{rows}.jsonl", increments(rows))
    edit(cfg, str(cfg.parent / "tiny.jsonl"), str(data))


@pytest.mark.parametrize("change,needle", [
    (lambda c: other_data(c, 50), "the dataset or its tokenization differs (32 training / 8 validation rows from"),  # a bigger file
    (lambda c: other_data(c, 30), "the dataset or its tokenization differs"),  # a smaller one once failed with an IndexError
    (lambda c: edit(c, "seed: 42", "seed: 7"), "training.seed was 42, now 7"),
    (lambda c: edit(c, "batch_size: 2", "batch_size: 4"), "the global batch (training.batch_size x ranks) was 2 x 1 = 2, now 4 x 1 = 4"),
    (lambda c: edit(c, "grad_accumulation: 1", "grad_accumulation: 2"), "training.grad_accumulation was 1, now 2"),
    (lambda c: edit(c, "rank: 4", "rank: 8"), "lora.rank was 4, now 8"),
], ids=["bigger-dataset", "smaller-dataset", "seed", "batch", "accumulation", "lora-rank"])
def test_a_resume_that_cannot_be_exact_is_refused_and_the_run_left_as_it_was(copy, change, needle, capsys):
    cfg, run_dir = copy
    before = files(run_dir)
    change(cfg)
    code = run(["--config", str(cfg), "train", "--resume", "latest"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(errors(err)) == 1 and needle in errors(err)[0], err
    assert f"cannot resume {run_dir / 'checkpoints' / 'step_000003'} exactly" in err
    assert "Set them back to resume it, or start a new run" in err and "Traceback" not in err
    after = files(run_dir)
    assert {k: v for k, v in after.items() if k not in ("metrics.jsonl", "train.log")} == \
        {k: v for k, v in before.items() if k not in ("metrics.jsonl", "train.log")}


def test_safe_changes_are_said_recorded_and_applied(copy, capsys):
    cfg, run_dir = copy
    old_config = (run_dir / "config.yaml").read_text()
    edit(cfg, "learning_rate: 0.001", "learning_rate: 0.0005")
    edit(cfg, "iterations: 8", "iterations: 6")
    assert run(["--config", str(cfg), "train", "--resume", "latest"]) == 0
    out = capsys.readouterr().out
    said = ("resuming step 3 with changed settings: training.iterations 8 -> 6, training.learning_rate 0.001 -> "
            "0.0005; the run's config.yaml is updated, the previous one kept as config.step_000003.yaml")
    assert f"warning: {said}" in out
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "Warning", "message": said}.items() <= next(e for e in events if said in e.get("message", "")).items()
    assert (run_dir / "config.step_000003.yaml").read_text() == old_config
    assert "learning_rate: 0.0005" in (run_dir / "config.yaml").read_text()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "finished" and report["step"] == 6
    assert report["resumes"][-1]["step"] == 3 and report["resumes"][-1]["changed"] == {
        "training.iterations": [8, 6], "training.learning_rate": [0.001, 0.0005]}
    resumed_lrs = [e["learning_rate"] for e in events if e["event"] == "Step" and e["step"] > 3]
    assert len(resumed_lrs) == 3 and max(resumed_lrs) <= 5e-4


@pytest.mark.parametrize("state,field", [
    ({}, "field 'step' is missing"),
    ({"step": "six"}, "field 'step' must be a non-negative integer, got \"six\""),
    ([], "must be a JSON object, got list"),
    ({"order": "x"}, "field 'order' must be a list of batches"),
])
def test_a_trainer_state_of_the_wrong_shape_names_its_file_and_field(copy, state, field, capsys):
    cfg, run_dir = copy
    newest = run_dir / "checkpoints" / "step_000003"
    good = json.loads((newest / "trainer_state.json").read_text())
    bad = state if not isinstance(state, dict) or not state else {**good, **state}
    (newest / "trainer_state.json").write_text(json.dumps(bad))
    # That checkpoint alone: exit 2, one line naming the file and the field.
    code = run(["--config", str(cfg), "train", "--resume", str(newest)])
    err = capsys.readouterr().err
    assert code == 2 and len(errors(err)) == 1, err
    assert errors(err)[0].startswith(f"lora-tui: error: cannot resume: {newest / 'trainer_state.json'}: {field}"), err
    # The run: the one before it is taken, with a warning naming the skipped one.
    code = run(["--config", str(cfg), "train", "--resume", "latest"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"warning: skipping unusable checkpoint step_000003: {newest / 'trainer_state.json'}: {field}" in out
    assert "from step 2" in out and "finished at step 8" in out


@pytest.mark.parametrize("name", ["adapters.safetensors", "optimizer.safetensors"])
def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(copy, name, capsys):
    cfg, run_dir = copy
    tensor_file = run_dir / "checkpoints" / "step_000003" / name
    tensor_file.write_bytes(tensor_file.read_bytes()[: tensor_file.stat().st_size // 2])
    code = run(["--config", str(cfg), "train", "--resume", "latest"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"warning: skipping unusable checkpoint step_000003: {tensor_file}: truncated" in out
    assert "from step 2" in out and "finished at step 8" in out


def test_a_checkpoint_from_before_run_fingerprints_resumes_with_a_warning(copy, capsys):
    cfg, run_dir = copy
    state_file = run_dir / "checkpoints" / "step_000003" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("run", "config", "resumes"):
        del state[key]
    state_file.write_text(json.dumps(state))
    assert run(["--config", str(cfg), "train", "--resume", "latest"]) == 0
    out = capsys.readouterr().out
    assert "warning: step_000003 was saved by an older lora-tui that did not record its dataset" in out
    assert "from step 3" in out and "finished at step 8" in out
