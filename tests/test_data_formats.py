"""Every container a dataset comes in, each file written in the test by the library people write it with
(json, csv, pandas, pyarrow, Hugging Face `datasets`, gzip, sqlite3): the same rows give the same report and
the same tokens in each; broken rows are named by their line or row, field and reason; formats we do not
read, a hub id offline, a weighted mix of containers, and memory that stays flat for a large file."""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
import socket
import sqlite3
import tracemalloc
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from engine.config.schema import Config
from engine.config.validation import coerce_columns, coerce_sources
from engine.data import DatasetError, prepare_dataset, validate_dataset, validate_with_config
from helpers import tiny_config, write_jsonl

import datasets  # noqa: E402 - dependencies of lora-tui itself: a missing one must fail, not skip
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.feather as feather  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


# ------------------------------------------------------------------------------------------------- the rows

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def tool_chat(city: str, temp: int, label: str | None = None) -> dict:
    """A tool-calling chat; the call's arguments are a JSON string (an Arrow struct column would merge the
    argument keys of every row)."""
    row = {"messages": [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "content": json.dumps({"temp_c": temp}), "name": "get_weather"},
        {"role": "assistant", "content": f"It is {temp} C in {city}."}], "tools": TOOLS}
    return row | ({"label": label} if label else {})


# Two halves with every shape in each, so that each of two files of a folder holds every column.
ROWS = [
    tool_chat("Lisbon", 21, "desirable"),
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}], "label": "desirable"},
    {"prompt": "Capital of France?", "completion": "Paris", "label": "desirable"},
    {"prompt": "Capital of Italy?", "completion": "Paris", "label": "undesirable"},
    {"instruction": "Translate to French", "input": "cat", "output": "chat", "label": "desirable"},
    {"instruction": "Say hi", "output": "Hi!", "system": "You are polite."},
    {"instruction": "And now?", "output": "Still here.", "history": [["Are you there?", "Yes."]]},
    {"instruction": "Pick the better word", "input": "fast", "chosen": "quick", "rejected": "slow"},
    {"prompt": "3+3?", "chosen": "6", "rejected": "7"},
    {"text": "Plain text to learn from."},

    tool_chat("Oslo", -3, "undesirable"),
    {"messages": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                  {"role": "assistant", "content": "Goodbye."}]},
    {"prompt": "Capital of Spain?", "completion": "Madrid"},
    {"prompt": "Colour of the sky?", "completion": "Blue", "label": "desirable"},
    {"instruction": "Sum", "input": "1 2", "output": "3", "system": "Math bot.", "label": "undesirable"},
    {"instruction": "Greet", "output": "Good morning.", "label": "desirable"},
    {"instruction": "Next?", "output": "Three.", "history": [["One?", "One."], ["Two?", "Two."]],
     "label": "desirable"},
    {"instruction": "Better answer", "chosen": "Certainly.", "rejected": "No.", "system": "Be kind."},
    {"prompt": "5*5?", "chosen": "25", "rejected": "20"},
    {"text": "Another plain text."},
]
FORMATS = {"chat": 4, "completion": 4, "alpaca": 6, "pair": 4, "text": 2}
LABELS = {"desirable": 7, "undesirable": 3, "unlabelled": 6}  # a pair row without a label is not counted


