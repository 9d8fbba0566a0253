"""Pair rows (prompt + chosen / rejected) in the shapes TRL and LLaMA-Factory write: parsed, checked line by
line, encoded with the same chat template and masks, each answer scored on its own turns only; and what
each training method takes from a file."""

import numpy as np
import pytest

from engine.config.schema import Config
from engine.data import method_use, parse_record, prepare_dataset, validate_dataset
from engine.data.validate import DatasetError
from helpers import addition_chats, write_jsonl

USER = {"role": "user", "content": "2+2?"}


@pytest.mark.parametrize("record", [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": [USER], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}]},
    {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
     "rejected": {"from": "gpt", "value": "5"}},
    {"chosen": [USER, {"role": "assistant", "content": "4"}], "rejected": [USER, {"role": "assistant", "content": "5"}]},
])
def test_every_pair_shape_gives_the_same_pair(record):
    conv, issues = parse_record(record, 1)
    assert issues == []
    assert conv.messages == [USER, {"role": "assistant", "content": "4"}]
    assert conv.rejected == [USER, {"role": "assistant", "content": "5"}] and conv.prompt_turns == 1


@pytest.mark.parametrize("record,field,words", [
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing rejected"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected", "the same as chosen"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "must be a string, a message or a list"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "prompt", "must end with a user"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen[0].role",
     "must start with an assistant turn"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}, "prompt",
     "missing prompt"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "label": "maybe"}, "label", "bad label"),
])
def test_a_bad_pair_row_names_its_field(record, field, words):
    conv, issues = parse_record(record, 7)
    assert conv is None and issues
    assert issues[0].line == 7 and issues[0].field == field and words in issues[0].reason


def test_pairs_encode_with_only_the_answers_trained(tmp_path, tokenizer):
    multi = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "It is 5."}
    path = write_jsonl(tmp_path / "p.jsonl", [multi, {"prompt": "q", "chosen": "a"}, {"prompt": "x", "chosen": "y",
                                                                                         "rejected": "z"}])
    report, examples = validate_dataset(path, tokenizer, keep_examples=True, error_threshold=0.5)
    assert report.pairs == 2 and report.error_lines == 1 and str(report.issues[0]).startswith("line 2: rejected:")
    ex = examples[0]
    chosen = tokenizer.decode(ex.encoded.tokens[ex.encoded.trained].tolist())
    rejected = tokenizer.decode(ex.rejected.tokens[ex.rejected.trained].tolist())
    assert "Hello" not in chosen and chosen.startswith("4") and rejected.startswith("It is 5.")
    first = int(np.flatnonzero(ex.encoded.trained)[0])  # the shared prompt is the same tokens in both
    assert first == int(np.flatnonzero(ex.rejected.trained)[0])
    assert (ex.encoded.tokens[:first] == ex.rejected.tokens[:first]).all()


def test_each_method_says_and_takes_its_rows(tmp_path, tokenizer):
    rows = addition_chats(30, undesirable_every=3) + [{"prompt": f"{i}?", "chosen": "yes", "rejected": "no"}
                                                        for i in range(6)]
    path = write_jsonl(tmp_path / "mix.jsonl", rows)
    report, _ = validate_dataset(path, tokenizer)
    uses = method_use(report, ["desirable"])
    assert uses["kto"] == "KTO: 26 desirable + 16 undesirable (6 pairs split into one of each)"
    assert uses["dpo"] == "DPO/ORPO: 6 pairs"
    assert uses["sft"].startswith("SFT: 26 answers (6 chosen of pairs), 10 set aside")
    cfg = Config()
    cfg.data.path, cfg.data.validation_split = str(path), 0.0
    for method, n in (("sft", 26), ("kto", 42), ("dpo", 6)):
        cfg.training.method = method
        data = prepare_dataset(cfg, tokenizer)
        assert len(data.train) == n, method
    cfg.data.path = str(write_jsonl(tmp_path / "labels.jsonl", addition_chats(10, undesirable_every=3)))
    cfg.training.method = "orpo"
    with pytest.raises(DatasetError, match="needs pair rows .* use training.method: kto"):
        prepare_dataset(cfg, tokenizer)


def test_kto_and_orpo_refuse_unmasked_prompts():
    from engine.config.validation import validate
    cfg = Config()
    cfg.data.mask_prompt = False
    for method, refused in (("kto", True), ("orpo", True), ("dpo", False), ("sft", False)):
        cfg.training.method = method
        errors = [i for i in validate(cfg) if i.severity == "error" and i.field == "data.mask_prompt"]
        assert bool(errors) is refused, method
