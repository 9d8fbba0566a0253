"""Hostile chat templates and hostile lines: each ends in one clear line or one bad line, never a hang, an
OOM kill, a traceback or a whole file lost.

Through the real `lora-tui` command line (in-process), with the tiny Mistral model (its template replaced
where a test needs a hostile one) or the embedded SmolLM2 tokenizer."""

import json
import shutil
import signal

import pytest

from engine.cli.exit_codes import EXIT_DATA, EXIT_OK
from helpers import cli, one_error_line, tiny_yaml, write_jsonl
from engine.data import validate_dataset
from engine.data import encode
from engine.data import template as bounded

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture(autouse=True)
def no_hang():
    def timeout(signum, frame):
        raise TimeoutError("this case hung for 60 s")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def model_with_template(mistral_dir, tmp_path, template: str):
    """A copy of the tiny Mistral model whose tokenizer_config.json carries `template`."""
    model = tmp_path / "hostile-model"
    shutil.copytree(mistral_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    return model


def config_for(tmp_path, model, data, **training):
    """A 2-step run of `model` on `data`: one adapter on one block, 64 tokens, one conversation a step."""
    return tiny_yaml(tmp_path, "c.yaml", model={"name": str(model), "max_seq_length": 64},
                     lora={"rank": 2, "num_layers": 1, "target_modules": ["q_proj"]},
                     training={"iterations": 2, "batch_size": 1, "warmup_steps": 0} | training,
                     data={"path": str(data)}, checkpoints={"every_steps": 0}, evaluation={"every_steps": 0},
                     output={"run_name": "r"})


LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HOSTILE_TEMPLATES = {
    # Never ends: 10^10 empty iterations (no output, no attribute access: only the deadline sees it).
    "empty-nested-loop": (LOOP, "did not finish rendering one conversation"),
    "busy-nested-loop": ("{% set ns = namespace(n=0) %}{% for i in range(100000) %}{% for j in range(100000) %}"
                         "{% set ns.n = ns.n + messages|length %}{% endfor %}{% endfor %}",
                         "did not finish rendering one conversation"),
    # Huge output, streamed in small pieces or made in one step.
    "streamed-output": ("{% for i in range(100000) %}{% for m in messages %}{{ 'x' * 1000 }}{% endfor %}"
                        "{% endfor %}", "more than 32 M characters"),
    "one-huge-string": ("{{ 'x' * 10000000000 }}", "more than 32 M characters"),
    "huge-filter-width": ("{{ messages[0]['content']|center(10000000000) }}", "asks for a size of 1e+10"),
    "huge-power": ("{{ 7 ** 1000000000 }}", "power with over a million bits"),
    # A value doubled 40 times: through a namespace (the one way a value outlives a loop iteration), with
    # ~ or +, or as a macro's argument.
    "doubled-in-namespace": ("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}"
                             "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}", "more than 32 M characters"),
    "doubled-with-plus": ("{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}"
                          "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}", "more than 32 M characters"),
    "doubled-macro-argument": ("{% macro f(s, n) %}{% if n > 0 %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}"
                               "{{ f('xxxxxxxx', 40) }}", "more than 32 M characters"),
}


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES, ids=list(HOSTILE_TEMPLATES))
def test_hostile_template_ends_in_one_line(name, mistral_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bounded, "RENDER_SECONDS", 1.0)  # the real bound is 10 s
    template, needle = HOSTILE_TEMPLATES[name]
    model = model_with_template(mistral_dir, tmp_path, template)
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    code, out, err = cli(capsys, "--config", config_for(tmp_path, model, data), "validate")
    assert code == EXIT_DATA, (code, out, err)
    line = one_error_line(err)
    assert needle in line and str(model) in line and "line 1" in line and "d.jsonl" in line, line
    assert "fix chat_template in its tokenizer_config.json" in line


def test_train_with_a_runaway_template_exits_3(mistral_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bounded, "RENDER_SECONDS", 1.0)
    model = model_with_template(mistral_dir, tmp_path, LOOP)
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    code, out, err = cli(capsys, "--config", config_for(tmp_path, model, data), "train")
    assert code == EXIT_DATA, (code, out, err)
    assert "did not finish rendering one conversation in 1 s" in one_error_line(err)


def test_after_a_timed_out_render_the_next_ones_work(mistral_dir, mistral_tokenizer, tmp_path, monkeypatch):
    # The interrupt belongs to the render that overran: none is left pending for the thread's next work.
    from engine.config.schema import ModelConfig
    from engine.model.loading import load_tokenizer
    monkeypatch.setattr(bounded, "RENDER_SECONDS", 0.5)
    hostile = encode.ChatEncoder(load_tokenizer(ModelConfig(name=str(model_with_template(mistral_dir, tmp_path,
                                                                                         LOOP)))))
    conv = encode.Conversation(GOOD["messages"])
    for _ in range(2):
        with pytest.raises(bounded.TemplateLimitError, match="did not finish rendering"):
            hostile.encode(conv)
        results = encode.ChatEncoder(mistral_tokenizer).encode_many([conv] * 2000)
        assert all(r.n_trained > 0 for r in results)


BAD_LINES = {
    "5000-digit-integer": '{"text": ' + "9" * 5000 + "}",
    "5000-digit-label": '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                        '"content": "ok"}], "label": ' + "1" * 5000 + "}",
    "lone-high-surrogate": '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                           '"content": "caf\\ud800"}]}',
    "lone-low-surrogate-text": '{"text": "\\udfff"}',
}