def full(rows: list[dict]) -> list[dict]:
    """Every row with every column, None where it has none: how a table holds rows of several shapes."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def as_cells(rows: list[dict]) -> list[dict]:
    """Rows for a CSV: lists and objects as JSON text (the reader decodes structured cells)."""
    return [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows]


# --------------------------------------------------------------------- writers: each container by its library

def w_jsonl(d: Path, rows) -> str:
    return str(write_jsonl(d / "data.jsonl", rows))


def w_json(d: Path, rows) -> str:
    (d / "data.json").write_text(json.dumps(rows))
    return str(d / "data.json")


def w_json_pretty(d: Path, rows) -> str:
    (d / "pretty.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    return str(d / "pretty.json")


def w_csv(d: Path, rows) -> str:
    pd.DataFrame(as_cells(rows)).to_csv(d / "data.csv", index=False)
    return str(d / "data.csv")


def w_tsv(d: Path, rows) -> str:
    pd.DataFrame(as_cells(rows)).to_csv(d / "data.tsv", index=False, sep="\t")
    return str(d / "data.tsv")


def w_parquet_pandas(d: Path, rows) -> str:
    pd.DataFrame(rows).to_parquet(d / "pandas.parquet")
    return str(d / "pandas.parquet")


def w_parquet_pyarrow(d: Path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(full(rows)), d / "pyarrow.parquet")
    return str(d / "pyarrow.parquet")


def w_feather(d: Path, rows) -> str:
    feather.write_feather(pa.Table.from_pylist(full(rows)), d / "data.feather")  # Arrow IPC file (Feather v2)
    return str(d / "data.feather")


def w_arrow_stream(d: Path, rows) -> str:
    table = pa.Table.from_pylist(full(rows))
    with pa.OSFile(str(d / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=7)
    return str(d / "stream.arrow")


def w_datasets(d: Path, rows) -> str:
    datasets.Dataset.from_list(full(rows)).save_to_disk(str(d / "ds"))
    return str(d / "ds")


def w_datasets_dict(d: Path, rows) -> str:
    """train and test splits: the folder's own name picks train."""
    test = [{"prompt": "only in test", "completion": "yes"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(full(rows)),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(d / "dsdict"))
    return str(d / "dsdict")


def w_parquet_folder(d: Path, rows) -> str:
    table = pa.Table.from_pylist(full(rows))
    (d / "pqdir").mkdir()
    half = len(rows) // 2
    pq.write_table(table.slice(0, half), d / "pqdir" / "part-0.parquet")
    pq.write_table(table.slice(half), d / "pqdir" / "part-1.parquet")
    return str(d / "pqdir")


def w_jsonl_folder(d: Path, rows) -> str:
    (d / "jsondir").mkdir()
    half = len(rows) // 2
    write_jsonl(d / "jsondir" / "part-0.jsonl", rows[:half])
    write_jsonl(d / "jsondir" / "part-1.jsonl", rows[half:])
    return str(d / "jsondir")



# (writer, shape as the report names it, unit, number of the first row)
CONTAINERS = {
    "jsonl": (w_jsonl, "JSONL", "line", 1),
    "json-array": (w_json, "JSON array", "row", 0),
    "json-pretty": (w_json_pretty, "JSON array", "row", 0),
    "csv": (w_csv, "CSV", "line", 2),
    "tsv": (w_tsv, "TSV", "line", 2),
    "parquet-pandas": (w_parquet_pandas, "Parquet", "row", 0),
    "parquet-pyarrow": (w_parquet_pyarrow, "Parquet", "row", 0),
    "arrow-feather": (w_feather, "Arrow", "row", 0),
    "arrow-stream": (w_arrow_stream, "Arrow", "row", 0),
    "datasets-folder": (w_datasets, "`datasets` folder", "row", 0),
    "datasets-dict": (w_datasets_dict, "`datasets` folder", "row", 0),
    "parquet-folder": (w_parquet_folder, "folder of parquet files (load_dataset)", "row", 0),
    "jsonl-folder": (w_jsonl_folder, "folder of jsonl files (load_dataset)", "row", 0),
}


def containers(*skip: str):
    return [pytest.param(name, id=name) for name in CONTAINERS if name not in skip]


def numbers(name: str, indices) -> list[int]:
    """Where rows `indices` are found in container `name`: their line (text) or their index (tables)."""
    first = CONTAINERS[name][3]
    return [first + i for i in indices]


# ---------------------------------------------------------------------- 1. the same rows in every container

@pytest.fixture(scope="module")
def baseline(tokenizer, tmp_path_factory):
    """The JSONL file of ROWS, validated and tokenized: what every other container must give."""
    path = w_jsonl(tmp_path_factory.mktemp("baseline"), ROWS)
    report, examples = validate_dataset(path, tokenizer, keep_examples=True)
    assert report.issue_count == 0 and report.valid == len(ROWS) and not report.failed
    assert dict(report.formats) == FORMATS and dict(report.labels) == LABELS and report.pairs == 4
    return report, examples


def tokens_of(examples) -> list[tuple]:
    return [(e.label, e.encoded.tokens.tolist(), e.encoded.trained.tolist(),
             None if e.rejected is None else (e.rejected.tokens.tolist(), e.rejected.trained.tolist()))
            for e in examples]


@pytest.mark.parametrize("name", containers())
def test_every_container_gives_the_same_report_and_tokens(name, tmp_path, tokenizer, baseline):
    writer, shape, unit, first = CONTAINERS[name]
    path = writer(tmp_path, ROWS)
    report, examples = validate_dataset(path, tokenizer, keep_examples=True)
    base, base_examples = baseline
    assert report.issues == [] and report.unread == "" and not report.failed
    assert report.shape == shape
    assert (report.valid, report.records, report.pairs) == (len(ROWS), len(ROWS), 4)
    assert report.labels == base.labels and report.formats == base.formats
    # the same chat template and masks: per-row lengths, trained tokens, every token and its mask
    assert report.lengths == base.lengths and report.trained_tokens == base.trained_tokens
    assert tokens_of(examples) == tokens_of(base_examples)
    assert [e.line for e in examples] == numbers(name, range(len(ROWS)))  # rows named as the file has them


def test_json_array_rows_are_numbered_as_rows(tmp_path):
    """A JSON array's elements are numbered by index from 0, and named as rows (not lines)."""
    report, _ = validate_dataset(w_json(tmp_path, ROWS))
    assert report.unit == "row"


def test_a_datasets_folder_picks_its_split(tmp_path):
    path = w_datasets_dict(tmp_path, ROWS)
    default, _ = validate_dataset(path)
    assert default.valid == len(ROWS) and default.formats == FORMATS  # train
    test, _ = validate_dataset(f"{path}:test")
    assert (test.valid, test.records) == (1, 1) and test.shape == "`datasets` folder (split test)"


def test_a_datasets_folder_without_train_names_its_splits(tmp_path):
    small = datasets.Dataset.from_list([{"prompt": "q", "completion": "a"}] * 3)
    datasets.DatasetDict({"validation": small, "test": small}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DatasetError) as err:
        validate_dataset(tmp_path / "two")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "two") in msg
    assert "validation" in msg and "test" in msg and f"{tmp_path / 'two'}:validation" in msg
    # one split under another name is the only choice: it is read
    datasets.DatasetDict({"eval": small}).save_to_disk(str(tmp_path / "one"))
    assert validate_dataset(tmp_path / "one")[0].valid == 3
    assert validate_dataset(f"{tmp_path / 'two'}:validation")[0].valid == 3


