"""Loss masking, token by token, against the tokenizer's own chat template."""

import numpy as np
import pytest

from engine.data import ChatEncoder, parse_record

MULTI_TURN = {"conversations": [
    {"from": "system", "value": "You are terse."},
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "gpt", "value": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'},
    {"from": "tool", "value": '{"temperature": 21}'},
    {"from": "gpt", "value": "It is 21 degrees."},
    {"from": "human", "value": "Thanks! And 2+2?"},
    {"from": "gpt", "value": "4"},
], "label": "desirable"}


def trained_segments(enc, hf) -> list[str]:
    """Decode each maximal run of trained tokens."""
    segments, run = [], []
    for token, trained in zip(enc.tokens.tolist(), enc.trained.tolist()):
        if trained:
            run.append(token)
        elif run:
            segments.append(hf.decode(run))
            run = []
    if run:
        segments.append(hf.decode(run))
    return segments


def test_chatml_every_assistant_turn_and_its_end_token_train(tokenizer):
    conv, issues = parse_record(MULTI_TURN, 1)
    assert not issues
    encoder = ChatEncoder(tokenizer)
    enc = encoder.encode(conv)
    hf = encoder.tok
    # The tokens are exactly the chat template's own rendering.
    rendered = hf.apply_chat_template(conv.messages, tokenize=False)
    assert hf.decode(enc.tokens.tolist()) == rendered
    assert enc.tokens.tolist() == hf.encode(rendered, add_special_tokens=False)
    assert trained_segments(enc, hf) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>',
        "It is 21 degrees.<|im_end|>",
        "4<|im_end|>",
    ]
    # Token by token: a header <|im_start|>role\n never trains; the body and <|im_end|> train exactly
    # when the role is assistant; the newline between turns never trains.
    pieces = [hf.decode([t]) for t in enc.tokens.tolist()]
    trained = enc.trained.tolist()
    i, turns = 0, 0
    while i < len(pieces):
        assert pieces[i] == "<|im_start|>" and not trained[i]
        i += 1
        role = ""
        while pieces[i] != "\n":
            assert not trained[i]
            role += pieces[i]
            i += 1
        assert not trained[i]
        i += 1
        while pieces[i] != "<|im_end|>":
            assert trained[i] == (role == "assistant"), (role, pieces[i])
            i += 1
        assert trained[i] == (role == "assistant")
        assert pieces[i + 1] == "\n" and not trained[i + 1]
        i += 2
        turns += 1
    assert turns == 7


