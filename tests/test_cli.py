"""The headless CLI: one-line errors and documented exit codes, never a traceback."""

import json

import pytest

from helpers import FIXTURES, lora_tui


def test_validate_sample_dataset_ok(embedded_dir):
    r = lora_tui("validate")
    assert r.returncode == 0, r.stderr
    assert "1440 of 1440 conversations valid" in r.stdout


def test_validate_bad_dataset_lists_lines_and_exits_3(embedded_dir):
    r = lora_tui("validate", "--dataset", str(FIXTURES / "malformed.jsonl"))
    assert r.returncode == 3
    assert "malformed.jsonl:line 2: invalid JSON" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("lora-tui: error: ")
    assert "Traceback" not in r.stderr


def test_validate_json_report(embedded_dir):
    r = lora_tui("validate", "--json", "--no-tokenize")
    report = json.loads(r.stdout)
    assert report["valid"] == 1440 and report["failed"] is False


@pytest.mark.parametrize("args,code,needle", [
    (["validate", "--dataset", "/no/such.jsonl"], 3, "/no/such.jsonl: no such file"),
    (["--config", "/no/such.yaml", "validate"], 2, "config file /no/such.yaml does not exist"),
    (["validate", "--bogus"], 2, "unrecognized arguments: --bogus"),
])
def test_user_mistakes(args, code, needle):
    r = lora_tui(*args)
    assert r.returncode == code and needle in r.stderr and "Traceback" not in r.stderr


def test_bad_config_value_names_field(tmp_path):
    (tmp_path / "c.yaml").write_text("lora:\n  rank: 0\ntraining:\n  lerning_rate: 1\n")
    r = lora_tui("--config", str(tmp_path / "c.yaml"), "config")
    assert r.returncode == 2
    assert "lora.rank: 0 is out of range (valid: 1 <= x <= 1024)" in r.stderr
    assert "did you mean 'training.learning_rate'" in r.stderr