def test_labels_as_pandas_and_csv_write_booleans(tmp_path):
    """true/false, "true"/"false" and 1/0 labels, as a bool, int or text column holds them."""
    base = {"prompt": ["a", "b", "c", "d"], "completion": ["w", "x", "y", "z"]}
    cases = {
        "bool.parquet": [True, False, True, None],
        "int.parquet": [1, 0, 1, 0],
        "text.parquet": ["true", "false", "TRUE", None],
        "word.parquet": ["desirable", "undesirable", "desirable", None],
    }
    for name, labels in cases.items():
        pd.DataFrame(base | {"label": labels}).to_parquet(tmp_path / name)
        report, _ = validate_dataset(tmp_path / name)
        assert report.issues == [], name
        assert report.labels["desirable"] == 2 and report.labels["undesirable"] >= 1, name
    pd.DataFrame(base | {"label": [True, False, 1, 0]}).to_csv(tmp_path / "mixed.csv", index=False)
    assert (tmp_path / "mixed.csv").read_text().splitlines()[1:3] == ["a,w,True", "b,x,False"]
    report, _ = validate_dataset(tmp_path / "mixed.csv")
    assert report.issues == [] and report.labels == {"desirable": 2, "undesirable": 2}


def test_a_pandas_01_label_column_with_a_gap_is_read(tmp_path):
    pd.DataFrame({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"],
                  "label": [1, 0, None]}).to_parquet(tmp_path / "gap.parquet")
    report, _ = validate_dataset(tmp_path / "gap.parquet")
    assert report.issues == [] and report.labels == {"desirable": 1, "undesirable": 1, "unlabelled": 1}


# ----------------------------------------------------------------------------- 2. broken rows, by line or row

BROKEN = [  # each half holds every column: a folder of two JSONL files must agree on them (see below)
    {"prompt": "What is 1+1?", "completion": "2", "label": "desirable"},
    {"prompt": "A prompt\nover three\nlines", "completion": "ok"},  # a quoted multi-line cell in a CSV
    {"prompt": "Where is the answer?"},
    {"instruction": "Say bye", "input": "politely", "output": "Goodbye."},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "poof"}]},
    {"prompt": "a", "completion": "b", "label": "maybe"},
    {"instruction": "Say hi", "input": "to Ann", "output": "   "},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "label": "desirable"},
    {"prompt": "last", "completion": "one"},
]
BROKEN_ISSUES = [  # (index, field, start of the reason)
    (2, "completion", "missing completion"),
    (4, "messages[1].role", "unknown role 'wizard'"),
    (5, "label", "bad label 'maybe'"),
    (6, "output", "empty output"),
]


