"""engine/train/run_index.py on real run folders (two short trainings: one finished, one stopped) and on
broken ones made from them by hand: killed, resumed then killed, checkpoints only, failed, a live lock,
corrupt or missing files. Nothing it reads may raise; what it cannot read is said in the run's notes."""

import json
import os
import shutil

import pytest

from engine.train.run import TrainingRun
from engine.train.run_folder import RunLock
from engine.train.run_index import RunIndexError, config_diff, delete_run, list_runs, read_run, run_settings, \
    scores
from helpers import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, embedded_dir):
    """runs/alpha: 4 steps at lr 1e-3, finished; runs/beta: lr 5e-4, stopped after step 2."""
    base = tmp_path_factory.mktemp("run-index")
    assert TrainingRun(tiny_config(base, output={"run_name": "alpha"})).run().status == "finished"
    beta = tiny_config(base, training={"learning_rate": 5e-4}, output={"run_name": "beta"})
    assert TrainingRun(beta, stop_after=2).run().status == "stopped"
    return base / "runs"


@pytest.fixture()
def runs(trained, tmp_path):
    """A copy of the trained runs that a test may break."""
    return shutil.copytree(trained, tmp_path / "runs")


def lines_of(path):
    return path.read_text().splitlines(keepends=True)


def test_a_finished_and_a_stopped_run(runs):
    beta, alpha = list_runs(runs)  # newest first
    assert (alpha.name, alpha.status, alpha.method) == ("alpha", "finished", "sft")
    assert (alpha.step, alpha.total_steps) == (4, 4)
    report = json.loads((runs / "alpha" / "report.json").read_text())
    assert alpha.best_val_loss == pytest.approx(report["best_val_loss"])
    assert alpha.seconds == report["seconds"] and alpha.started is not None and alpha.started < beta.started
    assert [s for s, _ in alpha.train_curve] == [1, 2, 3, 4] and [s for s, _ in alpha.val_curve] == [2, 4]
    assert [loss for _, loss in alpha.train_curve] == pytest.approx(report["losses"])
    assert alpha.config["training"]["learning_rate"] == 1e-3 and alpha.adapter == runs / "alpha" / "adapter"
    assert not alpha.resumable and alpha.notes == [] and alpha.pid is None
    assert (beta.status, beta.step, beta.last_checkpoint, beta.resumable) == ("stopped", 2, 2, True)
    assert list_runs(runs / "nothing-here") == []


def test_a_killed_run_is_resumable_from_its_newest_checkpoint(runs):
    beta = runs / "beta"
    shutil.rmtree(beta / "adapter")
    (beta / "report.json").unlink()
    (beta / "metrics.jsonl").write_text("".join(x for x in lines_of(beta / "metrics.jsonl") if "Finished" not in x))
    run = read_run(beta)
    assert (run.status, run.resumable, run.last_checkpoint, run.step) == ("killed", True, 2, 2)
    assert run.adapter == beta / "checkpoints" / "step_000002"  # no final adapter: chat with the checkpoint
    assert run.config["training"]["learning_rate"] == 5e-4 and run.seconds > 0


def test_a_finished_run_resumed_then_killed_is_killed(runs):
    metrics = runs / "alpha" / "metrics.jsonl"
    started = next(json.loads(x) for x in lines_of(metrics) if '"Started"' in x)
    with open(metrics, "a") as fh:  # a second session began after the report, and never ended
        fh.write(json.dumps(started | {"time": started["time"] + 100, "total_steps": 8}) + "\n")
    run = read_run(runs / "alpha")
    assert (run.status, run.resumable, run.total_steps) == ("killed", True, 8)


def test_a_folder_with_only_checkpoints(runs):
    only = runs / "only-checkpoints"
    shutil.copytree(runs / "beta" / "checkpoints", only / "checkpoints")
    run = read_run(only)
    assert (run.status, run.resumable, run.last_checkpoint) == ("killed", True, 2)
    assert run.config["training"]["learning_rate"] == 5e-4  # from the checkpoint's trainer_state.json
    assert run.train_curve == [] and any("metrics.jsonl" in note for note in run.notes)


