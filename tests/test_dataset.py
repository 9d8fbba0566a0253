"""The dataset validator: exact errors for a corpus of malformed lines, formats, labels, statistics."""

import json

import pytest

from engine.config.schema import Config
from engine.data import DatasetError, prepare_dataset, validate_dataset
from helpers import FIXTURES, ROOT


def test_malformed_corpus_reports_exact_errors(tokenizer):
    report, _ = validate_dataset(FIXTURES / "malformed.jsonl", tokenizer)
    got = [{"line": i.line, "field": i.field, "reason": i.reason} for i in report.issues if i.severity == "error"]
    expected = json.loads((FIXTURES / "malformed.expected.json").read_text())
    assert got == expected
    assert report.lines == 31 and report.blank_lines == 1
    assert report.valid == 5 and report.error_lines == len(expected)
    assert report.formats == {"seed": 2, "chat": 1, "completion": 1, "text": 1}
    assert report.failed  # 25 of 30 records are bad: far over the 5% threshold


def test_structure_only_validation_needs_no_tokenizer():
    report, _ = validate_dataset(FIXTURES / "malformed.jsonl")
    assert report.valid == 5 and report.lengths == []


def test_sample_dataset_is_clean_and_labelled(tokenizer):
    report, _ = validate_dataset(ROOT / "data" / "tool_calls.jsonl", tokenizer, train_labels=["desirable"])
    assert report.issue_count == 0 and not report.failed
    assert report.records >= 1000
    assert report.labels["desirable"] > 0 and report.labels["undesirable"] > 0
    assert report.set_aside == {"undesirable": report.labels["undesirable"]}
    p = report.length_percentiles()
    assert p["min"] <= p["p50"] <= p["p95"] <= p["max"] < 1024 and report.truncated == 0
    counts, edges = report.histogram(10)
    assert sum(counts) == report.valid and len(edges) == 11


def test_truncation_is_counted_and_hopeless_rows_rejected(tokenizer, tmp_path):
    long_answer = {"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "word " * 200}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200},
                                {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(long_answer) + "\n" + json.dumps(long_prompt) + "\n")
    report, examples = validate_dataset(path, tokenizer, max_seq_length=64, keep_examples=True)
    assert report.truncated == 1 and report.valid == 1
    warn, err = report.issues
    assert warn.severity == "warning" and warn.line == 1 and "truncated to max_seq_length=64" in warn.reason
    assert err.line == 2 and "removes every assistant token" in err.reason
    assert len(examples[0].encoded) == 64
    assert report.lengths[0] > 64  # the histogram shows the length before truncation


def test_error_threshold(tmp_path, tokenizer):
    good = json.dumps({"prompt": "a", "completion": "b"})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good] * 96 + ["{oops"] * 4) + "\n")
    assert not validate_dataset(path, tokenizer, error_threshold=0.05)[0].failed
    assert validate_dataset(path, tokenizer, error_threshold=0.03)[0].failed


@pytest.mark.parametrize("make,needle", [
    (lambda p: p, "no such file"),
    (lambda p: (p.mkdir(), p)[1], "is a directory"),
])
def test_unusable_paths(tmp_path, make, needle):
    with pytest.raises(DatasetError, match=needle):
        validate_dataset(make(tmp_path / "x.jsonl"))


def test_bom_crlf_and_blank_lines_are_fine(tmp_path):
    line = json.dumps({"prompt": "a", "completion": "b"})
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\r\n\r\n" + line.encode() + b"\r\n")
    report, _ = validate_dataset(path)
    assert report.valid == 2 and report.issue_count == 0


def test_prepare_sets_aside_undesirable_rows_and_splits(tokenizer):
    cfg = Config()
    data = prepare_dataset(cfg, tokenizer, path=str(ROOT / "data" / "tool_calls.jsonl"))
    assert all(e.label == "desirable" for e in data.train + data.valid)
    assert len(data.train) + len(data.valid) == data.report.labels["desirable"]
    cfg.data.train_labels = []
    everything = prepare_dataset(cfg, tokenizer, path=str(ROOT / "data" / "tool_calls.jsonl"))
    assert len(everything.train) + len(everything.valid) == everything.report.valid


def test_prepare_refuses_a_bad_file_with_a_summary(tokenizer):
    with pytest.raises(DatasetError, match=r"25 of 30 lines are bad \(83.3% > error_threshold 5%\); "
                                           r"first: line 2: invalid JSON"):
        prepare_dataset(Config(), tokenizer, path=str(FIXTURES / "malformed.jsonl"))


def test_template_that_drops_tool_role_and_system_prompt_is_reported(mistral_tokenizer):
    report, examples = validate_dataset(ROOT / "data" / "tool_calls.jsonl", mistral_tokenizer,
                                        keep_examples=True)
    assert report.issue_count == 0
    assert any("tool turns rendered as user turns" in w for w in report.warnings)
    assert any("drops the system prompt" in w for w in report.warnings)
