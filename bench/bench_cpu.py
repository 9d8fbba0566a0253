#!/usr/bin/env python3
"""lora-tui against mlx-lm on this machine's CPU, in one run:

1. LoRA training: our engine (`lora-tui train`) against `mlx_lm.lora` on the same float32 model (the
   embedded SmolLM2-135M, dequantized), the same conversations, LoRA, batch, optimizer and number of
   steps, both with the optimized BLAS: tokens/s, peak memory (MLX's peak and the process's max RSS),
   final training loss.
2. The optimized BLAS against stock mlx-cpu on the same training step (our engine, LORA_TUI_BLAS=off).
3. Chat: time to first token and decode tokens/s of our generation path against `mlx_lm.generate`'s
   `stream_generate` on the same prompt and weights.

  scripts/run python bench/bench_cpu.py [--steps 12] [--batch 4] [--out bench/cpu.json]

Every tool runs in its own process (so that each picks its BLAS before MLX loads and has its own peak
memory); runs alternate between the tools so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

PREPARE = """
import json, sys
sys.path.insert(0, {root!r})
import engine
from engine.model.embedded import import_embedded
from mlx_lm.utils import dequantize_model, load, save
import mlx.core as mx
from mlx.utils import tree_map
src = import_embedded()
model, tokenizer, config = load(str(src), return_config=True)
model = dequantize_model(model)
model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
config.pop("quantization", None); config.pop("quantization_config", None)
save({out!r}, str(src), model, tokenizer, config)
"""

MLX_LM_TRAIN = """
import json, sys, time, types
sys.path.insert(0, {root!r})
import engine  # preloads the same BLAS our engine uses (before mlx is imported)
import mlx_lm.lora as lora
from mlx_lm.tuner.callbacks import TrainingCallback

import mlx_lm.tuner.trainer as trainer
# mlx-lm's "tokens/sec" counts only the tokens the loss sees (the answer, with mask_prompt); count every
# token of every training batch instead, as our engine does, from the batches themselves.
batch_tokens = []
iterate = trainer.iterate_batches
def counting_batches(*a, loop=False, **k):
    for batch, lengths in iterate(*a, loop=loop, **k):
        if loop:  # the training stream (validation reads its own, unlooped)
            batch_tokens.append(int(lengths[:, 1].sum().item()))
        yield batch, lengths
lora.train = lambda *a, **k: trainer.train(*a, iterate_batches=counting_batches, **k)

class Report(TrainingCallback):
    def on_train_loss_report(self, info):
        info["tokens_per_second"] = info["iterations_per_second"] * batch_tokens[info["iteration"] - 1]
        print("STEP " + json.dumps(info), flush=True)

lora.get_reporting_callbacks = lambda *a, **k: Report()
args = dict(lora.CONFIG_DEFAULTS)
args.update({args!r})
lora.run(types.SimpleNamespace(**args))
"""

GENERATE = """
import json, sys, time
sys.path.insert(0, {root!r})
import engine
import mlx.core as mx
tool, model_dir, prompt, max_tokens, repeats = {tool!r}, {model!r}, {prompt!r}, {max_tokens}, {repeats}
follow_ups = {follow_ups!r}
messages = [{{"role": "user", "content": prompt}}]
if tool == "mlx-lm":
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler
    model, tokenizer = load(model_dir)
    def stream(messages=messages):  # what `mlx_lm.generate` does for each prompt: render and prefill all of it
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        for r in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)):
            yield r.text
else:
    from engine.config.schema import Config
    from engine.generate.decoding import PromptCache, load_for_chat
    from engine.generate.reply import GenerationSettings, stream_reply
    cfg = Config()
    cfg.model.name = model_dir
    model, tokenizer, _ = load_for_chat(cfg)  # what the TUI's chat and `lora-tui chat` load
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0)
    conversation_cache = PromptCache()  # the TUI keeps one per chat model
    def stream(messages=messages, cache=None):
        for c in stream_reply(model, tokenizer, messages, settings, prompt_cache=cache):
            yield c.text
