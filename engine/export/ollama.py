"""Ollama export: a folder that `ollama create NAME -f Modelfile` turns into a model, nothing else to do.

It holds model.gguf (engine.export.gguf), a Modelfile whose TEMPLATE renders, in Ollama's Go template syntax,
the prompt the model's own Jinja chat template renders (the one it was trained on), and a README.txt.
What the TEMPLATE relies on (ollama/ollama template/template.go and server/routes.go): `.Messages` holds every
message, system ones included, and `.System` their contents joined; a chat without a system message gets the
Modelfile's SYSTEM as its first message; the runtime adds the BOS token when the GGUF file says add_bos_token
(then the TEMPLATE leaves it out, else it writes it). Before anything is written, the TEMPLATE's prompt
(mirrored in Python by `_mirror`) is checked against the Jinja template's on a few conversations: a variant we
would get wrong (a date in every system prompt, a <think> block...) is refused, not exported with a wrong prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from engine import atomic
from engine.config.schema import Config
from engine.export.errors import ExportError
from engine.export.fuse import check_out

GGUF_NAME = "model.gguf"
# family -> (TEMPLATE, stop strings). Mistral's is v0.3's [INST] format: the system prompt goes into the last
# user turn; tool calls are not written for any family (Jinja templates disagree on them, even within one).
FAMILIES = {
    "chatml": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n", ["<|im_start|>", "<|im_end|>"]),
    "mistral": ('{{- range $i, $_ := .Messages }}\n{{- if eq .Role "user" }}[INST] '
                "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}"
                '{{ .Content }}[/INST]\n{{- else if eq .Role "assistant" }} {{ .Content }}</s>\n'
                "{{- end }}\n{{- end }}",
                ["[INST]", "[/INST]", "</s>"]),
    "llama3": ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
}
ELSEWHERE = ("export --to gguf instead: Ollama can read the chat template stored in the GGUF file "
             "(tokenizer.chat_template), or a TEMPLATE can be added to a Modelfile by hand")
SENTINEL = "\ue000system\ue001"  # private-use code points: no real system prompt holds them
# Conversations the TEMPLATE must render as the Jinja template does (every one ends on a user turn).
PROBES = {
    "system+user+assistant+user": [{"role": "system", "content": "Answer briefly."},
                                   {"role": "user", "content": "Hi!"},
                                   {"role": "assistant", "content": "Hello."},
                                   {"role": "user", "content": "What is 2+2?"}],
    "user+assistant+user": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                            {"role": "user", "content": "What is 2+2?"}],
    "system+user": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"}],
    "user": [{"role": "user", "content": "Hi!"}],
}


def template_family(chat_template: str) -> str:
    """"chatml", "mistral" or "llama3", by the turn markers the Jinja chat template writes."""
    t = chat_template or ""
    if "<|im_start|>" in t and "<|im_end|>" in t:
        return "chatml"
    if "<|start_header_id|>" in t and "<|eot_id|>" in t:
        return "llama3"
    if "[INST]" in t and "[/INST]" in t and "<<SYS>>" not in t:  # Llama 2's [INST] <<SYS>> is another format
        return "mistral"
    raise ExportError(f"the chat template is none we write an Ollama TEMPLATE for (ChatML, Mistral [INST], "
                      f"Llama 3); {ELSEWHERE}")


def _mirror(family: str, messages: list[dict]) -> str:
    """What FAMILIES[family]'s TEMPLATE renders for `messages` in Ollama (the tests check this with Go)."""
    if family == "chatml":
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
            "<|im_start|>assistant\n"
    if family == "llama3":
        return "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                       for m in messages) + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = ""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            last = system and i == len(messages) - 1
            out += "[INST] " + (system + "\n\n" if last else "") + m["content"] + "[/INST]"
        elif m["role"] == "assistant":
            out += f" {m['content']}</s>"
    return out


def _renderer(tokenizer) -> tuple[str, str, Callable[[list[dict]], str]]:
    """The chat template the model was trained with, its BOS token, and a function rendering a prompt with it
    (as training did: ChatEncoder, the same bounded Jinja render)."""
    from engine.data.encode import FALLBACK_TEMPLATE, ChatEncoder, EncodeError, hf_tokenizer
    hf = hf_tokenizer(tokenizer)
    source = getattr(hf, "chat_template", None) or FALLBACK_TEMPLATE
    encoder = ChatEncoder(tokenizer)

    def render(messages: list[dict]) -> str:
        try:
            return encoder.prompt_text(messages)
        except EncodeError as exc:
            raise ExportError(f"{exc}; {ELSEWHERE}") from None
    return source, getattr(hf, "bos_token", None) or "", render


