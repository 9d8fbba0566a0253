"""Build a tiny Mistral-architecture model directory (random weights, a byte-level tokenizer and
Mistral-7B-Instruct-v0.3's [INST] chat template), so the Mistral path runs with no hub access."""

from __future__ import annotations

import json
from pathlib import Path

# The chat template of mistralai/Mistral-7B-Instruct-v0.3 (its non-tool part): the system prompt is
# folded into the *last* user turn, and roles must alternate.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception "
    "of an initial optional system message!') }}{%- endif %}"
    "{%- endfor %}"
)


def make_tiny_mistral(path: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    alphabet = ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    (path / "tokenizer.json").write_text(tok.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": False, "chat_template": MISTRAL_TEMPLATE}))
    config = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": hidden,
              "intermediate_size": hidden * 2, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "vocab_size": len(vocab),
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "bos_token_id": 1,
              "eos_token_id": 2}
    (path / "config.json").write_text(json.dumps(config))
    mx.random.seed(seed)
    args = llama.ModelArgs.from_dict(config | {"model_type": "llama"})
    model = llama.Model(args)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return path