@pytest.mark.parametrize("name", BAD_LINES, ids=list(BAD_LINES))
def test_unreadable_line_is_one_bad_line(name, tokenizer, tmp_path, capsys):
    # 40 good lines and one bad one (2.4% < the 5% threshold): the file passes, the line is named.
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 20 + [BAD_LINES[name]] + [GOOD] * 20)
    code, out, err = cli(capsys, "validate", "--dataset", data)
    assert code == EXIT_OK, (code, out, err)
    bad = [line for line in out.splitlines() if ":line " in line]
    assert len(bad) == 1 and "d.jsonl:line 21:" in bad[0], out
    assert "40 of 41 conversations valid" in out


def test_training_skips_unreadable_lines(mistral_dir, tmp_path, capsys):
    # 4 bad lines of 84 (4.8% < 5%): they are left out and training runs.
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 40 + list(BAD_LINES.values()) + [GOOD] * 40)
    code, out, err = cli(capsys, "--config", config_for(tmp_path, mistral_dir, data, iterations=1), "train")
    assert code == EXIT_OK, (code, out, err)
    assert "finished at step 1" in out + err


def test_accepted_though_wrong_lines_are_bad_lines(tokenizer, tmp_path):
    msgs = GOOD["messages"]
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [msgs[0], {"role": "assistant", "content": "\u200b"}]},
        {"messages": [msgs[0], {"role": "assistant", "content": "ok", "tool_calls": "str"}]},
        {"messages": msgs, "tools": [1, None]},
        GOOD])
    report, _ = validate_dataset(data, tokenizer)
    assert [(i.line, i.field) for i in report.issues] == [
        (1, "messages[1].content"), (2, "messages[1].tool_calls"), (3, "tools[0]"), (3, "tools[1]")]
    assert "U+200B" in report.issues[0].reason
    assert report.valid == 1


def test_openai_and_hf_tool_call_shapes_are_accepted(tokenizer, tmp_path):
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}},
        {"name": "get_date", "arguments": {}}]}
    data = write_jsonl(tmp_path / "d.jsonl", [{
        "messages": [{"role": "user", "content": "weather?"}, call, {"role": "tool", "content": "21"},
                     {"role": "assistant", "content": "21 degrees"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}])
    report, _ = validate_dataset(data, tokenizer)
    assert report.issue_count == 0 and report.valid == 1


def test_file_changed_while_validated_is_noted(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 600)
    appended = []

    def progress(done, total):  # another program appends while the validator reads
        if not appended:
            with open(data, "a") as fh:
                fh.write(json.dumps(GOOD) + "\n")
            appended.append(True)

    report, _ = validate_dataset(data, progress=progress)
    assert any("changed while it was being validated" in w for w in report.warnings), report.warnings
    quiet, _ = validate_dataset(data)
    assert not any("changed" in w for w in quiet.warnings)


def test_validate_prints_the_report_warnings(mistral_dir, tmp_path, capsys):
    # Mistral's template has no tool role: tool results become user turns, which the report says.
    msgs = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "calling"},
            {"role": "tool", "content": "21"}, {"role": "assistant", "content": "21 degrees"}]
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    code, out, err = cli(capsys, "--config", config_for(tmp_path, mistral_dir, data), "validate")
    assert code == EXIT_OK, (code, out, err)
    assert f"{data}: warning: 1 conversations: tool turns rendered as user turns" in out, out


def test_large_numbers_in_the_data_are_not_refused_by_the_bounds():
    # Only sizes a template asks for are bounded, not the values it formats (a tool argument of 10^12).
    template = bounded.compile_template(
        "{% macro show(v) %}{{ v|tojson }}{% endmacro %}{% for m in messages %}{{ show(m.amount) }} "
        "{{ m.amount|int }} {{ m.amount|string|center(16) }}{% endfor %}")
    assert bounded.render_bounded(template, "m", messages=[{"amount": 10**12}]) == \
        "1000000000000 1000000000000  1000000000000  "


def test_the_time_bound_holds_in_a_forked_child(monkeypatch):
    # A forked child has no watchdog thread (and maybe a lock held at the fork): it gets its own.
    import os
    monkeypatch.setattr(bounded, "RENDER_SECONDS", 0.5)
    bounded.render_bounded(bounded.compile_template("warm"), "m")  # the parent's watchdog is running
    pid = os.fork()
    if pid == 0:
        try:
            bounded.render_bounded(bounded.compile_template(LOOP), "m")
        except bounded.TemplateLimitError:
            os._exit(7)
        os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7


def test_a_conversation_of_thousands_of_turns_is_one_bad_line(tokenizer, tmp_path, capsys, monkeypatch):
    # Locating turn k renders a prefix of k turns: a line of thousands costs their square, so the whole
    # conversation has one deadline (each render alone stays far below its own).
    monkeypatch.setattr(bounded, "RENDER_SECONDS", 0.2)
    turns = [{"role": r, "content": f"{r} {i}"} for i in range(1500) for r in ("user", "assistant")]
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 30 + [{"messages": turns}])
    code, out, err = cli(capsys, "--config", config_for(tmp_path, "embedded", data), "validate")
    assert code == 0, (code, out, err)
    assert "line 31" in out and "split it into shorter conversations" in out, out
