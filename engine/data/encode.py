"""Render conversations through the tokenizer's own chat template and mark which tokens train.

Masking comes from the structure of the rendered turns, never from finding a message's text (a system
prompt may contain the answer): assistant turn k is what rendering messages[:k+1] adds to the prompt
rendered for messages[:k] with the generation prompt, both checked to be prefixes of the whole rendering.
A token trains when it begins inside such a turn; the whitespace the template puts after the
end-of-turn token does not. Templates that move the system prompt or the tools into the last user turn
(Mistral v0.3) are prefix-stable once those are left out of the earlier prefixes; a template that is
prefix-stable in none of these ways is refused with a clear error.

Rendering is bounded (engine/data/template.py): a chat template is code from the model's
tokenizer_config.json, and a runaway loop or a huge output must end in an error, not a hang or an OOM kill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from engine.data.records import Conversation
from engine.data import template
from engine.data.template import EncodeError, TemplateLimitError, compile_template, render_bounded

# Used only when a tokenizer ships no chat template of its own.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Private-use code points: no real message carries them (checked before use).
TURN_MARKER = "\ue000lora-tui-turn\ue001"


@dataclass
class Encoded:
    tokens: np.ndarray  # int32, the full rendered conversation (before truncation)
    trained: np.ndarray  # bool per token: True where the token is a training target
    notes: tuple[str, ...] = ()  # what the template did that a user should know (aggregated in reports)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_trained(self) -> int:
        return int(self.trained.sum())


def hf_tokenizer(tokenizer):
    """The Hugging Face tokenizer behind mlx-lm's TokenizerWrapper (or the tokenizer itself)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


NOTE_TOOL_AS_USER = "tool turns rendered as user turns (the chat template has no tool role)"
NOTE_SYSTEM_DROPPED = "the chat template drops the system prompt (it never reaches the model)"


def _tool_as_user(conv: Conversation) -> Conversation:
    msgs = [{"role": "user", "content": m["content"]} if m["role"] == "tool" else
            {"role": m["role"], "content": m["content"]} for m in conv.messages]
    return Conversation(msgs, None, conv.label, conv.format, conv.text)