def expected_number(name: str, index: int) -> int:
    if name in ("csv", "tsv"):  # header = line 1; row 1's cell spans three lines
        return index + 2 + (2 if index > 1 else 0)
    return numbers(name, [index])[0]


@pytest.mark.parametrize("name", containers())
def test_broken_rows_are_named_by_line_or_row(name, tmp_path):
    writer, _, unit, _ = CONTAINERS[name]
    report, _ = validate_dataset(writer(tmp_path, BROKEN), error_threshold=0.5)
    assert report.unit == unit and report.unread == ""
    assert (report.valid, report.error_lines, report.records) == (6, 4, 10)
    got = [(i.line, i.field, i.reason) for i in report.issues]
    assert [g[:2] for g in got] == [(expected_number(name, i), f) for i, f, _ in BROKEN_ISSUES]
    for (_, _, reason), (index, field, start) in zip(got, BROKEN_ISSUES):
        assert reason.startswith(start), (reason, start)
    texts = [str(i) for i in report.issues]
    n = expected_number(name, 2)
    assert texts[0] == f"{unit} {n}: completion: missing completion"
    assert texts[3].startswith(f"{unit} {expected_number(name, 6)}: output: empty output")


@pytest.mark.parametrize("name", ["jsonl", "csv", "parquet-pandas", "datasets-folder", "json-array",
                                  "json-pretty"])
def test_a_bad_rows_preview_shows_that_row(name, tmp_path):
    """The dataset screen previews a bad row from its issue's unit and number (record_text)."""
    from engine.data.sources import record_text
    path = CONTAINERS[name][0](tmp_path, BROKEN)
    report, _ = validate_dataset(path, error_threshold=0.5)
    issue = report.issues[0]
    preview = record_text(path, report.unit, issue.line)
    assert "Where is the answer?" in preview


def test_csv_broken_json_cell_and_too_many_cells(tmp_path):
    path = tmp_path / "broken.csv"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    pretty = json.dumps(chat, indent=2)  # a quoted cell over several lines
    spans = pretty.count("\n") + 1
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["messages", "label"])
        w.writerow([json.dumps(chat), "desirable"])                       # line 2
        w.writerow([pretty, ""])                                         # lines 3 .. 2 + spans
        w.writerow(['[{"role": "user", "content": "hi"}', "desirable"])  # the list is not closed
        w.writerow([json.dumps(chat), "desirable", "an extra cell"])
        w.writerow([json.dumps(chat), "true"])
    report, _ = validate_dataset(path, error_threshold=0.5)
    assert report.shape == "CSV" and report.unit == "line" and report.lines == 5 + spans
    assert (report.valid, report.error_lines) == (3, 2) and report.labels == {"desirable": 2, "unlabelled": 1}
    bad_json, extra = report.issues
    assert (bad_json.line, bad_json.field) == (3 + spans, "messages") and bad_json.reason.startswith("invalid JSON")
    assert str(bad_json).startswith(f"line {3 + spans}: messages: invalid JSON")
    assert str(extra) == (f"line {4 + spans}: has 3 cells, the header has 2 columns (an unquoted delimiter or "
                          "newline inside a cell?)")


