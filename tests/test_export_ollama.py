"""The Ollama export: family detection, the Modelfile, and the proof that its TEMPLATE renders the prompt the
model's own Jinja chat template renders. That proof runs the TEMPLATE through Go's text/template (what Ollama
runs, with Ollama's data: .System, .Messages with .Role/.Content, missingkey=zero) and skips where `go` is
missing (Debian: apt-get install golang-go)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from engine.config.schema import Config, ModelConfig
from engine.export.errors import ExportError
from engine.export.fuse import FuseTargetError
from engine.export.ollama import FAMILIES, export_ollama, modelfile, template_family

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Llama 3 (8B Instruct)'s chat template: BOS, then a header per message, content trimmed.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
    "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATIONS = {
    "system+user": [{"role": "system", "content": "You are a pirate."},
                    {"role": "user", "content": "Hello there"}],
    "user+assistant+user": [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello! How can I help?"},
                            {"role": "user", "content": "Tell me a joke."}],
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "system+user+assistant+user": [{"role": "system", "content": "Be terse.\nNo emojis."},
                                   {"role": "user", "content": 'Quote "{{ .Content }}" please'},
                                   {"role": "assistant", "content": "{{ .Content }}\n(as asked)"},
                                   {"role": "user", "content": "Thanks\n\nAgain?"}],
}
GO_RENDER = r"""package main

// Ollama's Template.Execute for a template that uses .Messages: system messages stay in .Messages and their
// contents, joined, are .System; consecutive messages of one role are merged (template/template.go).
import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role, Content, Thinking, ToolName, ToolCallID string
	Images                                      []string
	ToolCalls                                   []any
}

type Case struct {
	Template string
	Messages []Message
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	out := []string{}
	for _, c := range cases {
		t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		var system []string
		var msgs []*Message
		for i := range c.Messages {
			m := &c.Messages[i]
			if m.Role == "system" {
				system = append(system, m.Content)
			}
			if n := len(msgs); n > 0 && msgs[n-1].Role == m.Role && m.Role != "tool" {
				msgs[n-1].Content += "\n\n" + m.Content
			} else {
				msgs = append(msgs, m)
			}
		}
		var b strings.Builder
		err = t.Execute(&b, map[string]any{"System": strings.Join(system, "\n\n"), "Messages": msgs,
			"Tools": nil, "Response": "", "Think": false, "ThinkLevel": "", "IsThinkSet": false})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE, SYSTEM and the stop parameters, read as Ollama's parser reads them: a value is one
    word, "quoted" or \"\"\"quoted over lines\"\"\" (taken verbatim); # starts a comment line."""
    found = {"stop": []}
    rest = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for m in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER stop) ("""(.*?)"""|"([^"\n]*)"|(\S+))$', rest,
                         re.M | re.S):
        value = next(v for v in m.groups()[2:] if v is not None)
        if m[1] == "PARAMETER stop":
            found["stop"].append(value)
        else:
            found[m[1]] = value
    return found


def sent_by_ollama(parsed: dict, chat: list[dict]) -> list[dict]:
    """The messages Ollama renders for a chat: the Modelfile's SYSTEM first when the chat has no system
    message (server/routes.go)."""
    if parsed.get("SYSTEM") and chat[0]["role"] != "system":
        return [{"role": "system", "content": parsed["SYSTEM"]}] + chat
    return chat


def jinja(tokenizer, chat: list[dict]) -> str:
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def wrapped(tokenizer_dir: Path, chat_template: str):
    """mlx-lm's tokenizer wrapper around the tiny Mistral's tokenizer, with another chat template."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf.chat_template = chat_template
    return TokenizerWrapper(hf)


@pytest.fixture(scope="session")
def llama3_tokenizer(mistral_dir):
    return wrapped(mistral_dir, LLAMA3_TEMPLATE)


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """render([(template, messages), ...]) -> [prompt, ...] through Go's text/template, as Ollama runs it."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("`go` is not installed (apt-get install golang-go): the Go template check needs it")
    folder = tmp_path_factory.mktemp("go-render")
    (folder / "main.go").write_text(GO_RENDER)
    built = subprocess.run([go, "build", "-o", str(folder / "render"), "main.go"], cwd=folder, text=True,
                           capture_output=True, env={"GOCACHE": str(folder / "cache"), "HOME": str(folder),
                                                     "PATH": str(Path(go).parent), "CGO_ENABLED": "0",
                                                     "GOTOOLCHAIN": "local"})
    assert built.returncode == 0, built.stderr

    def render(cases: list[tuple[str, list[dict]]]) -> list[str]:
        data = json.dumps([{"Template": t, "Messages": m} for t, m in cases])
        done = subprocess.run([str(folder / "render")], input=data, text=True, capture_output=True)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    return render


