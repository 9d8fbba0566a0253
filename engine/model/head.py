"""Where a chat model's trunk ends and its output head begins (the loss and decoding take the head apart)."""

from __future__ import annotations


# Model families whose __call__ is exactly `head(model.model(inputs))` (tied or untied lm_head).
_PLAIN_HEAD_MODULES = {"mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3"}


def split_head(model):
    """The output projection, if the model is a plain trunk + head we may split; else None."""
    if type(model).__module__ not in _PLAIN_HEAD_MODULES or not hasattr(model, "model"):
        return None
    if getattr(model.args, "tie_word_embeddings", False):
        return model.model.embed_tokens.as_linear
    return model.lm_head