def test_a_folder_of_jsonl_files_that_disagree_on_columns_is_one_line(tmp_path):
    """`datasets` takes a folder's columns from its first file: a second file with other columns cannot be
    cast to them. The read stops with a report (no traceback), the rows before it counted."""
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "a.jsonl", [{"prompt": "q", "completion": "a"}] * 3)
    write_jsonl(tmp_path / "dir" / "b.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                             {"role": "assistant", "content": "a"}]}] * 3)
    report, _ = validate_dataset(tmp_path / "dir")
    assert report.failed and report.unread.startswith("row ") and "unreadable from here on" in report.unread
    assert "\n" not in report.unread and report.valid <= 3


def test_a_csv_text_prompt_starting_with_a_bracket_is_text(tmp_path):
    """prompt, chosen and rejected may hold a JSON list of messages, or text that starts with [ or {."""
    pd.DataFrame({"prompt": ["[1, 2] sum?", "{x} stands for?", "[INST] hi"],
                  "completion": ["3", "a name", "hello"]}).to_csv(tmp_path / "p.csv", index=False)
    report, _ = validate_dataset(tmp_path / "p.csv")
    assert report.issues == [] and report.valid == 3


# ------------------------------------------------------------------------------------ 3. the error threshold

TEN = [{"prompt": f"{i}+1", "completion": str(i + 1)} for i in range(10)]
TEN[3] = {"prompt": "3+1"}


@pytest.mark.parametrize("name", ["parquet-pandas", "csv", "datasets-folder", "parquet-folder", "jsonl"])
def test_one_bad_row_in_ten_fails_at_5_percent_and_passes_at_20(name, tmp_path, tokenizer):
    writer, _, unit, _ = CONTAINERS[name]
    path = writer(tmp_path, TEN)
    cfg = tiny_config(tmp_path, data={"path": path})
    assert cfg.data.error_threshold == 0.05
    with pytest.raises(DatasetError) as err:
        prepare_dataset(cfg, tokenizer)
    msg = str(err.value)
    n = numbers(name, [3])[0]
    assert msg.startswith(f"{path}: 1 of 10 {unit}s are bad (10.0% > error_threshold 5%)"), msg
    assert msg.endswith(f"first: {unit} {n}: completion: missing completion")
    cfg.data.error_threshold = 0.2
    data = prepare_dataset(cfg, tokenizer)
    assert len(data.train) + len(data.valid) == 9 and not data.report.failed


# ------------------------------------------------------------------------------------------- 4. data.columns

QA = pd.DataFrame({
    "question": ["2+2?", "Capital of France?", "Sky colour?", "3*3?", "Best pet?"],
    "answer": ["4", "Paris", "", "9", "A cat"],
    "rating": ["true", "false", "true", "maybe", "true"],
})
QA_COLUMNS = {"prompt": "question", "completion": "answer", "label": "rating"}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_data_columns_map_the_users_columns(fmt, tmp_path):
    path = tmp_path / f"qa.{fmt}"
    if fmt == "csv":
        QA.to_csv(path, index=False)
    else:
        QA.replace({"answer": {"": None}}).to_parquet(path)  # a table's missing value is null
    cfg = Config()
    cfg.data.path, cfg.data.columns = str(path), dict(QA_COLUMNS)
    assert coerce_columns("prompt=question, completion=answer, label=rating") == (QA_COLUMNS, None)
    report, _ = validate_with_config(cfg, None)
    assert report.columns == QA_COLUMNS and report.warnings == []
    assert report.valid == 3 and report.labels == {"desirable": 2, "undesirable": 1}
    assert report.formats == {"completion": 3}
    first = 2 if fmt == "csv" else 0
    unit = "line" if fmt == "csv" else "row"
    missing, bad_label = report.issues
    assert str(missing) == f"{unit} {first + 2}: answer: missing completion"  # the user's column, not ours
    assert bad_label.field == "rating" and str(bad_label).startswith(f"{unit} {first + 3}: rating: bad label 'maybe'")


def test_a_mapped_column_no_row_has_is_a_warning(tmp_path):
    QA.to_csv(tmp_path / "qa.csv", index=False)
    cfg = Config()
    cfg.data.path = str(tmp_path / "qa.csv")
    cfg.data.columns = {"prompt": "question", "completion": "answer", "label": "grade"}
    report, _ = validate_with_config(cfg, None)
    assert report.labels == {"unlabelled": 4}  # rating is not read as the label
    warning, = [w for w in report.warnings if "grade" in w]
    assert "data.columns maps label to 'grade'" in warning and "no row has a 'grade' field" in warning
    assert "question" in warning and "rating" in warning  # the fields the file has


def test_a_csv_column_mapped_to_messages_is_decoded(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    pd.DataFrame({"dialog": [json.dumps(chat)] * 3}).to_csv(tmp_path / "d.csv", index=False)
    report, _ = validate_dataset(tmp_path / "d.csv", columns={"messages": "dialog"})
    assert report.issues == [] and report.valid == 3


# -------------------------------------------------------------------------------- 5. OpenAI content parts

def parts_rows(with_image: bool) -> list[dict]:
    second = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}} if with_image else \
        {"type": "text", "text": "a cat on a mat"}
    return [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, second]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]},
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_content_parts_are_joined_and_images_refused(fmt, tmp_path, tokenizer):
    def write(rows, name):
        if fmt == "jsonl":
            return write_jsonl(tmp_path / f"{name}.jsonl", rows)
        pd.DataFrame(rows).to_parquet(tmp_path / f"{name}.parquet")
        return tmp_path / f"{name}.parquet"

    plain = write_jsonl(tmp_path / "plain.jsonl", [
        {"messages": [{"role": "user", "content": "Look:\na cat on a mat"},
                      {"role": "assistant", "content": "A cat."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    report, examples = validate_dataset(write(parts_rows(False), "text"), tokenizer, keep_examples=True)
    _, expected = validate_dataset(plain, tokenizer, keep_examples=True)
    assert report.issues == [] and report.valid == 2
    assert tokens_of(examples) == tokens_of(expected)  # the text parts, joined with "\n"
    report, _ = validate_dataset(write(parts_rows(True), "image"), error_threshold=0.6)
    issue, = report.issues
    first = 1 if fmt == "jsonl" else 0
    assert issue.field == "messages[0].content[1]"
    assert str(issue).startswith(f"{'line' if fmt == 'jsonl' else 'row'} {first}: messages[0].content[1]: a "
                                 "'image_url' part")
    assert report.valid == 1


# ------------------------------------------------------------------------------- 6. a JSON array cut short

ARRAY = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]


def array_text() -> tuple[str, int, int]:
    """ARRAY pretty-printed, with the offset and line where element 3 starts."""
    text = json.dumps(ARRAY, indent=2)
    start = text.index('{\n    "prompt": "q3"')
    return text, start, text.count("\n", 0, start) + 1


@pytest.mark.parametrize("how", ["cut-inside-an-element", "cut-after-a-comma", "broken-element"])
def test_a_broken_json_array_stops_the_read_at_its_line(how, tmp_path, tokenizer):
    text, start, line = array_text()
    if how == "cut-inside-an-element":
        text = text[:start + 12]
        words = "invalid JSON"
    elif how == "cut-after-a-comma":
        text = text[:start]
        words = "the JSON array is not closed (missing ']')"
        line = text.count("\n") + 1
    else:
        text = text.replace('"prompt": "q3"', 'prompt: "q3"')  # an unquoted key
        words = "invalid JSON: Expecting property name enclosed in double quotes"
    path = tmp_path / "cut.json"
    path.write_text(text)
    report, _ = validate_dataset(path)
    assert report.shape == "JSON array"
    assert report.valid == 3  # elements 0-2; nothing past the break is read, good or not
    assert report.failed and report.unread
    assert f"line {line}: {words}" in report.unread
    assert any("the rest is unread" in w for w in report.warnings)
    issue, = report.issues
    assert issue.line == 3 and issue.reason.startswith(f"line {line}: {words}")
    cfg = tiny_config(tmp_path, data={"path": str(path), "error_threshold": 0.9})
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: the read stopped at .*line {line}: .*the rest "
                                           "was not read"):
        prepare_dataset(cfg, tokenizer)


# ---------------------------------------------------------------------------- 7. formats we do not read

_XLSX_PARTS = {  # the smallest workbook Excel opens: one sheet, a header row and one data row (inline strings)
    "[Content_Types].xml": '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/><Override PartName="/xl/workbook.xml" ContentType='
    '"application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/><Override PartName='
    '"/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.'
    'worksheet+xml"/></Types>',
    "_rels/.rels": '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/'
    'officeDocument" Target="xl/workbook.xml"/></Relationships>',
    "xl/workbook.xml": '<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" xmlns:r='
    '"http://schemas.openxmlformats.org/officeDocument/2006/relationships"><sheets><sheet name="Sheet1" '
    'sheetId="1" r:id="rId1"/></sheets></workbook>',
    "xl/_rels/workbook.xml.rels": '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/'
    'relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
    'relationships/worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
    "xl/worksheets/sheet1.xml": '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
    '<sheetData><row r="1"><c r="A1" t="inlineStr"><is><t>prompt</t></is></c><c r="B1" t="inlineStr"><is><t>'
    'completion</t></is></c></row><row r="2"><c r="A2" t="inlineStr"><is><t>a</t></is></c><c r="B2" '
    't="inlineStr"><is><t>b</t></is></c></row></sheetData></worksheet>',
}


def _xlsx(p: Path) -> Path:
    # Written part by part with the standard library: pandas would need openpyxl, which lora-tui does not use.
    with zipfile.ZipFile(p / "sheet.xlsx", "w", zipfile.ZIP_DEFLATED) as z:
        for name, xml in _XLSX_PARTS.items():
            z.writestr(name, '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n' + xml)
    return p / "sheet.xlsx"


def _gzip(p: Path) -> Path:
    with gzip.open(p / "data.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    return p / "data.jsonl.gz"


def _sqlite(p: Path) -> Path:
    with sqlite3.connect(p / "data.db") as db:
        db.execute("create table rows (prompt text, completion text)")
        db.execute("insert into rows values ('a', 'b')")
    return p / "data.db"


def _random_text(p: Path) -> Path:
    rng = random.Random(0)
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(200))
    (p / "notes").write_text(words + "\n")
    return p / "notes"


@pytest.mark.parametrize("make,found", [
    (_xlsx, "a zip archive (an Excel workbook?)"),
    (_gzip, "gzip-compressed: decompress it first"),
    (_sqlite, "an SQLite database"),
    (_random_text, "not a dataset format we read (found text starting"),
], ids=["xlsx", "gzip", "sqlite", "random-text"])
def test_formats_we_do_not_read_are_one_line(make, found, tmp_path):
    path = make(tmp_path)
    with pytest.raises(DatasetError) as err:
        validate_dataset(path)
    msg = str(err.value)
    assert "\n" not in msg.strip() and msg.startswith(f"{path}: ")
    assert found in msg
    for shape in ("JSONL", "JSON array", "CSV/TSV", "Parquet", "Arrow", "`datasets` folder", "hub id"):
        assert shape in msg


def test_a_gzip_file_named_jsonl_is_named_gzip(tmp_path):
    with gzip.open(tmp_path / "data.jsonl", "wt") as fh:
        fh.writelines(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(50))
    with pytest.raises(DatasetError, match="gzip-compressed"):
        validate_dataset(tmp_path / "data.jsonl")


# --------------------------------------------------------------------------------------- 8. a hub id offline

@pytest.fixture
def no_network(monkeypatch):
    """Offline as HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 make it; every connection attempt is recorded and
    refused. The libraries read the variables when first imported, so their flags are set as well."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    attempts = []

    def refuse(what):
        def call(*args, **kwargs):
            attempts.append((what, args[:2]))
            raise OSError("no network in this test")
        return call

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    return attempts


def test_a_hub_id_offline_is_one_line_without_network(no_network):
    with pytest.raises(DatasetError) as err:
        validate_dataset("nobody-xyz/no-such-dataset")
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert msg.startswith("nobody-xyz/no-such-dataset: ")
    assert "offline" in msg.lower() and "local file" in msg
    assert no_network == []


def test_a_local_parquet_folder_goes_through_load_dataset_offline(no_network, tmp_path, monkeypatch):
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    path = w_parquet_folder(tmp_path, ROWS)
    report, _ = validate_dataset(path)
    assert report.shape == "folder of parquet files (load_dataset)" and report.unit == "row"
    assert report.valid == len(ROWS) and report.formats == FORMATS and report.labels == LABELS
    assert calls == [((path,), {"split": "train", "streaming": True})]
    assert no_network == []


# ------------------------------------------------------------------------------------- 9. a weighted mixture

def mixture_files(tmp_path: Path) -> tuple[str, str]:
    a = write_jsonl(tmp_path / "a.jsonl", [
        {"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": str(2 * i)}],
         "label": "desirable"} for i in range(50)])
    b = tmp_path / "b.parquet"
    pd.DataFrame({"prompt": [f"{i}*3" for i in range(50)], "completion": [str(3 * i) for i in range(50)]}
                 ).to_parquet(b)
    return str(a), str(b)


def test_a_weighted_mix_of_two_containers(tmp_path, tokenizer):
    a, b = mixture_files(tmp_path)
    cfg = tiny_config(tmp_path, data={"path": [{"path": a, "weight": 0.7}, {"path": b, "weight": 0.3}],
                                      "validation_split": 0.2})
    data = prepare_dataset(cfg, tokenizer)
    counts = Counter(e.source for e in data.train)
    assert counts == {0: 56, 1: 24}  # 80 training rows (40 of each), 70/30
    assert counts[0] / len(data.train) == pytest.approx(0.7)
    # each source keeps its own validation rows, never trained on
    assert Counter(e.source for e in data.valid) == {0: 10, 1: 10}
    valid = {(e.source, e.line) for e in data.valid}
    assert not valid & {(e.source, e.line) for e in data.train}
    assert {e.line for e in data.valid if e.source == 0} <= set(range(1, 51))  # JSONL lines
    assert {e.line for e in data.valid if e.source == 1} <= set(range(0, 50))  # Parquet rows
    assert len({e.line for e in data.train if e.source == 1}) == 24  # a smaller share: a sample, no repeats
    # the report: each source's container and share, one line each
    mix = data.report.mix
    assert len(mix) == 2
    assert mix[0].startswith(f"{a} [JSONL]: weight 0.7 = 70% of the training mix")
    assert mix[1].startswith(f"{b} [Parquet]: weight 0.3 = 30% of the training mix (")
    assert data.report.shape == "mix" and [p.shape for p in data.report.parts] == ["JSONL", "Parquet"]
    # the same seed gives the same rows; the form's string gives the same mix
    again = prepare_dataset(cfg, tokenizer)
    assert [(e.source, e.line) for e in again.train] == [(e.source, e.line) for e in data.train]
    assert [(e.source, e.line) for e in again.valid] == [(e.source, e.line) for e in data.valid]
    cfg.data.path = f"{a}*0.7, {b}*0.3"
    form = prepare_dataset(cfg, tokenizer)
    assert [(e.source, e.line) for e in form.train] == [(e.source, e.line) for e in data.train]
    cfg.training.seed += 1
    other = prepare_dataset(cfg, tokenizer)
    assert [(e.source, e.line) for e in other.train] != [(e.source, e.line) for e in data.train]


def test_the_mix_line_counts_the_rows_that_train(tmp_path, tokenizer):
    a, b = mixture_files(tmp_path)
    cfg = tiny_config(tmp_path, data={"path": [{"path": a, "weight": 0.7}, {"path": b, "weight": 0.3}],
                                      "validation_split": 0.2})
    data = prepare_dataset(cfg, tokenizer)
    used = sum(e.source == 1 for e in data.train)  # of its 40 training rows
    factor = float(re.search(r"its rows used ([\d.]+)x on average \(a sample\)", data.report.mix[1]).group(1))
    assert abs(factor - used / 40) < 0.05, (data.report.mix[1], used)


def test_weights_in_the_forms_string_and_bad_weights():
    assert coerce_sources("a.jsonl*0.7, b.parquet*0.3") == (
        [{"path": "a.jsonl", "weight": 0.7}, {"path": "b.parquet", "weight": 0.3}], None)
    assert coerce_sources("a.jsonl, b.parquet*2")[0] == [{"path": "a.jsonl", "weight": 1.0},
                                                         {"path": "b.parquet", "weight": 2.0}]
    for value, entry in [("a.jsonl*0, b.csv*1", "entry 1 (a.jsonl)"),
                         ("a.jsonl*1, b.csv*-0.5", "entry 2 (b.csv)"),
                         ("a.jsonl*x", "entry 1 (a.jsonl)"),
                         ([{"path": "a.jsonl", "weight": 1}, {"path": "b.csv", "weight": 0}], "entry 2 (b.csv)"),
                         ([{"path": "a.jsonl", "weight": "x"}], "entry 1 (a.jsonl)")]:
        parsed, err = coerce_sources(value)
        assert parsed is None and err.startswith(f"{entry}: weight must be a positive number, got "), (value, err)


def test_prepare_refuses_a_bad_weight_naming_the_entry(tmp_path, tokenizer):
    a, b = mixture_files(tmp_path)
    cfg = tiny_config(tmp_path, data={"path": [{"path": a, "weight": 0.7}, {"path": b, "weight": -1}]})
    with pytest.raises(DatasetError, match=r"^data\.path: entry 2 \(.*b\.parquet\): weight must be a positive"):
        prepare_dataset(cfg, tokenizer)


# ---------------------------------------------------------------------------------- 10. memory stays flat

BIG = 30 * 1024 * 1024


def big_row(i: int) -> dict:
    return {"prompt": f"Summarise note {i}: " + "the quick brown fox jumps over the lazy dog " * 60,
            "completion": f"Note {i} is about a fox. " * 20}


def peak_while(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_30mb_json_array_validates_in_flat_memory(tmp_path):
    path = tmp_path / "big.json"
    with open(path, "w") as fh:
        fh.write("[\n")
        i = written = 0
        while written < BIG:
            written += fh.write(("" if i == 0 else ",\n") + json.dumps(big_row(i)))
            i += 1
        fh.write("\n]\n")
    size = path.stat().st_size
    result = {}
    peak = peak_while(lambda: result.setdefault("report", validate_dataset(path)[0]))
    report = result["report"]
    assert report.valid == i and report.issue_count == 0 and not report.failed
    assert peak < size / 3, f"peak {peak / 2**20:.1f} MB for a {size / 2**20:.1f} MB file"


def test_a_30mb_csv_validates_in_flat_memory(tmp_path):
    path = tmp_path / "big.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["prompt", "completion"])
        w.writeheader()
        i = 0
        while fh.tell() < BIG:
            w.writerow(big_row(i))
            i += 1
    size = path.stat().st_size
    result = {}
    peak = peak_while(lambda: result.setdefault("report", validate_dataset(path)[0]))
    report = result["report"]
    assert report.valid == i and report.issue_count == 0 and not report.failed
    assert peak < size / 3, f"peak {peak / 2**20:.1f} MB for a {size / 2**20:.1f} MB file"
