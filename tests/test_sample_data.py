"""scripts/make_sample_data.py: deterministic, its no-tool rows leave the tool rows as they were, and the
committed data files are what it writes."""

import importlib.util
import json

from helpers import ROOT

FILES = ("tool_calls.jsonl", "heldout.jsonl", "heldout_answers.jsonl")
SMALL = ["--count", "30", "--no-tool", "6", "--heldout", "12", "--heldout-no-tool", "4", "--answers", "6"]


def make(out, *args) -> dict[str, bytes]:
    spec = importlib.util.spec_from_file_location("make_sample_data", ROOT / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(out), *args])
    return {name: (out / name).read_bytes() for name in FILES}


def rows(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def test_same_command_same_bytes(tmp_path):
    assert make(tmp_path / "a", *SMALL) == make(tmp_path / "b", *SMALL)


def test_no_tool_rows_are_interleaved_without_changing_the_tool_rows(tmp_path):
    written = make(tmp_path / "a", *SMALL)
    args = list(SMALL)
    args[3] = args[7] = "0"  # --no-tool 0 --heldout-no-tool 0: the dataset as it was before them
    before = make(tmp_path / "b", *args)
    lines = written["tool_calls.jsonl"].decode().splitlines(keepends=True)
    assert len(lines) == 36
    assert "".join(line for i, line in enumerate(lines) if i % 6 != 5).encode() == before["tool_calls.jsonl"]
    no_tool = [json.loads(line) for i, line in enumerate(lines) if i % 6 == 5]
    assert all("<tool_call>" not in str(r["conversations"][2]) for r in no_tool if r["label"] == "desirable")
    assert written["heldout.jsonl"].startswith(before["heldout.jsonl"])
    assert [r["expected"] for r in rows(written["heldout.jsonl"])[12:]] == [None] * 4


def test_committed_data_is_what_the_script_writes(tmp_path):
    written = make(tmp_path)
    for name in FILES:
        assert (ROOT / "data" / name).read_bytes() == written[name], f"data/{name}: rerun scripts/make_sample_data.py"
    data = rows(written["tool_calls.jsonl"])
    no_tool = data[5::6]
    labels = [r["label"] for r in data]
    assert len(data) == 1440 and labels.count("desirable") == 1072 and labels.count("undesirable") == 368
    assert [r["label"] for r in no_tool].count("undesirable") == 48
    heldout = rows(written["heldout.jsonl"])
    assert len(heldout) == 160 and sum(h["expected"] is None for h in heldout) == 40
    assert [h["id"] for h in heldout] == [f"h{i:04d}" for i in range(160)]
    assert len(rows(written["heldout_answers.jsonl"])) == 40