def default_system(render: Callable[[list[dict]], str]) -> str:
    """The system prompt the chat template writes when a chat has none ("" if it writes none): the text in
    the sentinel's place when the same chat is rendered with and without a system message."""
    chat = PROBES["user"]
    with_system, without = render([{"role": "system", "content": SENTINEL}] + chat), render(chat)
    if SENTINEL not in with_system:
        return ""
    before, after = with_system.split(SENTINEL, 1)
    if without.startswith(before) and without.endswith(after) and len(without) > len(before) + len(after):
        return without[len(before):len(without) - len(after)]
    return ""


def analyse(tokenizer) -> tuple[str, str, str]:
    """(family, default system prompt, the BOS text every prompt starts with or ""), once the TEMPLATE we would
    write is known to render the prompts the chat template renders; else ExportError, one line."""
    source, bos, render = _renderer(tokenizer)
    family = template_family(source)
    system = default_system(render)
    wanted = {name: render(chat) for name, chat in PROBES.items()}
    bos = bos if "bos_token" in source and bos and all(w.startswith(bos) for w in wanted.values()) else ""
    for name, chat in PROBES.items():
        sent = chat if chat[0]["role"] == "system" or not system else [{"role": "system", "content": system}] + chat
        want, got = wanted[name][len(bos):], _mirror(family, sent)
        if want != got:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            raise ExportError(f"the chat template looks like {family} but renders a {name} chat differently "
                              f"from the Ollama TEMPLATE we would write (at {want[at:at + 40]!r}); {ELSEWHERE}")
    if '"""' in system:
        raise ExportError(f'the default system prompt holds """, which a Modelfile cannot quote; {ELSEWHERE}')
    return family, system, bos


def modelfile(tokenizer, gguf_name: str, adds_bos: bool = True) -> str:
    """The Modelfile for `gguf_name` beside it: FROM, TEMPLATE, the family's stop strings and the default
    SYSTEM prompt. `adds_bos`: the GGUF file has the runtime add the BOS token; if not, and the chat template
    writes one, the TEMPLATE writes it."""
    family, system, bos = analyse(tokenizer)
    template, stops = FAMILIES[family]
    lines = ["# lora-tui export: run `ollama create NAME -f Modelfile` in this folder", f"FROM ./{gguf_name}",
             f'TEMPLATE """{"" if adds_bos else bos}{template}"""'] + [f'PARAMETER stop "{s}"' for s in stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def gguf_adds_bos(path: Path) -> bool:
    """Whether llama.cpp (Ollama's runtime) adds BOS to a prompt for this GGUF file: its add_bos_token, else
    llama.cpp's default (yes for SentencePiece "llama" vocabularies)."""
    import gguf
    fields = gguf.GGUFReader(str(path)).fields
    if "tokenizer.ggml.add_bos_token" in fields:
        return bool(fields["tokenizer.ggml.add_bos_token"].contents())
    return "tokenizer.ggml.model" in fields and fields["tokenizer.ggml.model"].contents() == "llama"


def readme(family: str, quant: str, system: bool) -> str:
    return (f"An Ollama model: {GGUF_NAME} ({quant}) and a Modelfile whose TEMPLATE, stop parameters"
            f"{' and SYSTEM prompt' if system else ''} match the model's {family} chat template.\n\n"
            "To add it to Ollama, run in this folder (NAME is yours to choose):\n\n"
            "    ollama create NAME -f Modelfile\n\n"
            "then `ollama run NAME`. LM Studio and llama.cpp read model.gguf as it is (no Modelfile needed).\n")


def export_ollama(cfg: Config, adapter: str | Path | None, out: str | Path, quant: str = "q8_0",
                  progress: Callable[[str, float], None] | None = None) -> dict:
    """Write the folder `out` (new or empty; built aside and renamed into place): model.gguf, Modelfile,
    README.txt. The chat template is checked first: one we cannot reproduce fails before the GGUF is made."""
    from engine.export.gguf import export_gguf
    from engine.model.loading import load_tokenizer

    report = progress or (lambda what, fraction: None)
    out = check_out(out)
    tokenizer = load_tokenizer(cfg.model)
    family, system, _ = analyse(tokenizer)
    try:
        with atomic.folder(out) as tmp:
            export_gguf(cfg, adapter, tmp / GGUF_NAME, quant, lambda what, f: report(what, 0.98 * f))
            text = modelfile(tokenizer, GGUF_NAME, adds_bos=gguf_adds_bos(tmp / GGUF_NAME))
            (tmp / "Modelfile").write_text(text, encoding="utf-8")
            (tmp / "README.txt").write_text(readme(family, quant, bool(system)), encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"--out {out}: could not write the Ollama folder ({exc.strerror or exc}); nothing "
                          "was left there") from None
    report("done", 1.0)
    files = sorted(f.name for f in out.iterdir())
    return {"path": str(out), "bytes": sum((out / f).stat().st_size for f in files), "files": files,
            "format": "ollama", "template": family, "quant": quant}