class ChatEncoder:
    def __init__(self, tokenizer, mask_prompt: bool = True):
        self.tok = hf_tokenizer(tokenizer)
        self.mask_prompt = mask_prompt
        self.has_template = bool(getattr(self.tok, "chat_template", None))
        self.eos_text = self.tok.eos_token or ""
        self.eos_id = self.tok.eos_token_id
        self.name = getattr(self.tok, "name_or_path", "") or "this model"
        source = self.tok.chat_template if self.has_template else FALLBACK_TEMPLATE
        try:
            self._compiled = compile_template(source)
        except Exception as exc:  # a syntax error, or a constant the size checks refuse
            raise EncodeError(f"the chat template of {self.name} does not compile: {exc}") from None
        self._special = {k: v for k, v in self.tok.special_tokens_map.items() if isinstance(v, str)}
        self._fast = getattr(self.tok, "backend_tokenizer", None)

    def render(self, conv: Conversation, add_generation_prompt: bool = False) -> str:
        if conv.format == "text":
            return conv.text or ""
        return self._render(conv.messages, conv.tools, add_generation_prompt)

    def _render(self, messages: list[dict], tools, add_generation_prompt: bool = False) -> str:
        try:
            return render_bounded(self._compiled, self.name, messages=messages, tools=tools or None,
                                  add_generation_prompt=add_generation_prompt, **self._special)
        except TemplateLimitError:
            raise
        except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate")
            raise EncodeError(f"the chat template rejected this conversation: {exc}") from None

    def prompt_text(self, messages: list[dict], tools=None) -> str:
        """A prompt ending in the assistant header, for generation."""
        return self.render(Conversation(list(messages), tools), add_generation_prompt=True)

    def _assistant_spans(self, text: str, conv: Conversation) -> list[tuple[int, int]]:
        # Each turn costs two renders of a prefix, so a line of thousands of turns costs their square: one
        # deadline for the whole conversation, where each render alone stays well under its own bound.
        deadline = time.monotonic() + template.RENDER_SECONDS
        spans = []
        for k, m in enumerate(conv.messages):
            if m["role"] != "assistant":
                continue
            if time.monotonic() > deadline:
                raise EncodeError(f"locating the {len(conv.messages)} turns of this conversation took over "
                                  f"{template.RENDER_SECONDS:g} s: split it into shorter conversations")
            spans.append(self._turn_span(text, conv, k))
        return spans

    def _turn_span(self, full: str, conv: Conversation, k: int) -> tuple[int, int]:
        """(start, end) in `full` of assistant turn k: from the end of the generation prompt for the turns
        before it to the end of its own rendering, less the whitespace the template adds after it."""
        msgs = conv.messages
        # Mistral v0.3 puts the system prompt and the tools in the last user turn: for an earlier turn,
        # the prefix that matches the whole rendering is the one without them.
        firsts = [0, 1] if msgs[0]["role"] == "system" else [0]
        for tools in [conv.tools, None] if conv.tools else [None]:
            for first in firsts:
                prompt = self._render(msgs[first:k], tools, add_generation_prompt=True)
                whole = first == 0 and tools is conv.tools and k + 1 == len(msgs)
                upto = full if whole else self._render(msgs[first:k + 1], tools)
                end = len(upto.rstrip())
                if end > len(prompt) and upto.startswith(prompt) and full.startswith(upto):
                    return len(prompt), end
        return self._marked_span(full, conv, k)

    def _marked_span(self, full: str, conv: Conversation, k: int) -> tuple[int, int]:
        """Assistant turn k of a template that renders a turn differently once it is no longer the last (Qwen3
        adds an empty think block only to turns after the last user message): render the conversation with
        this turn's content replaced by a marker no message contains; the rendering must match `full` up to
        the marker, and `full` must hold the content there. Trains the content and its end-of-turn token."""
        content = conv.messages[k]["content"].strip()
        probe = [dict(m) for m in conv.messages]
        probe[k]["content"] = TURN_MARKER
        marked = self._render(probe, conv.tools) if TURN_MARKER not in full else ""
        at = marked.find(TURN_MARKER)
        if at < 0 or marked.count(TURN_MARKER) != 1 or full[:at] != marked[:at] or not full.startswith(content, at):
            raise EncodeError("the chat template renders earlier turns differently once later turns follow, so "
                              "the assistant turns cannot be located for loss masking (set data.mask_prompt: "
                              "false to train on every token, or use another model)")
        end = at + len(content)
        if self.eos_text and full.startswith(self.eos_text, end):
            end += len(self.eos_text)
        return at, end

    def encode(self, conv: Conversation) -> Encoded:
        result = self.encode_many([conv])[0]
        if isinstance(result, EncodeError):
            raise result
        return result

    def encode_many(self, convs: list[Conversation]) -> list[Encoded | EncodeError]:
        """Encode a batch; the tokenizer runs over all texts at once, in parallel across cores."""
        convs = list(convs)
        results: list[Encoded | EncodeError | None] = [None] * len(convs)
        texts, where = [], []
        notes: dict[int, tuple[str, ...]] = {}
        for i, conv in enumerate(convs):
            if conv.format == "text":
                results[i] = self._encode_text(conv)
                continue
            try:
                texts.append(self.render(conv))
            except EncodeError as exc:
                if isinstance(exc, TemplateLimitError) or not any(m["role"] == "tool" for m in conv.messages):
                    results[i] = exc
                    continue
                # Templates such as Mistral's reject a plain "tool" role: show the result as a user turn.
                try:
                    convs[i] = conv = _tool_as_user(conv)
                    texts.append(self.render(conv))
                    notes[i] = (NOTE_TOOL_AS_USER,)
                except EncodeError:
                    results[i] = exc
                    continue
            where.append(i)
            system = conv.messages[0]["content"].strip() if conv.messages and conv.messages[0]["role"] == "system" else ""
            if system and system not in texts[-1]:
                notes[i] = notes.get(i, ()) + (NOTE_SYSTEM_DROPPED,)
        for i, text, tokenized in zip(where, texts, self._tokenize(texts)):
            if isinstance(tokenized, EncodeError):
                results[i] = tokenized
                continue
            try:
                results[i] = self._mask(convs[i], text, *tokenized)
                results[i].notes = notes.get(i, ())
            except EncodeError as exc:
                results[i] = exc
        return results  # type: ignore[return-value]

    def _tokenize(self, texts: list[str]) -> list:
        """(ids, offsets) per text, in one parallel batch; an EncodeError for a text the tokenizer refuses."""
        if not texts:
            return []
        try:
            return self._tokenize_batch(texts)
        except Exception:  # one text spoils the batch: find it, so only its line is bad
            return [self._tokenize_one(text) for text in texts]

    def _tokenize_batch(self, texts: list[str]) -> list:
        if self._fast is not None:
            out = self._fast.encode_batch(texts, add_special_tokens=False)
            return [(o.ids, o.offsets) for o in out]
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    def _tokenize_one(self, text: str):
        try:
            return self._tokenize_batch([text])[0]
        except Exception as exc:
            return EncodeError(f"the tokenizer cannot encode this conversation: {exc}")

    def _mask(self, conv: Conversation, text: str, ids, offsets) -> Encoded:
        tokens = np.asarray(ids, dtype=np.int32)
        if not self.mask_prompt:
            return Encoded(tokens, np.ones(len(tokens), dtype=bool))
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        trained = np.zeros(len(tokens), dtype=bool)
        for start, end in self._assistant_spans(text, conv):  # a token that begins in the prompt never trains
            trained |= (off[:, 0] >= start) & (off[:, 0] < end)
        return Encoded(tokens, trained)

    def _encode_text(self, conv: Conversation) -> Encoded:
        text = conv.text or ""
        ids = self.tok(text, add_special_tokens=True)["input_ids"]
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids = ids + [self.eos_id]  # so the model learns to stop
        tokens = np.asarray(ids, dtype=np.int32)
        return Encoded(tokens, np.ones(len(tokens), dtype=bool))


def truncate(enc: Encoded, max_len: int) -> Encoded:
    return Encoded(enc.tokens[:max_len], enc.trained[:max_len]) if len(enc) > max_len else enc