def test_corrupt_lines_missing_and_unreadable_files_never_raise(runs):
    alpha = runs / "alpha"
    lines = lines_of(alpha / "metrics.jsonl")
    step = next(i for i, x in enumerate(lines) if '"Step"' in x)
    bad_step = json.dumps(json.loads(lines[step]) | {"loss": "low"}) + "\n"
    (alpha / "metrics.jsonl").write_text("".join(lines[:step] + ["{not json\n", "[1, 2]\n", bad_step] +
                                                 lines[step + 1:]) + '{"event": "Step", "ste')  # cut mid-line
    (alpha / "report.json").write_text("{cut")
    (alpha / "config.yaml").write_text("training: [unclosed")
    run = read_run(alpha)
    assert run.status == "finished"  # metrics.jsonl's end still says so
    assert [s for s, _ in run.train_curve] == [2, 3, 4]  # step 1's line was replaced by the bad one
    notes = " | ".join(run.notes)
    assert "metrics.jsonl: 3 unreadable line(s)" in notes and "report.json: unreadable" in notes
    assert "config.yaml: unreadable" in notes
    assert run.config["training"]["learning_rate"] == 1e-3  # the newest checkpoint's settings instead
    (alpha / "metrics.jsonl").unlink()
    (alpha / "report.json").unlink()
    run = read_run(alpha)  # no log, no report: checkpoints and an adapter of a run that never said it ended
    assert run.status == "killed" and any("no metrics.jsonl" in note for note in run.notes)
    (runs / "not-a-run").mkdir()
    (runs / "not-a-run" / "notes.txt").write_text("hello")
    assert read_run(runs / "not-a-run") is None and "not-a-run" not in [r.name for r in list_runs(runs)]


def test_a_failed_run_says_why(runs):
    beta = runs / "beta"
    (beta / "report.json").unlink()
    lines = [x for x in lines_of(beta / "metrics.jsonl") if "Finished" not in x]
    failed = {"event": "Failed", "time": json.loads(lines[-1])["time"] + 1, "step": 2,
              "message": "training diverged at step 3: loss is nan", "last_checkpoint": None}
    (beta / "metrics.jsonl").write_text("".join(lines) + json.dumps(failed) + "\n")
    run = read_run(beta)
    assert run.status == "failed" and "diverged" in run.message and run.resumable  # its checkpoint is good


def test_a_live_run_is_running_and_cannot_be_deleted(runs):
    with RunLock(runs / "beta"):
        run = read_run(runs / "beta")
        assert run.status == "running" and run.pid == os.getpid() and not run.resumable
        with pytest.raises(RunIndexError, match=f"process {os.getpid()} is training"):
            delete_run(runs / "beta")
        assert (runs / "beta" / "checkpoints").is_dir()
    delete_run(runs / "beta")
    assert not (runs / "beta").exists() and [r.name for r in list_runs(runs)] == ["alpha"]
    with pytest.raises(RunIndexError, match="not a run folder"):
        delete_run(runs / "beta")


def test_config_diff_names_the_settings_that_differ(runs):
    beta, alpha = list_runs(runs)
    assert config_diff([alpha, beta]) == {"training.learning_rate": [1e-3, 5e-4]}
    assert config_diff([alpha, alpha]) == {}
    alpha.config["lora"].pop("rank")
    assert config_diff([alpha, beta])["lora.rank"] == [None, 4]
    assert "output.run_name" in config_diff([alpha, beta], ignore=())
    cfg, problems = run_settings(beta)
    assert cfg.training.learning_rate == 5e-4 and cfg.output.run_name == "beta" and problems == []


def test_scores_are_whatever_numbers_the_report_has():
    report = {"tool_calls": {"prompts": 40, "exact": 0.8, "no_tool": None},
              "answers": {"faithful": 0.75, "made_up": 0.05, "note": "text", "flag": True},
              "best_val_loss": 1.2}
    assert scores(report) == {"tool_calls.exact": 0.8, "answers.faithful": 0.75, "answers.made_up": 0.05}
    evaluation = {"metrics": {"exact": {"base": 0.4, "tuned": 0.8}, "json_valid": {"base": None, "tuned": 1}},
                  "items": 40, "max_tokens": 256, "examples": [{"scores": {"base": {"exact": 1}}}], "error": "x"}
    assert scores({"evaluation": evaluation}) == {"exact.base": 0.4, "exact.tuned": 0.8, "json_valid.tuned": 1.0}
    assert scores({"tool_calls": [1, 2], "evaluation": "n/a"}) == {}
