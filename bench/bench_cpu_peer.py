#!/usr/bin/env python3
"""The engine's CPU training step against PyTorch + PEFT (eager and torch.compile) on the same batches.

    python3 -m venv bench/.venv-torch && bench/.venv-torch/bin/pip install torch peft transformers
    scripts/run python bench/bench_cpu_peer.py --peer-python bench/.venv-torch/bin/python [--steps 8]

(bench/.venv-trl, the TRL proof's environment, also has torch + peft.) Not a CI dependency.

1. Our environment prepares the embedded SmolLM2-135M in float32 (as bench_cpu.py does) and the batches:
   the sample dataset's desirable conversations through the engine's own data pipeline (chat template,
   prompt masking, length-bucketed batches of 4, padded to 16), saved as arrays.
2. Each tool then trains on exactly those batches in its own process, alternating: LoRA r16, alpha 32,
   no dropout, on q_proj and v_proj of every block; AdamW lr 1e-4, weight decay 0.01; 2 warm-up steps,
   then --steps timed. Ours runs the functions TrainingRun uses (build_micro_step, clip_gradients,
   build_update). PyTorch: transformers' LlamaForCausalLM (sdpa, no padding mask: padding sits at the end
   under the causal mask, as in ours) + PEFT, `model(input_ids, labels=...)`, the way PEFT users train;
   `compile` wraps each decoder layer in torch.compile (regional compilation).
Tokens/s counts every token of every batch, padding included, for both (the same batches). Memory is the
process's max RSS. Useful work: 4 x N FLOPs a token (N = non-embedding parameters + the head), over the
fp32 matmul peak measured in the same run (2048^3, MLX and PyTorch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_cpu import PREPARE, run_child  # noqa: E402

BATCHES = """
import sys, numpy as np
sys.path.insert(0, {root!r})
import engine
from engine.config.schema import Config
from engine.data import prepare_dataset
from engine.train.batches import collate, epoch_batches
from mlx_lm.utils import load
_, tokenizer = load({model!r})
cfg = Config()
cfg.model.max_seq_length = 1024
cfg.data.path, cfg.data.validation_split, cfg.data.train_labels = {data!r}, 0.0, []
data = prepare_dataset(cfg, tokenizer)
order = epoch_batches([len(e.encoded) for e in data.train], {batch}, seed=0, epoch=0)
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
arrays = {{}}
for i, rows in enumerate(order[:{count}]):
    inputs, targets, mask, real = collate([data.train[r] for r in rows], pad, 1024)
    arrays[f"inputs{{i}}"], arrays[f"targets{{i}}"], arrays[f"mask{{i}}"] = inputs, targets, mask
np.savez({out!r}, **arrays)
"""

OURS = """
import json, resource, sys, time, numpy as np
sys.path.insert(0, {root!r})
import engine
import mlx.core as mx, mlx.optimizers as optim
from engine.config.schema import Config
from engine.model.adapters import apply_lora
from engine.model.loading import load_model
from engine.train.losses import loss_inputs
from engine.train.step import accumulate_gradients, build_micro_step, build_update, clip_gradients
cfg = Config()
cfg.model.name = {model!r}
cfg.lora.dropout = 0.0
model, _, _ = load_model(cfg.model, lambda *a: None)
mx.random.seed(0)  # the adapters' initial A: the same in every round, so the final losses compare
apply_lora(model, cfg.lora)
opt = optim.AdamW(learning_rate=1e-4, weight_decay=0.01, bias_correction=True)  # as TrainingRun and PyTorch
micro, update = build_micro_step(model, opt), build_update(model, opt)
z = np.load({batches!r})
n = len(z.files) // 3
times, losses, tokens = [], [], []
for i in range({warmup} + {steps}):
    k = i % n
    arrays = loss_inputs(z[f"inputs{{k}}"], z[f"targets{{k}}"], z[f"mask{{k}}"])
    t0 = time.perf_counter()
    grads, loss = accumulate_gradients(micro, [arrays])
    grads, _ = clip_gradients(grads, 0.0)
    update(grads)
    mx.eval(model.trainable_parameters(), opt.state, loss)
    if i >= {warmup}:
        times.append(time.perf_counter() - t0); losses.append(loss.item()); tokens.append(z[f"inputs{{k}}"].size)
a, b = mx.random.normal((2048, 2048)), mx.random.normal((2048, 2048))
mx.eval(a @ b)
t0 = time.perf_counter()
for _ in range(10):
    mx.eval(a @ b)
