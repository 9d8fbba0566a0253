"""Bad input, generated: datasets and configs broken at every level, unusable paths, unsafe YAML.

Every case goes through the real `lora-tui` command line (in-process, for speed) and must end in the
documented exit code (2 config, 3 data), one `lora-tui: error:` line naming the file (and line or field)
and the problem, no traceback, and no hang (each case has a 20 s alarm)."""

import json
import math
import os
import signal
from pathlib import Path

import pytest

from engine.cli import EXIT_CONFIG, EXIT_DATA, run
from engine.config import SPECS

GOOD_MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
WRONG_VALUES = {"null": None, "int": 5, "float": 2.5, "true": True, "string": "x", "list": [1], "object": {"a": 1}}


def _dataset_cases():
    """(id, raw bytes of the file, the text the report must show)."""
    cases = []

    def line(case_id, record, needle):
        cases.append((case_id, (json.dumps(record) + "\n").encode(), needle))

    # The top level of a line.
    for name, value in WRONG_VALUES.items():
        if name != "object":
            line(f"top-{name}", value, "a line must be a JSON object")
    line("top-empty-object", {}, "missing conversation")
    line("top-unknown-keys", {"question": "a", "answer": "b"}, "missing conversation")
    # messages / conversations containers and their items, in both spellings.
    for key in ("messages", "conversations"):
        for name, value in WRONG_VALUES.items():
            if name not in ("list", "null"):
                line(f"{key}-is-{name}", {key: value}, f"{key}: must be a list of messages")
        line(f"{key}-empty", {key: []}, f"{key}: is empty")
        for name, value in WRONG_VALUES.items():
            if name != "object":
                line(f"{key}-item-{name}", {key: [value] + GOOD_MESSAGES}, f"{key}[0]: must be an object")
        line(f"{key}-item-no-keys", {key: [{"x": 1}] + GOOD_MESSAGES}, f"{key}[0]: missing role and content")
        for role_key, content_key in (("role", "content"), ("from", "value")):
            for name, value in WRONG_VALUES.items():
                needle = "missing role" if value is None else "unknown role"
                line(f"{key}-{role_key}-{name}", {key: [{role_key: value, content_key: "hi"}] + GOOD_MESSAGES[1:]},
                     f"{key}[0].{role_key}: {needle}")
            for name, value in WRONG_VALUES.items():
                if name == "string":
                    continue
                needle = "missing content" if value is None else "content must be a string"
                line(f"{key}-{content_key}-{name}", {key: [{role_key: "user", content_key: value}] + GOOD_MESSAGES[1:]},
                     f"{key}[0].{content_key}: {needle}")
            line(f"{key}-{content_key}-blank", {key: [{role_key: "user", content_key: "  "}] + GOOD_MESSAGES[1:]},
                 f"{key}[0].{content_key}: empty content")
        line(f"{key}-no-assistant", {key: GOOD_MESSAGES[:1]}, f"line 1")
        line(f"{key}-tools-wrong", {key: GOOD_MESSAGES, "tools": "get_weather"}, "tools: must be a list")
    # prompt / completion and text.
    for key in ("prompt", "completion"):
        other = "completion" if key == "prompt" else "prompt"
        for name, value in WRONG_VALUES.items():
            if name == "string":
                continue
            needle = f"missing {key}" if value is None else f"{key}: must be a string"
            line(f"{key}-{name}", {key: value, other: "ok"}, needle)
    line("completion-blank", {"prompt": "a", "completion": " "}, "empty completion")
    for name, value in WRONG_VALUES.items():
        if name not in ("string", "null"):
            line(f"text-{name}", {"text": value}, "text: must be a string")
    line("text-blank", {"text": "   "}, "empty text")
    # Labels.
    for name, value in (("int", 3), ("list", ["desirable"]), ("object", {"a": 1}), ("word", "good"),
                        ("huge", "x" * 100_000)):
        line(f"label-{name}", {"messages": GOOD_MESSAGES, "label": value}, "label: bad label")
    # Not JSON at all, or broken JSON.
    for case_id, raw in (("truncated", b'{"messages": [{"role": "user"'), ("trailing-comma", b'{"text": "a",}'),
                         ("single-quotes", b"{'text': 'a'}"), ("bare-word", b"hello"),
                         ("two-objects", b'{"text": "a"} {"text": "b"}'), ("nan-literal", b'{"text": NaN}'),
                         ("control-char", b'{"text": "a\x01b"}'), ("lone-brace", b"{"),
                         ("deep-nesting", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")):
        cases.append((f"json-{case_id}", raw + b"\n", "line 1"))
    cases.append(("invalid-utf8", b'{"text": "caf\xe9"}\n', "invalid UTF-8"))
    cases.append(("nul-bytes", b'{"text": "a"}\x00\x00\n', "NUL bytes"))
    cases.append(("binary", bytes(range(256)) * 8, "line 1"))
    cases.append(("line-over-10mb", b'{"text": "' + b"a" * (11 * 1024 * 1024) + b'"}\n', "longer than 10 MB"))
    cases.append(("empty-file", b"", "no conversations"))
    cases.append(("only-blank-lines", b"\n\n  \n", "no conversations"))
    return cases


DATASET_CASES = _dataset_cases()


@pytest.fixture(autouse=True)
def no_hang():
    def timeout(signum, frame):
        raise TimeoutError("this case hung for 20 s")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = run([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lora-tui: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case_id,raw,needle", DATASET_CASES, ids=[c[0] for c in DATASET_CASES])
def test_bad_dataset(case_id, raw, needle, tmp_path, capsys):
    path = tmp_path / f"{case_id}.jsonl"
    path.write_bytes(raw)
    code, out, err = cli(capsys, "validate", "--no-tokenize", "--dataset", path)
    assert code == EXIT_DATA, (code, out, err)
    assert f"{path.name}" in one_error_line(err)
    assert needle in out + err, out + err


def test_bom_and_crlf_are_accepted(tmp_path, capsys):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps({"messages": GOOD_MESSAGES}).encode() + b"\r\n"
                                               for _ in range(3)))
    code, out, err = cli(capsys, "validate", "--no-tokenize", "--dataset", path)
    assert code == 0 and "3 of 3 conversations valid" in out, out + err


def _make_path(kind: str, p: Path) -> Path:
    if kind == "directory":
        p.mkdir()
    elif kind == "symlink-loop":
        os.symlink(p.with_name("b"), p)
        os.symlink(p, p.with_name("b"))
    elif kind == "broken-symlink":
        os.symlink(p.with_name("nowhere"), p)
    elif kind == "fifo":  # opening it for reading would block forever
        os.mkfifo(p)
    return p


PATH_CASES = [("missing", "no such file"), ("directory", "is a directory"), ("symlink-loop", "leads nowhere"),
              ("broken-symlink", "leads nowhere"), ("fifo", "not a regular file")]


@pytest.mark.parametrize("kind,needle", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_unusable_dataset_path(kind, needle, tmp_path, capsys):
    path = _make_path(kind, tmp_path / "a.jsonl")
    code, out, err = cli(capsys, "validate", "--no-tokenize", "--dataset", path)
    assert code == EXIT_DATA and needle in one_error_line(err), err


@pytest.mark.parametrize("kind,needle", [("missing", "does not exist"), ("directory", "is a directory"),
                                         ("symlink-loop", "cannot read"), ("fifo", "not a regular file")],
                         ids=["missing", "directory", "symlink-loop", "fifo"])
def test_unusable_config_path(kind, needle, tmp_path, capsys):
    path = _make_path(kind, tmp_path / "c.yaml")
    code, out, err = cli(capsys, "--config", path, "config")
    assert code == EXIT_CONFIG and needle in one_error_line(err), err


def _invalid_values(spec):
    """Values this field must refuse: wrong types, and for numbers NaN, infinities and out-of-range ones."""
    t = spec.type
    if t is bool:
        return {"word": "maybe", "int": 7, "list": [True]}
    if t is str:
        bad = {"list": ["a"], "object": {"a": 1}}
        if spec.choices:
            bad["unknown-choice"] = "nonsense"
        return bad
    if t in (int, float):
        bad = {"word": "many", "list": [1], "nan": float("nan"), "bool": True}
        if t is float:
            bad["inf"] = float("inf")
        if spec.min is not None:
            bad["below"] = spec.min - 1 if t is int else spec.min - abs(spec.min) - 1.0
        if spec.max is not None:
            bad["1e308"] = 1e308
        if spec.min is not None and spec.min >= 0:
            bad["negative"] = -5
        return bad
    return {"int": 5, "object": {"a": 1}, "list-of-ints": [1, 2]}  # list[str]


CONFIG_CASES = [(f"{path}={name}", spec.section, spec.name, value)
                for path, spec in SPECS.items() for name, value in _invalid_values(spec).items()]


def _yaml_value(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf"
    return json.dumps(value)


@pytest.mark.parametrize("case_id,section,key,value", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_value(case_id, section, key, value, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(f"{section}:\n  {key}: {_yaml_value(value)}\n")
    code, out, err = cli(capsys, "--config", path, "config")
    assert code == EXIT_CONFIG, (case_id, out, err)
    line = one_error_line(err)
    assert f"{section}.{key}:" in line and len(line) < 300, line


BAD_YAML = [
    ("python-object", "model: !!python/object/apply:os.system ['touch {marker}']\n", "invalid YAML"),
    ("python-name", "training: !!python/name:os.system\n", "invalid YAML"),
    ("alias-bomb", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                   "lora: {target_modules: *d}\n", "alias"),
    ("tab-indent", "lora:\n\trank: 8\n", "invalid YAML"),
    ("unclosed", "lora: {rank: 8\n", "invalid YAML"),
    ("top-list", "- a\n- b\n", "top level must be a mapping"),
    ("top-string", "hello\n", "top level must be a mapping"),
    ("section-list", "lora: [1, 2]\n", "lora: must be a mapping"),
    ("unknown-section", "lorra: {rank: 8}\n", "did you mean 'lora'"),
    ("unknown-key", "lora: {rnak: 8}\n", "did you mean 'lora.rank'"),
    ("binary", None, "not UTF-8"),
    ("huge", "# " + "x" * (2 << 20) + "\n", "larger than 1 MiB"),
]


@pytest.mark.parametrize("case_id,text,needle", BAD_YAML, ids=[c[0] for c in BAD_YAML])
def test_bad_or_unsafe_yaml(case_id, text, needle, tmp_path, capsys):
    path, marker = tmp_path / "bad.yaml", tmp_path / "pwned"
    if text is None:
        path.write_bytes(bytes(range(256)))
    else:
        path.write_text(text.replace("{marker}", str(marker)))
    code, out, err = cli(capsys, "--config", path, "config")
    assert code == EXIT_CONFIG and needle in one_error_line(err), err
    assert not marker.exists()  # no code ran


def test_at_least_200_cases():
    n = len(DATASET_CASES) + len(PATH_CASES) + 4 + len(CONFIG_CASES) + len(BAD_YAML) + 1 + len(ESCAPES)
    assert n >= 200, n


ESCAPES = ["../escape", "../../etc", "/tmp/abs", "a/b", "..", "x\\y"]


@pytest.mark.parametrize("name", ESCAPES)
def test_run_name_cannot_leave_the_output_folder(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "inside" / "runs"
    path = tmp_path / "c.yaml"
    path.write_text(f"output: {{dir: {out_dir}, run_name: {json.dumps(name)}}}\n")
    code, out, err = cli(capsys, "--config", path, "config")
    assert code == EXIT_CONFIG and "output.run_name:" in one_error_line(err), err
    # The same name given on the command line of `train` is refused before anything is written.
    path.write_text(f"output: {{dir: {out_dir}}}\n")
    code, out, err = cli(capsys, "--config", path, "train", "--run-name", name)
    assert code == EXIT_CONFIG and "output.run_name:" in one_error_line(err), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.yaml"]


# Lines that used to be accepted though wrong, or crashed the whole file.
INVISIBLE = {"zwsp": "\u200b", "zwnj": "\u200c", "zwj": "\u200d", "word-joiner": "\u2060", "bom": "\ufeff",
             "soft-hyphen": "\u00ad", "lrm": "\u200e", "rlm": "\u200f", "function-application": "\u2061",
             "mongolian-vowel-separator": "\u180e", "hangul-filler": "\u3164", "braille-blank": "\u2800",
             "mixed": "\u200b \u200d\n\u2060\t"}
WRONG_TOOL_CALLS = {
    "string": ("str", "tool_calls: must be a list of tool calls"),
    "int": (5, "tool_calls: must be a list of tool calls"),
    "object": ({"name": "f"}, "tool_calls: must be a list of tool calls"),
    "item-int": ([1], "tool_calls[0]: must be an object"),
    "item-null": ([None], "tool_calls[0]: must be an object"),
    "item-string": (["get_weather"], "tool_calls[0]: must be an object"),
    "item-empty": ([{}], "tool_calls[0].name: a tool call needs the function's name"),
    "function-string": ([{"function": "get_weather"}], "tool_calls[0].function: must be an object"),
    "function-no-name": ([{"function": {"arguments": {}}}], "tool_calls[0].function.name:"),
    "function-name-int": ([{"function": {"name": 5}}], "tool_calls[0].function.name:"),
    "function-name-blank": ([{"function": {"name": "\u200b"}}], "tool_calls[0].function.name:"),
    "arguments-int": ([{"function": {"name": "f", "arguments": 5}}], "tool_calls[0].function.arguments:"),
    "arguments-list": ([{"name": "f", "arguments": [1]}], "tool_calls[0].arguments: must be an object"),
    "second-item-bad": ([{"name": "f"}, 7], "tool_calls[1]: must be an object"),
}
WRONG_TOOLS = {"int-and-null": ([1, None], "tools[0]: must be an object"), "string": (["get_weather"], "tools[0]:"),
               "list": ([[]], "tools[0]:"), "bool": ([True], "tools[0]:"), "float": ([1.5], "tools[0]:"),
               "second-bad": ([{"type": "function"}, None], "tools[1]: must be an object")}
LONG = "1" * 5000  # over Python's 4300-digit limit for int(str)
UNREADABLE = {
    "long-int-text": ('{"text": ' + LONG + "}", "unreadable number"),
    "long-int-label": ('{"messages": ' + json.dumps(GOOD_MESSAGES) + ', "label": ' + LONG + "}", "unreadable number"),
    "long-int-content": ('{"messages": [{"role": "user", "content": -' + LONG + "}]}", "unreadable number"),
    "long-int-nested": ('{"tools": [{"a": [' + LONG + "]}]}", "unreadable number"),
    "surrogate-text": ('{"text": "\\ud800"}', "text: contains a lone surrogate"),
    "surrogate-low": ('{"text": "a\\udfffb"}', "text: contains a lone surrogate"),
    "surrogate-content": ('{"messages": [{"role": "user", "content": "x\\ud83d"}, '
                          '{"role": "assistant", "content": "y"}]}', "messages[0].content: contains a lone surrogate"),
    "surrogate-role": ('{"messages": [{"role": "\\udc00", "content": "x"}]}', "messages[0].role: contains a lone"),
    "surrogate-reversed-pair": ('{"completion": "\\ude00\\ud83d", "prompt": "a"}', "completion: contains a lone"),
    "surrogate-key": ('{"text": "a", "\\ud800": 1}', "contains a lone surrogate"),
    "surrogate-label": ('{"text": "a", "label": "\\ud800"}', "label: contains a lone surrogate"),
}


def _hidden_bad_line_cases():
    cases = []
    for name, chars in INVISIBLE.items():
        cases.append((f"invisible-{name}-assistant", {"messages": [GOOD_MESSAGES[0], {"role": "assistant", "content": chars}]},
                      "messages[1].content: empty content"))
        cases.append((f"invisible-{name}-user", {"conversations": [{"from": "human", "value": chars}, GOOD_MESSAGES[1]]},
                      "conversations[0].value: empty content"))
        cases.append((f"invisible-{name}-completion", {"prompt": "a", "completion": chars}, "empty completion"))
        cases.append((f"invisible-{name}-text", {"text": chars}, "text: empty text"))
    for name, (calls, needle) in WRONG_TOOL_CALLS.items():
        msg = {"role": "assistant", "content": "calling", "tool_calls": calls}
        cases.append((f"tool-calls-{name}", {"messages": [GOOD_MESSAGES[0], msg]}, f"messages[1].{needle}"))
    for name, (tools, needle) in WRONG_TOOLS.items():
        cases.append((f"tools-{name}", {"messages": GOOD_MESSAGES, "tools": tools}, needle))
    return [(case_id, (json.dumps(record) + "\n").encode(), needle) for case_id, record, needle in cases] + \
        [(f"unreadable-{name}", (raw + "\n").encode(), needle) for name, (raw, needle) in UNREADABLE.items()]


HIDDEN_BAD_LINES = _hidden_bad_line_cases()


@pytest.mark.parametrize("case_id,raw,needle", HIDDEN_BAD_LINES, ids=[c[0] for c in HIDDEN_BAD_LINES])
def test_hidden_bad_line(case_id, raw, needle, tmp_path, capsys):
    path = tmp_path / f"{case_id}.jsonl"
    path.write_bytes(raw)
    code, out, err = cli(capsys, "validate", "--no-tokenize", "--dataset", path)
    assert code == EXIT_DATA, (code, out, err)
    assert path.name in one_error_line(err)
    assert f"{path.name}:line 1:" in out and needle in out, out + err


@pytest.mark.parametrize("case_id,raw,needle", HIDDEN_BAD_LINES[::7], ids=[c[0] for c in HIDDEN_BAD_LINES[::7]])
def test_hidden_bad_line_among_good_ones(case_id, raw, needle, tmp_path, capsys):
    # Tokenized too: one such line among 40 good ones (2.4% < 5%) is reported and the file passes.
    path = tmp_path / f"{case_id}.jsonl"
    good = (json.dumps({"messages": GOOD_MESSAGES}) + "\n").encode()
    path.write_bytes(good * 20 + raw + good * 20)
    code, out, err = cli(capsys, "validate", "--dataset", path)
    assert code == 0, (code, out, err)
    assert f"{path.name}:line 21:" in out and needle in out and "40 of 41 conversations valid" in out, out + err
