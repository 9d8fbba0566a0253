"""KTO, DPO and ORPO runs through the real command line on the embedded model: what metrics.jsonl shows,
exact resume, starting from an SFT adapter (which is then the reference: step 1's rewards are 0), and the
one-line refusals (pairs missing for DPO, an init adapter that does not fit)."""

import hashlib
import json
from pathlib import Path

import pytest

from helpers import addition_chats, cli, one_error_line, tiny_yaml, write_jsonl


def pairs(n: int = 40) -> list[dict]:
    """DPO/ORPO rows in TRL's plain shape: the right sum chosen, a wrong one rejected."""
    rows = []
    for r in addition_chats(n):
        question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        rows.append({"prompt": question, "chosen": answer, "rejected": str(int(answer) + 7)})
    return rows


def config(tmp_path: Path, method: str, **training) -> Path:
    data = write_jsonl(tmp_path / f"{method}.jsonl",
                       pairs() if method in ("dpo", "orpo") else addition_chats(40, undesirable_every=3))
    return tiny_yaml(tmp_path, data={"path": str(data)}, training={"method": method, **training})


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def adapter_hash(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "adapter" / "adapters.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["kto", "dpo"])
def test_a_stopped_run_resumes_exactly(method, tmp_path, capsys, embedded_dir):
    whole, split = tmp_path / "whole", tmp_path / "split"
    for d in (whole, split):
        d.mkdir()
    code, out, _ = cli(capsys, "--config", config(whole, method), "train")
    assert code == 0, out
    cfg = config(split, method)
    assert cli(capsys, "--config", cfg, "train", "--stop-after", "2")[0] == 0
    assert (split / "runs" / "run" / "checkpoints" / "step_000002" / "reference_logps.safetensors").is_file()
    code, out, _ = cli(capsys, "--config", cfg, "train", "--resume", "latest")
    assert code == 0, out
    a, b = whole / "runs" / "run", split / "runs" / "run"
    steps_a, steps_b = events(a, "Step"), events(b, "Step")
    assert [s["loss"] for s in steps_a] == [s["loss"] for s in steps_b]
    assert [s["preference"] for s in steps_a] == [s["preference"] for s in steps_b]
    assert adapter_hash(a) == adapter_hash(b)
    first = steps_a[0]["preference"]
    # Step 1 scores the policy before any update: it is the reference, so every reward is 0.
    assert first["method"] == method and abs(first["chosen_reward"] or 0) < 1e-3
    assert "rewards" in (a / "train.log").read_text()
    report = json.loads((a / "report.json").read_text())
    assert report["method"] == method and report["preference"]["last_validation"]["accuracy"] is not None
    assert report["best_val_perplexity"] is None


def test_orpo_trains_without_a_reference_and_reports_its_nll(tmp_path, capsys, embedded_dir):
    code, out, _ = cli(capsys, "--config", config(tmp_path, "orpo"), "train")
    assert code == 0, out
    run_dir = tmp_path / "runs" / "run"
    steps = events(run_dir, "Step")
    assert all(s["preference"]["nll"] > 0 for s in steps)
    assert not list(run_dir.glob("checkpoints/*/reference_logps.safetensors"))
    assert steps[-1]["loss"] < steps[0]["loss"]  # the NLL term learns the sums within 4 steps at lr 1e-3


def test_kto_on_top_of_sft_uses_the_sft_adapter_as_reference(tmp_path, capsys, embedded_dir, monkeypatch):
    sft = tiny_yaml(tmp_path, "sft.yaml", data={"path": str(write_jsonl(tmp_path / "d.jsonl",
                                                                           addition_chats(40, undesirable_every=3)))},
                    output={"run_name": "sft"})
    assert cli(capsys, "--config", sft, "train")[0] == 0
    code, out, err = cli(capsys, "--config", sft, "train", "--method", "kto", "--run-name", "kto",
                         "--init-adapter", tmp_path / "runs" / "sft", "--iterations", "2")
    assert code == 0, out + err
    first = events(tmp_path / "runs" / "kto", "Step")[0]["preference"]
    # Had the reference been the base, the SFT adapter's log ratio would show as reward at step 1.
    assert abs(first["chosen_reward"]) < 1e-3 and (first["rejected_reward"] is None or
                                                   abs(first["rejected_reward"]) < 1e-3)
    assert json.loads((tmp_path / "runs" / "kto" / "report.json").read_text())["init_adapter"]
    # An adapter trained with other LoRA settings would load under another scale: refused, one line.
    monkeypatch.setenv("LORA_TUI__LORA__ALPHA", "16")
    code, _, err = cli(capsys, "--config", sft, "train", "--method", "kto", "--run-name", "kto-2",
                       "--init-adapter", tmp_path / "runs" / "sft", "--iterations", "2")
    assert code == 2 and "lora.alpha" in one_error_line(err)


def test_refusals_are_one_line(tmp_path, capsys, embedded_dir):
    labelled = config(tmp_path, "kto")
    code, _, err = cli(capsys, "--config", labelled, "train", "--method", "dpo", "--run-name", "dpo")
    assert code == 3 and "needs pair rows" in one_error_line(err) and "training.method: kto" in err
    code, _, err = cli(capsys, "--config", labelled, "train", "--init-adapter", tmp_path / "nowhere",
                       "--run-name", "x")
    assert code == 2 and "nowhere" in one_error_line(err)
    code, _, err = cli(capsys, "--config", labelled, "train", "--method", "ipo")
    assert code == 2 and "training.method" in err