def test_mistral_inst_template_masks_instructions(mistral_tokenizer):
    conv, _ = parse_record({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo there"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}, 1)
    encoder = ChatEncoder(mistral_tokenizer)
    enc = encoder.encode(conv)
    hf = encoder.tok
    assert hf.decode(enc.tokens.tolist()) == "<s>[INST] Hi[/INST] Yo there</s>[INST] Q2[/INST] A2</s>"
    # The space the template puts after [/INST] is part of what the model generates after the prompt.
    assert trained_segments(enc, hf) == [" Yo there</s>", " A2</s>"]


def test_mask_prompt_off_trains_everything(tokenizer):
    conv, _ = parse_record(MULTI_TURN, 1)
    enc = ChatEncoder(tokenizer, mask_prompt=False).encode(conv)
    assert enc.trained.all()


def test_completion_format_trains_only_the_completion(tokenizer):
    conv, _ = parse_record({"prompt": "Say hi", "completion": "hi there"}, 1)
    encoder = ChatEncoder(tokenizer)
    assert trained_segments(encoder.encode(conv), encoder.tok) == ["hi there<|im_end|>"]


def test_text_format_trains_all_and_ends_with_eos(tokenizer):
    conv, _ = parse_record({"text": "plain text"}, 1)
    encoder = ChatEncoder(tokenizer)
    enc = encoder.encode(conv)
    assert enc.trained.all() and enc.tokens[-1] == encoder.eos_id
    assert encoder.tok.decode(enc.tokens[:-1].tolist()) == "plain text"


def test_tokenizer_without_template_uses_chatml_fallback(mistral_dir, tmp_path):
    import json
    import shutil
    from engine.config.schema import ModelConfig
    from engine.model.loading import load_tokenizer
    plain = tmp_path / "plain"
    shutil.copytree(mistral_dir, plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    encoder = ChatEncoder(load_tokenizer(ModelConfig(name=str(plain))))
    conv, _ = parse_record({"prompt": "a", "completion": "b"}, 1)
    enc = encoder.encode(conv)
    assert encoder.tok.decode(enc.tokens.tolist()) == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
    assert np.count_nonzero(enc.trained) > 0


# --- The mask comes from the structure of the turns, not from finding the answer's text ---------------

SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Text that turns repeat: answers, role names and template words, the default system prompt.
FRAGMENTS = ["chat", "cat -> chat", "Hugging Face", "assistant", "user", "system", "tool", "INST", "/INST",
             "im_end", "im_start", "s>", "42", "Paris", "It is 21 degrees.", SMOL_DEFAULT_SYSTEM, "a\nb"]


def _text(rng, pool) -> str:
    """One to three pieces of the pool; never blank, never starting with whitespace."""
    words = [pool[i] for i in rng.integers(0, len(pool), rng.integers(1, 4))]
    return " ".join(words) + (" " if rng.random() < 0.2 else "")


def random_conversation(rng, tool_turns: bool, distinct_users: bool = False) -> list[dict]:
    """A conversation whose turns repeat each other's text: one of a few answers (often all the same)
    is also put in the system prompt and in the user turns (numbered when `distinct_users`)."""
    answers = [_text(rng, FRAGMENTS) for _ in range(rng.integers(1, 3))]
    pool = FRAGMENTS + answers
    msgs = []
    if rng.random() < 0.6:
        msgs.append({"role": "system", "content": _text(rng, pool) + " Example: " + answers[0]})
    for turn in range(rng.integers(1, 4)):
        msgs.append({"role": "user", "content": (answers[rng.integers(len(answers))] if rng.random() < 0.4
                                                 else _text(rng, pool)) + (f" #{turn}" if distinct_users else "")})
        msgs.append({"role": "assistant", "content": answers[rng.integers(len(answers))]})
        if tool_turns and rng.random() < 0.3:
            msgs.append({"role": "tool", "content": _text(rng, pool)})
            msgs.append({"role": "assistant", "content": answers[rng.integers(len(answers))]})
    return msgs


def chatml_expected(pieces: list[str]) -> tuple[list[bool], list[str]]:
    """Independent of the encoder: walk the ChatML tokens; a turn's body and its <|im_end|> train exactly
    when the header names the assistant. Also returns the roles, in order."""
    expected, roles, i = [], [], 0
    while i < len(pieces):
        assert pieces[i] == "<|im_start|>"
        role, j = "", i + 1
        while pieces[j] != "\n":
            role += pieces[j]
            j += 1
        expected += [False] * (j + 1 - i)
        i = j + 1
        while pieces[i] != "<|im_end|>":
            expected.append(role == "assistant")
            i += 1
        expected += [role == "assistant", False]  # <|im_end|>, then the newline between turns
        assert pieces[i + 1] == "\n"
        i += 2
        roles.append(role)
    return expected, roles


def inst_expected(pieces: list[str]) -> list[bool]:
    """Independent of the encoder: in [INST] text, what follows [/INST] up to and including </s> trains."""
    expected, answering = [], False
    for piece in pieces:
        if piece == "[/INST]":
            expected.append(False)
            answering = True
        else:
            expected.append(answering)
            answering = answering and piece != "</s>"
    return expected


def test_property_chatml_trains_exactly_the_assistant_turns(tokenizer):
    rng = np.random.default_rng(15)
    encoder = ChatEncoder(tokenizer)
    hf = encoder.tok
    for n in range(300):
        msgs = random_conversation(rng, tool_turns=True)
        conv, issues = parse_record({"messages": msgs}, n)
        assert not issues, issues
        enc = encoder.encode(conv)
        assert hf.decode(enc.tokens.tolist()) == hf.apply_chat_template(msgs, tokenize=False)
        expected, roles = chatml_expected([hf.decode([t]) for t in enc.tokens.tolist()])
        assert roles == ([] if msgs[0]["role"] == "system" else ["system"]) + [m["role"] for m in msgs]
        assert enc.trained.tolist() == expected, msgs


def with_template(tokenizer, template: str):
    """A copy of an mlx-lm tokenizer wrapper whose Hugging Face tokenizer has another chat template."""
    import copy
    tok = copy.copy(tokenizer)
    tok._tokenizer = copy.deepcopy(tokenizer._tokenizer)
    tok._tokenizer.chat_template = template
    return tok


def inst_with_tools_template() -> str:
    """Mistral v0.3's template with its tools part: [AVAILABLE_TOOLS] goes before the *last* user turn."""
    from tiny_mistral import MISTRAL_TEMPLATE
    user = "{%- if message['role'] == 'user' %}"
    assert MISTRAL_TEMPLATE.count(user) == 1
    return ("{%- set user_messages = messages | selectattr('role', 'equalto', 'user') | list %}" +
            MISTRAL_TEMPLATE.replace(user, user + "{%- if tools is not none and message == user_messages[-1] %}"
                                     "{{- '[AVAILABLE_TOOLS] ' + tools|tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}"))


TOOLS = [{"type": "function", "function": {"name": "chat", "parameters": {"assistant": "user"}}}]


@pytest.mark.parametrize("tools_part", [False, True], ids=["inst", "inst-with-tools"])
def test_property_inst_trains_exactly_the_assistant_turns(mistral_tokenizer, tools_part):
    rng = np.random.default_rng(16)
    tok = with_template(mistral_tokenizer, inst_with_tools_template()) if tools_part else mistral_tokenizer
    encoder = ChatEncoder(tok)
    hf = encoder.tok
    for n in range(300):
        # Mistral's tools part tests `message == user_messages[-1]`, so it puts the tools before every user
        # turn equal to the last one (test_inst_tools_before_a_repeated_user_turn): users differ here.
        msgs = random_conversation(rng, tool_turns=False, distinct_users=tools_part)
        record = {"messages": msgs} | ({"tools": TOOLS} if tools_part and rng.random() < 0.7 else {})
        conv, issues = parse_record(record, n)
        assert not issues, issues
        enc = encoder.encode(conv)
        pieces = [hf.decode([t]) for t in enc.tokens.tolist()]
        assert "".join(pieces) == hf.apply_chat_template(msgs, tools=record.get("tools"), tokenize=False)
        assert pieces.count("</s>") == sum(m["role"] == "assistant" for m in msgs)
        assert ("[AVAILABLE_TOOLS]" in "".join(pieces)) == ("tools" in record)
        assert enc.trained.tolist() == inst_expected(pieces), msgs


def test_inst_tools_before_a_repeated_user_turn(mistral_tokenizer):
    # The first and last user turns are equal, so the template puts the tools before both; the prompt for
    # the middle answer has them before neither: no prefix matches, and the marker render finds the turns.
    encoder = ChatEncoder(with_template(mistral_tokenizer, inst_with_tools_template()))
    conv, _ = parse_record({"tools": TOOLS, "messages": [
        {"role": "user", "content": "ok"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "more"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "ok"}, {"role": "assistant", "content": "c"}]}, 1)
    assert encoder.render(conv).count("[AVAILABLE_TOOLS]") == 2
    segments = trained_segments(encoder.encode(conv), encoder.tok)
    assert [seg.strip() for seg in segments] == ["a</s>", "b</s>", "c</s>"]
    conv.messages[4]["content"] = "ok then"
    assert trained_segments(encoder.encode(conv), encoder.tok) == [" a</s>", " b</s>", " c</s>"]


def trained_at_end(enc, hf, answer: str) -> None:
    """Exactly the answer and its end token train, and they are the last turn (not text in the system)."""
    assert trained_segments(enc, hf) == [answer + hf.eos_token]
    first = enc.trained.tolist().index(True)
    assert hf.decode(enc.tokens[first:].tolist()) == answer + hf.eos_token + "\n"


def test_system_prompt_containing_the_answer_does_not_train(tokenizer):
    conv, _ = parse_record({"messages": [
        {"role": "system", "content": "Translate the word to French. Example: cat -> chat"},
        {"role": "user", "content": "cat"}, {"role": "assistant", "content": "chat"}]}, 1)
    encoder = ChatEncoder(tokenizer)
    enc = encoder.encode(conv)
    trained_at_end(enc, encoder.tok, "chat")


@pytest.mark.parametrize("question", ["Who trained you?", "SmolLM", "assistant"])
def test_default_system_prompt_containing_the_answer_does_not_train(tokenizer, question):
    # No system message: SmolLM2's template adds "... assistant named SmolLM, trained by Hugging Face".
    conv, _ = parse_record({"messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": "Hugging Face"}]}, 1)
    encoder = ChatEncoder(tokenizer)
    enc = encoder.encode(conv)
    assert "trained by Hugging Face" in encoder.tok.decode(enc.tokens.tolist())
    trained_at_end(enc, encoder.tok, "Hugging Face")


def test_inst_system_prompt_moved_into_the_last_user_turn(mistral_tokenizer):
    # Mistral v0.3 renders the system prompt only in a final user turn (so a prompt for turn k has it and
    # the whole conversation does not): the turns are still found, and the dropped prompt is reported.
    from engine.data.encode import NOTE_SYSTEM_DROPPED
    conv, _ = parse_record({"messages": [
        {"role": "system", "content": "Say A2."}, {"role": "user", "content": "A2"},
        {"role": "assistant", "content": "A2"}, {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"}]}, 1)
    encoder = ChatEncoder(mistral_tokenizer)
    assert encoder.prompt_text(conv.messages[:4]) == "<s>[INST] A2[/INST] A2</s>[INST] Say A2.\n\nQ2[/INST]"
    enc = encoder.encode(conv)
    hf = encoder.tok
    assert hf.decode(enc.tokens.tolist()) == "<s>[INST] A2[/INST] A2</s>[INST] Q2[/INST] A2</s>"
    assert trained_segments(enc, hf) == [" A2</s>", " A2</s>"]
    assert enc.notes == (NOTE_SYSTEM_DROPPED,)


# Qwen3's shape: an empty think block only in assistant turns after the last user message, so an earlier
# turn renders differently while it is the last one (a prefix render cannot find it).
THINK_LAST = ("{% set ns = namespace(last_user=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
              "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
              "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
              "{% if m['role'] == 'assistant' and loop.index0 > ns.last_user %}<think>\n\n</think>\n\n{% endif %}"
              "{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_template_that_rewrites_a_turn_once_it_is_no_longer_last_is_still_masked(tokenizer):
    tok = with_template(tokenizer, THINK_LAST)
    msgs = [{"role": "system", "content": "Answer: user"}, {"role": "user", "content": "user"},
            {"role": "assistant", "content": "user"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "user"}]
    conv, _ = parse_record({"messages": msgs}, 1)
    encoder = ChatEncoder(tok)
    enc = encoder.encode(conv)
    hf = encoder.tok
    expected, roles = chatml_expected([hf.decode([t]) for t in enc.tokens.tolist()])
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert enc.trained.tolist() == expected
    assert trained_segments(enc, hf) == ["user<|im_end|>", "<think>\n\n</think>\n\nuser<|im_end|>"]


def test_template_that_is_not_prefix_stable_is_refused(mistral_tokenizer):
    from engine.data.template import EncodeError
    # Earlier assistant turns are upper-cased: neither a prefix render nor a marker finds their text.
    tok = with_template(mistral_tokenizer, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] if loop.last "
                        "or m['role'] != 'assistant' else m['content']|upper }}\n{% endfor %}")
    conv, _ = parse_record({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, 1)
    with pytest.raises(EncodeError, match="renders earlier turns differently"):
        ChatEncoder(tok).encode(conv)
