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
    assert trained_segments(enc, hf) == ["Yo there</s>", "A2</s>"]


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
    from engine.config import ModelConfig
    from engine.model import load_tokenizer
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