# ------------------------------------------------------------------------------------------- families
def test_template_family_of_known_templates(tokenizer, mistral_tokenizer):
    assert template_family(tokenizer.chat_template) == "chatml"
    assert template_family(mistral_tokenizer.chat_template) == "mistral"
    assert template_family(LLAMA3_TEMPLATE) == "llama3"


@pytest.mark.parametrize("chat_template", [
    "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
    "<start_of_turn>user\n{{ messages[0]['content'] }}<end_of_turn>\n<start_of_turn>model\n",  # Gemma's turns
    "{{ bos_token }}[INST] <<SYS>>\n{{ messages[0]['content'] }}\n<</SYS>>\n\n[/INST]",  # Llama 2's
    "",
])
def test_unknown_template_is_a_one_line_error(chat_template):
    with pytest.raises(ExportError) as err:
        template_family(chat_template)
    message = str(err.value)
    assert "\n" not in message
    assert "ChatML" in message and "Mistral" in message and "tokenizer.chat_template" in message
    assert "TEMPLATE" in message


@pytest.mark.parametrize("chat_template, where", [
    # Llama 3.1: a dated system header in every prompt, whatever the user's system message
    (LLAMA3_TEMPLATE.replace("{% set loop_messages = messages %}",
                             "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nToday Date: 26 Jul "
                             "2024<|eot_id|>{% set loop_messages = messages %}").replace("bos_token + content",
                                                                                          "content"), "Today"),
    # a ChatML template opening the reply with an empty <think> block
    ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{% endif %}", "<think>"),
])
def test_a_variant_we_would_render_differently_is_refused(mistral_dir, chat_template, where):
    with pytest.raises(ExportError) as err:
        modelfile(wrapped(mistral_dir, chat_template), "model.gguf")
    assert "\n" not in str(err.value) and "renders a" in str(err.value) and where in str(err.value)


# ------------------------------------------------------------------------------------------- Modelfiles
def test_chatml_modelfile(tokenizer):
    parsed = parse_modelfile(modelfile(tokenizer, "model.gguf"))
    assert parsed["FROM"] == "./model.gguf"
    assert parsed["TEMPLATE"] == FAMILIES["chatml"][0]
    assert ".Messages" in parsed["TEMPLATE"] and ".Role" in parsed["TEMPLATE"] and ".Content" in parsed["TEMPLATE"]
    assert parsed["stop"] == ["<|im_start|>", "<|im_end|>"]
    assert parsed["SYSTEM"] == SMOL_SYSTEM  # SmolLM2's template writes it when a chat has no system message


def test_mistral_modelfile(mistral_tokenizer):
    text = modelfile(mistral_tokenizer, "model.gguf")
    parsed = parse_modelfile(text)
    assert parsed["FROM"] == "./model.gguf"
    assert parsed["TEMPLATE"] == FAMILIES["mistral"][0] and "$.System" in parsed["TEMPLATE"]
    assert parsed["stop"] == ["[INST]", "[/INST]", "</s>"]
    assert "SYSTEM" not in parsed and "\nSYSTEM" not in text  # its template writes no default system prompt
    # a GGUF whose runtime does not add <s>: the TEMPLATE writes it, as the chat template does
    assert parse_modelfile(modelfile(mistral_tokenizer, "x.gguf", adds_bos=False))["TEMPLATE"] == \
        "<s>" + FAMILIES["mistral"][0]


def test_llama3_modelfile(llama3_tokenizer):
    parsed = parse_modelfile(modelfile(llama3_tokenizer, "model.gguf"))
    assert parsed["TEMPLATE"] == FAMILIES["llama3"][0]
    assert parsed["stop"] == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert "SYSTEM" not in parsed