for i in range(repeats + 1):  # the first answer warms up (and is not counted)
    t0 = time.perf_counter(); first = None; n = 0; text = ""
    for piece in stream():
        n += 1; text += piece
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    if i:
        print("GEN " + json.dumps({{"ttft": first - t0, "decode_tps": (n - 1) / (end - first), "tokens": n,
                                   "text": text[:80]}}), flush=True)
# A conversation: each turn adds the reply and a new question; time to first token per turn.
history = [{{"role": "system", "content": "You are a helpful assistant. Answer in two or three sentences."}}]
for turn, question in enumerate(follow_ups):
    history.append({{"role": "user", "content": question}})
    kwargs = {{"cache": conversation_cache}} if tool != "mlx-lm" else {{}}
    t0 = time.perf_counter(); first = None; text = ""
    for piece in stream(history, **kwargs):
        text += piece
        if first is None:
            first = time.perf_counter()
    history.append({{"role": "assistant", "content": text.strip()}})
    print("TURN " + json.dumps({{"turn": turn + 1, "ttft": first - t0, "prompt_tokens": len(
        tokenizer.apply_chat_template(history[:-1], add_generation_prompt=True)), "text": text[:60]}}), flush=True)
"""


def run_child(code: str = "", env: dict | None = None, cmd: list[str] | None = None) -> tuple[str, int]:
    """Run Python code (or a command) in a child; return its stdout and max RSS in bytes."""
    cmd = cmd or [sys.executable, "-c", code]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return stdout, usage.ru_maxrss * 1024


def prepare(tmp: Path) -> tuple[Path, Path]:
    model = tmp / "smollm2-135m-f32"
    run_child(PREPARE.format(root=str(ROOT), out=str(model)))
    # The sample dataset's desirable rows, as plain `messages` conversations (what mlx-lm reads).
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "tool": "tool"}
    rows = []
    for line in (ROOT / "data" / "tool_calls.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("label", "desirable") != "desirable":
            continue
        rows.append({"messages": [{"role": roles[t.get("from", t.get("role"))],
                                   "content": t.get("value", t.get("content"))} for t in rec["conversations"]]})
    data = tmp / "data"
    data.mkdir()
    cut = len(rows) * 9 // 10
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:cut]))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[cut:]))
    return model, data


def our_config(tmp: Path, model: Path, data: Path, steps: int, batch: int, seq: int, name: str,
               mask_prompt: bool = True) -> Path:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["model"].update(name=str(model), max_seq_length=seq)
    cfg["lora"].update(rank=16, alpha=32.0, dropout=0.0, target_modules=["q_proj", "v_proj"], num_layers=-1)
    cfg["training"].update(iterations=steps, batch_size=batch, grad_accumulation=1, learning_rate=1e-4,
                           lr_schedule="constant", warmup_steps=0, weight_decay=0.01, max_grad_norm=0.0,
                           grad_checkpoint=False, seed=0)
    cfg["data"].update(path=str(data / "train.jsonl"), validation_split=0.0, train_labels=[],
                       mask_prompt=mask_prompt)
    cfg["evaluation"].update(every_steps=0, heldout_path="", sample_prompts=[])
    cfg["checkpoints"].update(every_steps=0)
    cfg["output"].update(dir=str(tmp / "runs"), run_name=name, log_every_steps=1)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


STEP_LINE = re.compile(r"^step (\d+)/\d+: loss ([\d.]+), .* ([\d.]+) tok/s, peak ([\d.]+) ([GM]B)", re.M)


def train_ours(config: Path, env: dict | None = None) -> dict:
    lora_tui = str(Path(sys.executable).parent / "lora-tui")  # the installed command a user runs
    out, rss = run_child(env=env, cmd=[lora_tui, "--config", str(config), "train"])
    steps = [(int(s), float(loss), float(tps), float(peak) * (1 if unit == "GB" else 1e-3))
             for s, loss, tps, peak, unit in STEP_LINE.findall(out)]
    if not steps:
        raise SystemExit(f"no step lines in our output:\n{out[-2000:]}")
    return summarize([s[2] for s in steps], [s[1] for s in steps], max(s[3] for s in steps), rss)


def train_mlx_lm(model: Path, data: Path, tmp: Path, steps: int, batch: int, seq: int) -> dict:
    args = {"model": str(model), "train": True, "data": str(data), "fine_tune_type": "lora",
            "optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.01}},
            "mask_prompt": True, "num_layers": -1, "batch_size": batch, "iters": steps,
            "val_batches": 1, "learning_rate": 1e-4, "steps_per_report": 1, "steps_per_eval": 10 ** 6,
            "adapter_path": str(tmp / "mlx-lm-adapter"), "save_every": 10 ** 6, "max_seq_length": seq,
            "grad_checkpoint": False, "seed": 0,
            "lora_parameters": {"rank": 16, "dropout": 0.0, "scale": 2.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}}
    out, rss = run_child(MLX_LM_TRAIN.format(root=str(ROOT), args=args))
    infos = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("STEP ")]
    return summarize([i["tokens_per_second"] for i in infos], [i["train_loss"] for i in infos],
                     max(i["peak_memory"] for i in infos), rss)


def summarize(tps: list[float], losses: list[float], peak_gb: float, rss: int) -> dict:
    steady = tps[2:] or tps  # the first steps build kernels and caches
    return {"tokens_per_sec": round(statistics.median(steady), 1), "steps": len(tps),
            "final_loss": round(statistics.mean(losses[-3:]), 4), "first_loss": round(losses[0], 4),
            "mlx_peak_gb": round(peak_gb, 3), "max_rss_gb": round(rss / 1e9, 3)}


def generate(tool: str, model: Path, repeats: int, max_tokens: int) -> dict:
    prompt = "Explain in three sentences why the sky is blue."
    follow_ups = ["What is Rayleigh scattering?", "Why are sunsets red then?", "Does the same happen on Mars?",
                  "What colour is the sky on Mars at noon?", "Summarise our conversation in one sentence."]
    out, _ = run_child(GENERATE.format(root=str(ROOT), tool=tool, model=str(model), prompt=prompt,
                                       max_tokens=max_tokens, repeats=repeats, follow_ups=follow_ups))
    runs = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("GEN ")]
    turns = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("TURN ")]
    return {"ttft_ms": round(1000 * statistics.median(r["ttft"] for r in runs), 1),
            "decode_tps": round(statistics.median(r["decode_tps"] for r in runs), 1),
            "tokens": runs[0]["tokens"], "text": runs[0]["text"],
            "conversation_ttft_ms": [round(1000 * t["ttft"], 1) for t in turns],
            "conversation_prompt_tokens": [t["prompt_tokens"] for t in turns],
            "conversation_texts": [t["text"] for t in turns]}


def versions() -> dict:
    from importlib.metadata import version
    return {p: version(p) for p in ("mlx", "mlx-lm", "transformers", "textual")} | {"python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2, help="alternating training runs per tool")
    ap.add_argument("--blas-seq", type=int, default=256, help="tokens per step in the BLAS comparison")
    ap.add_argument("--only", choices=["train", "blas", "chat"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "cpu.json"))
    args = ap.parse_args()
    parts = {args.only} if args.only else {"train", "blas", "chat"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    t0 = time.time()
    model, data = prepare(tmp)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "versions": versions()}

    if "train" in parts:
        print(f"training: {args.steps} steps, batch {args.batch}, max {args.seq} tokens, LoRA r16 on q/v of "
              "all 30 blocks, AdamW 1e-4 constant, float32, same BLAS (engine.blas) for both")
        ours, theirs = [], []
        for r in range(args.rounds):
            ours.append(train_ours(our_config(tmp, model, data, args.steps, args.batch, args.seq, f"ours-{r}")))
            theirs.append(train_mlx_lm(model, data, tmp, args.steps, args.batch, args.seq))
            print(f"  round {r + 1}: lora-tui {ours[-1]}\n           mlx-lm   {theirs[-1]}", flush=True)
        best = lambda runs: max(runs, key=lambda x: x["tokens_per_sec"])  # noqa: E731  least disturbed run
        o, m = best(ours), best(theirs)
        result["train"] = {"lora_tui": ours, "mlx_lm": theirs,
                           "speed_ratio": round(o["tokens_per_sec"] / m["tokens_per_sec"], 2),
                           "mlx_peak_ratio": round(o["mlx_peak_gb"] / m["mlx_peak_gb"], 2),
                           "rss_ratio": round(o["max_rss_gb"] / m["max_rss_gb"], 2)}
        t = result["train"]
        print(f"training tokens/s: lora-tui {o['tokens_per_sec']} vs mlx-lm {m['tokens_per_sec']} = "
              f"{t['speed_ratio']}x (target >= 1.0: {'PASS' if t['speed_ratio'] >= 1.0 else 'FAIL'}); "
              f"MLX peak {o['mlx_peak_gb']} vs {m['mlx_peak_gb']} GB = {t['mlx_peak_ratio']}x, max RSS "
              f"{o['max_rss_gb']} vs {m['max_rss_gb']} GB = {t['rss_ratio']}x (target <= 1.0: "
              f"{'PASS' if t['mlx_peak_ratio'] <= 1.0 and t['rss_ratio'] <= 1.0 else 'FAIL'}); final loss "
              f"{o['final_loss']} vs {m['final_loss']}", flush=True)

    if "blas" in parts:
        # Every token trained (no prompt mask): cut to --blas-seq tokens, every conversation still has some.
        fast = train_ours(our_config(tmp, model, data, 4, 1, args.blas_seq, "blas", mask_prompt=False))
        stock = train_ours(our_config(tmp, model, data, 4, 1, args.blas_seq, "blas-stock", mask_prompt=False),
                           {"LORA_TUI_BLAS": "off"})
        ratio = fast["tokens_per_sec"] / stock["tokens_per_sec"]
        result["blas"] = {"tokens_per_step": args.blas_seq, "fast": fast, "stock": stock, "ratio": round(ratio, 1)}
        print(f"training step, 1 x {args.blas_seq} tokens: optimized BLAS {fast['tokens_per_sec']} tok/s vs "
              f"stock mlx-cpu {stock['tokens_per_sec']} tok/s = {ratio:.1f}x (target >= 20: "
              f"{'PASS' if ratio >= 20 else 'FAIL'})", flush=True)

    if "chat" in parts:
        ours = generate("lora-tui", model, 3, 128)
        theirs = generate("mlx-lm", model, 3, 128)
        result["chat"] = {"lora_tui": ours, "mlx_lm": theirs,
                          "ttft_ratio": round(theirs["ttft_ms"] / ours["ttft_ms"], 2),
                          "decode_ratio": round(ours["decode_tps"] / theirs["decode_tps"], 2)}
        c = result["chat"]
        c["last_turn_ttft_ratio"] = round(theirs["conversation_ttft_ms"][-1] / ours["conversation_ttft_ms"][-1], 2)
        c["same_replies"] = ours["conversation_texts"] == theirs["conversation_texts"]
        print(f"chat, {len(ours['conversation_ttft_ms'])}-turn conversation: time to first token per turn "
              f"lora-tui {ours['conversation_ttft_ms']} ms vs mlx-lm {theirs['conversation_ttft_ms']} ms "
              f"(prompt tokens {ours['conversation_prompt_tokens']}); last turn {c['last_turn_ttft_ratio']}x as "
              f"fast; same replies: {c['same_replies']}", flush=True)
        print(f"chat: time to first token {ours['ttft_ms']} ms vs mlx-lm {theirs['ttft_ms']} ms "
              f"({c['ttft_ratio']}x as fast); decode {ours['decode_tps']} vs {theirs['decode_tps']} tok/s "
              f"= {c['decode_ratio']}x (target >= 1.0: "
              f"{'PASS' if min(c['ttft_ratio'], c['decode_ratio']) >= 1.0 else 'FAIL'})", flush=True)

    result["seconds"] = round(time.time() - t0)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
