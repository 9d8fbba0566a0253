"""Validation loss and perplexity, and the tool-call behaviour metric on held-out prompts."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from engine.batches import collate
from engine.data import Example
from engine.generate.reply import GenerationSettings, reply
from engine.model.head import split_head
from engine.model.loading import on_gpu


# MLX's fused cross-entropy (float32 accumulation): on a GPU it reads the bf16 logits as they are, where
# the plain loss made a float32 copy and kept its softmax (bench/RESULTS.md). False: the plain loss, for
# bench/probe_gpu.py's comparison. On the CPU the fused op falls back to reducing in the logits' dtype, so
# the logits are cast to float32 there first.
FUSED_CE = True


def masked_loss(model, inputs, targets, positions, weights):
    """(sum of cross-entropies over the trained targets, their count).

    `positions` are the flat indices of trained targets (padded, with weight 0, to a multiple of 64 so the
    compiled step sees few shapes). Where the model splits into trunk + head, only those rows go through
    the vocabulary projection and softmax: with prompt masking that skips most of the largest matmul and
    most of the exps, and the (tokens x vocab) logits never exist for masked positions.
    """
    head = split_head(model)
    flat_targets = targets.reshape(-1)[positions]
    if head is not None:
        hidden = model.model(inputs)
        logits = head(hidden.reshape(-1, hidden.shape[-1])[positions])
    else:
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[positions]
    if FUSED_CE:
        ce = mx.fast.cross_entropy(logits if on_gpu() else logits.astype(mx.float32), flat_targets) * weights
    else:
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), flat_targets) * weights
    return ce.sum(), weights.sum()


def loss_inputs(inputs, targets, mask):
    """Host-side arrays for masked_loss from a collated batch."""
    import numpy as np
    flat = np.flatnonzero(mask.reshape(-1)).astype(np.int32)
    size = max(64, -(-len(flat) // 64) * 64)
    positions = np.zeros(size, dtype=np.int32)
    positions[:len(flat)] = flat
    weights = np.zeros(size, dtype=np.float32)
    weights[:len(flat)] = 1.0
    return mx.array(inputs), mx.array(targets), mx.array(positions), mx.array(weights)


def validation_loss(model, examples: list[Example], batch_size: int, pad_id: int, max_len: int,
                    max_batches: int = -1, world=None) -> float:
    """Token-weighted mean loss over the validation split (length-sorted batches, no dropout). In a
    distributed run (`world`, engine.distributed.World) batches are global, batch_size rows per rank, and each
    rank scores its share of each: the same examples and value as one process with the global batch, in
    1/N of the time."""
    if not examples:
        return float("nan")
    ranks, rank = (world.size, world.rank) if world is not None else (1, 0)
    rows = batch_size * ranks
    ordered = sorted(examples, key=lambda e: len(e.encoded))
    batches = [ordered[i:i + rows] for i in range(0, len(ordered), rows)]
    if max_batches > 0 and len(batches) > max_batches:
        step = len(batches) / max_batches  # spread over all lengths, not just the shortest
        batches = [batches[int(i * step)] for i in range(max_batches)]
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    try:
        for batch in batches:
            mine = batch[rank::ranks]
            if mine:
                s, n = masked_loss(model, *loss_inputs(*collate(mine, pad_id, max_len)[:3]))
                total, count = total + s, count + n
                mx.eval(total, count)
    finally:
        model.train(was_training)
    if ranks > 1:
        total, count = world.sum((total, count))
    return (total / mx.maximum(count, 1)).item()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


# ---------------------------------------------------------------- behaviour metric

CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


@dataclass
class ToolCallScore:
    prompts: int = 0
    well_formed: int = 0  # a <tool_call> with JSON holding name and arguments
    right_tool: int = 0
    exact: int = 0  # right tool and exactly the expected arguments
    examples: list[dict] = field(default_factory=list)

    def rate(self, what: str) -> float:
        return getattr(self, what) / self.prompts if self.prompts else 0.0

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "well_formed": self.rate("well_formed"),
                "right_tool": self.rate("right_tool"), "exact": self.rate("exact")}


def _norm(value):
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k).lower(): _norm(v) for k, v in value.items()}
    return value


def score_call(text: str, expected: dict) -> tuple[bool, bool, bool]:
    m = CALL.search(text)
    if not m:
        return False, False, False
    try:
        call = json.loads(m.group(1))
    except ValueError:
        return False, False, False
    if not isinstance(call, dict) or "name" not in call or not isinstance(call.get("arguments"), dict):
        return False, False, False
    right = call["name"] == expected["name"]
    return True, right, right and _norm(call["arguments"]) == _norm(expected["arguments"])


def load_heldout(path: str | Path, limit: int | None = None) -> list[dict]:
    """Held-out prompts, one JSON object a line: {"messages": [...], "expected": {"name", "arguments"}}."""
    from engine.data import DatasetError
    items = []
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    items.append(_heldout_item(line, f"{path}:line {number}"))
                    if limit and len(items) >= limit:
                        break
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DatasetError(f"evaluation.heldout_path: {path}: {why}; name a held-out file or set it to \"\" "
                           "for none") from None
    return items


def _heldout_item(line: str, where: str) -> dict:
    from engine.data import DatasetError
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise DatasetError(f"{where}: invalid JSON ({exc})") from None
    expected = item.get("expected") if isinstance(item, dict) else None
    if not (isinstance(item, dict) and isinstance(item.get("messages"), list) and item["messages"]
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in item["messages"])
            and isinstance(expected, dict) and "name" in expected and isinstance(expected.get("arguments"), dict)):
        raise DatasetError(f"{where}: a held-out prompt needs messages (a list of role/content objects) and "
                           "expected {name, arguments}")
    return item


def tool_call_score(model, tokenizer, items: list[dict], max_tokens: int = 96, keep_examples: int = 3) -> ToolCallScore:
    score = ToolCallScore()
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0)
    for item in items:
        text = reply(model, tokenizer, item["messages"], settings)
        formed, right, exact = score_call(text, item["expected"])
        score.prompts += 1
        score.well_formed += formed
        score.right_tool += right
        score.exact += exact
        if len(score.examples) < keep_examples:
            score.examples.append({"prompt": item["messages"][-1]["content"], "reply": text, "exact": exact})
    return score