# --------------------------------------------------------------------- the proof: Go renders what Jinja does
@pytest.mark.parametrize("which, bos, adds_bos", [
    ("tokenizer", "", True),  # SmolLM2: ChatML, no BOS in its template
    ("mistral_tokenizer", "<s>", True),  # the runtime adds <s> (Mistral-7B-Instruct-v0.3's GGUF says so)
    ("mistral_tokenizer", "<s>", False),  # the tiny Mistral's GGUF does not: the TEMPLATE writes it
    ("llama3_tokenizer", "<s>", True),
])
def test_go_template_renders_what_the_chat_template_renders(request, go_render, which, bos, adds_bos):
    tok = request.getfixturevalue(which)
    parsed = parse_modelfile(modelfile(tok, "model.gguf", adds_bos=adds_bos))
    got = go_render([(parsed["TEMPLATE"], sent_by_ollama(parsed, chat)) for chat in CONVERSATIONS.values()])
    for name, chat, prompt in zip(CONVERSATIONS, CONVERSATIONS.values(), got):
        want = jinja(tok, chat)
        assert want.startswith(bos), name
        assert (bos if adds_bos else "") + prompt == want, name  # the BOS the runtime adds, then the TEMPLATE's
    if which == "tokenizer":  # no system message: SmolLM2's default, through the Modelfile's SYSTEM
        assert SMOL_SYSTEM in got[list(CONVERSATIONS).index("user")]


# ------------------------------------------------------------------------------------------- the folder
def fake_gguf(calls: list, add_bos: bool | None = False, fail: Exception | None = None):
    """An engine.export.gguf whose export_gguf writes a GGUF file holding only metadata."""
    def export_gguf(cfg, adapter, out, quant="f16", progress=None):
        import gguf
        calls.append((adapter, Path(out), quant))
        if fail:
            raise fail
        writer = gguf.GGUFWriter(str(out), "llama")
        if add_bos is not None:
            writer.add_add_bos_token(add_bos)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        if progress:
            progress("done", 1.0)
        return {"path": str(out), "bytes": Path(out).stat().st_size, "files": [Path(out).name], "format": "gguf"}
    return types.SimpleNamespace(export_gguf=export_gguf)


def test_export_writes_the_folder(tokenizer, tmp_path, monkeypatch):
    calls, seen = [], []
    monkeypatch.setitem(sys.modules, "engine.export.gguf", fake_gguf(calls))
    out = tmp_path / "smol-ollama"
    result = export_ollama(Config(), "adapters/x", out, progress=lambda what, f: seen.append(f))
    assert calls == [("adapters/x", calls[0][1], "q8_0")] and calls[0][1].name == "model.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol-ollama"]  # no temp folder left beside it
    assert result["files"] == ["Modelfile", "README.txt", "model.gguf"]
    assert result["format"] == "ollama" and result["template"] == "chatml" and result["path"] == str(out)
    assert result["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert (out / "Modelfile").read_text() == modelfile(tokenizer, "model.gguf")
    readme = (out / "README.txt").read_text()
    assert "ollama create NAME -f Modelfile" in readme and "LM Studio" in readme and "model.gguf" in readme
    assert seen[-1] == 1.0 and seen == sorted(seen)


def test_export_refuses_a_non_empty_folder(tokenizer, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "engine.export.gguf", fake_gguf(calls))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FuseTargetError, match="not empty"):
        export_ollama(Config(), None, tmp_path / "out")
    assert calls == [] and [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_unknown_template_fails_before_the_gguf(mistral_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "engine.export.gguf", fake_gguf(calls))
    model = tmp_path / "model"
    shutil.copytree(mistral_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="none we write"):
        export_ollama(Config(model=ModelConfig(name=str(model))), None, tmp_path / "out")
    assert calls == [] and not (tmp_path / "out").exists()


def test_a_failed_gguf_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "engine.export.gguf", fake_gguf([], fail=ExportError("disk full")))
    with pytest.raises(ExportError, match="disk full"):
        export_ollama(Config(), None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_with_the_real_gguf_writer(mistral_dir, mistral_tokenizer, tmp_path):
    """The tiny Mistral through engine.export.gguf: its GGUF says add_bos_token false (its tokenizer_config),
    so the TEMPLATE writes <s> itself."""
    pytest.importorskip("engine.export.gguf")
    result = export_ollama(Config(model=ModelConfig(name=str(mistral_dir))), None, tmp_path / "out", quant="f16")
    assert result["template"] == "mistral" and result["files"] == ["Modelfile", "README.txt", "model.gguf"]
    parsed = parse_modelfile((tmp_path / "out" / "Modelfile").read_text())
    assert parsed["TEMPLATE"] == "<s>" + FAMILIES["mistral"][0] and parsed["FROM"] == "./model.gguf"
    assert (tmp_path / "out" / "model.gguf").read_bytes()[:4] == b"GGUF"