peak = 2 * 2048 ** 3 * 10 / (time.perf_counter() - t0) / 1e9
print("RESULT " + json.dumps(dict(times=times, losses=losses, tokens=tokens, matmul_gflops=peak)))
"""

TORCH = """
import json, sys, time, numpy as np, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32, attn_implementation="sdpa")
model.config.use_cache = False
# The embedded model's q/k rows are in the interleaved RoPE layout (its config says rope_traditional, which
# transformers ignores): regroup each head's rows as (even, odd) so that HF's half-split RoPE computes the
# same attention, and the losses of both tools can be compared.
with torch.no_grad():
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            w = proj.weight
            heads = w.shape[0] // model.config.head_dim
            w.copy_(w.view(heads, -1, 2, w.shape[1]).transpose(1, 2).reshape_as(w))
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                         task_type="CAUSAL_LM"))
if {compile!r}:
    for layer in model.base_model.model.model.layers:
        layer.compile()
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
z = np.load({batches!r})
n = len(z.files) // 3
times, losses, tokens = [], [], []
for i in range({warmup} + {steps}):
    k = i % n
    inputs, targets, mask = z[f"inputs{{k}}"], z[f"targets{{k}}"], z[f"mask{{k}}"]
    ids = torch.from_numpy(np.concatenate([inputs[:, :1], targets], axis=1).astype(np.int64))
    labels = ids.clone()
    labels[:, 0] = -100
    labels[:, 1:][torch.from_numpy(~mask)] = -100
    t0 = time.perf_counter()
    # the same inputs as ours; HF shifts the labels itself (the last target of each row drops out)
    loss = model(input_ids=ids[:, :-1].contiguous(), labels=labels[:, :-1].contiguous(), use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= {warmup}:
        times.append(time.perf_counter() - t0); losses.append(loss.item()); tokens.append(inputs.size)
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
a @ b
t0 = time.perf_counter()
for _ in range(10):
    a @ b
peak = 2 * 2048 ** 3 * 10 / (time.perf_counter() - t0) / 1e9
print("RESULT " + json.dumps(dict(times=times, losses=losses, tokens=tokens, matmul_gflops=peak,
                                  torch=torch.__version__, threads=torch.get_num_threads())))
"""


def parse(out: str) -> dict:
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def summary(r: dict, rss: int) -> dict:
    tps = sum(r["tokens"]) / sum(r["times"])
    return dict(tokens_per_s=round(tps, 1), step_s=round(statistics.median(r["times"]), 3),
                final_loss=round(statistics.mean(r["losses"][-3:]), 4), max_rss_gb=round(rss / 1e9, 2),
                matmul_gflops=round(r["matmul_gflops"], 1), **{k: r[k] for k in ("torch", "threads") if k in r})


def flops_per_token(model: Path) -> float:
    c = json.loads((model / "config.json").read_text())
    d, m, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
    n = L * (2 * d * d + 2 * d * kv + 3 * d * m) + d * c["vocab_size"]
    return 4 * n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", default=str(ROOT / "bench" / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", nargs="+", default=["ours", "torch", "torch-compile"])
    ap.add_argument("--out")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "smollm2-135m-f32"
        run_child(PREPARE.format(root=str(ROOT), out=str(model)))
        data = tmp / "train.jsonl"
        rows = [json.loads(x) for x in (ROOT / "data" / "tool_calls.jsonl").read_text().splitlines()]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("label", "desirable") == "desirable"))
        batches = tmp / "batches.npz"
        run_child(BATCHES.format(root=str(ROOT), model=str(model), data=str(data), batch=a.batch,
                                 count=a.warmup + a.steps, out=str(batches)))
        results: dict[str, list] = {name: [] for name in a.only}
        fmt = dict(root=str(ROOT), model=str(model), batches=str(batches), warmup=a.warmup, steps=a.steps)
        for r in range(a.rounds):
            for name in a.only:
                if name == "ours":
                    out, rss = run_child(OURS.format(**fmt))
                else:
                    out, rss = run_child(cmd=[a.peer_python, "-c", TORCH.format(compile=name == "torch-compile", **fmt)],
                                         env={"TOKENIZERS_PARALLELISM": "false"})
                results[name].append(summary(parse(out), rss))
                print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
        fpt = flops_per_token(model)
    best = {k: max(v, key=lambda s: s["tokens_per_s"]) for k, v in results.items()}
    peers = [k for k in best if k != "ours"]
    report = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores", python=platform.python_version(),
                  batch=a.batch, steps=a.steps, rounds=results, best=best, flops_per_token=fpt)
    if "ours" in best:
        ours = best["ours"]
        ours["useful_gflops"] = round(ours["tokens_per_s"] * fpt / 1e9, 1)
        ours["share_of_peak"] = round(ours["useful_gflops"] / ours["matmul_gflops"], 3)
        for k in peers:
            best[k]["useful_gflops"] = round(best[k]["tokens_per_s"] * fpt / 1e9, 1)
            # Each round runs every tool back to back, so a round's ratio shares that stretch's host speed,
            # which drifts between rounds here (bench/RESULTS.md); the median of those is the steadier figure.
            per_round = [o["tokens_per_s"] / p["tokens_per_s"] for o, p in zip(results["ours"], results[k])]
            report[f"ours_vs_{k}"] = dict(speed=round(ours["tokens_per_s"] / best[k]["tokens_per_s"], 3),
                                          rss=round(ours["max_rss_gb"] / best[k]["max_rss_gb"], 3),
                                          speed_by_round=[round(x, 3) for x in per_round],
                                          speed_median_of_rounds=round(statistics.median(per_round), 3))
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
