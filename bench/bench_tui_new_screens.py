#!/usr/bin/env python3
"""Key-to-paint latency on the Runs (F5) and Review (F6) screens, idle and while the same app trains.

  scripts/run python bench/bench_tui_new_screens.py [--presses 40] [--idle 12] [--threads N] [--runs 6]

As bench/bench_tui.py measures the older screens: `lora-tui` runs in tmux (120x40) on a copy of config.yaml
(the sample dataset, 1000 iterations) whose runs folder holds `--runs` finished runs of 1000 steps each
(hand-written as lora-tui writes them: config.yaml, metrics.jsonl with a Step event per step and an Eval
every 25, report.json) and a saved review session of 40 answered prompts (answers of 60-200 words) of the
base model against one of those runs, which the Review screen resumes. We send a key with tmux and poll
capture-pane (every 5 ms) until what the key changes is painted; the poll itself costs a few ms, so each
figure is an upper bound. Between keys we wait 0.25-0.45 s (seeded), as a person would.

Runs screen keys:
  move   Down/Up with nothing marked: the plot and the side panel switch to the run under the cursor
         (its legend entry "━━ NAME train" is the marker).
  mark   space on a second run while a first one is marked: its row's ● and its two series in the plot
         appear, or (unmarking) go.
  While a listed run trains (here: the app's own run, listed as running) the screen rescans the runs
  folder every 3 s and rebuilds the table: the keys pressed meanwhile are part of the figures.
Review screen keys:
  judge  1, 2, t, b on one prompt in turn (the prompt's title says "judged: ..."; each saves the session)
  n/p    next/previous prompt ("Prompt k/40" in the title)

Training uses --threads BLAS threads (default: 2 when the 1-minute load average is below 1, else 1: on a
2-core machine shared with other jobs the app would otherwise be starved by its own run). Target: p95 <= 100
ms for each screen while training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import protocol as ev  # noqa: E402
from engine.config.loading import save_config  # noqa: E402
from engine.config.schema import Config  # noqa: E402
from engine.review.session import BASE, ReviewSession  # noqa: E402

TMUX = shutil.which("tmux")
ITEMS = 40  # prompts in the review session
STEPS = 1000  # steps of each hand-written run
WORDS = ("the", "model", "answer", "tool", "call", "weather", "in", "Lisbon", "is", "sunny", "with", "a", "high",
         "of", "24", "degrees", "and", "light", "wind", "from", "north", "west", "tomorrow", "will", "be", "cloudy")


# ------------------------------------------------------------------------------------------------ the setup

def write_run(runs: Path, name: str, started: float, lr: float) -> None:
    """A finished run of STEPS steps, as lora-tui writes it (loss falling at a rate set by `lr`)."""
    folder = runs / name
    folder.mkdir(parents=True)
    cfg = Config()
    cfg.training.learning_rate, cfg.training.iterations, cfg.output.run_name = lr, STEPS, name
    save_config(cfg, folder / "config.yaml")
    rng = random.Random(name)
    train = [(s, 0.6 + 1.8 * math.exp(-s * lr * 20) + rng.gauss(0, 0.08)) for s in range(1, STEPS + 1)]
    vals = [(s, 0.65 + 1.7 * math.exp(-s * lr * 20)) for s in range(25, STEPS + 1, 25)]
    events = [ev.Started(str(folder), STEPS, 0, 1.0, 1072, 368, 1_474_560, 134_515_008, 8, "cpu", "mkl",
                         "float32", time=started).to_dict()]
    events += [{"event": "Step", "time": started + 5 * s, "step": s, "total_steps": STEPS, "loss": loss}
               for s, loss in train]
    events += [{"event": "Eval", "time": started + 5 * s + 1, "step": s, "val_loss": v} for s, v in vals]
    best = min(v for _, v in vals)
    done = started + 5 * STEPS + 2
    events.append(ev.Finished(STEPS, False, train[-1][1], best, str(folder / "adapter"),
                              str(folder / "report.json"), time=done).to_dict())
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (folder / "report.json").write_text(json.dumps({"status": "finished", "step": STEPS, "total_steps": STEPS,
                                                    "best_val_loss": best, "seconds": done - started,
                                                    "method": "sft"}))


def write_session(runs: Path, adapter: str) -> None:
    """A review session of ITEMS answered, unjudged prompts: the Review screen resumes it on its first visit."""
    session = ReviewSession.new(runs / "review", [BASE, adapter], {"max_tokens": 256, "temperature": 0.0,
                                                                   "top_p": 1.0},
                                "typed", str(runs / "review" / "labels.jsonl"), seed=7)
    rng = random.Random(11)
    for i in range(ITEMS):
        session.add_item([{"role": "user", "content": f"Question {i + 1}: what is the weather in Lisbon?"}])
        session.answers[i] = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 200))) for _ in range(2)]
    session.save()


def setup(tmp: Path, n_runs: int) -> Path:
    runs = tmp / "runs"
    cfg = (ROOT / "config.yaml").read_text().replace("  dir: runs\n", f"  dir: {runs}\n")
    cfg = cfg.replace("  iterations: 0\n", "  iterations: 1000\n")
    (tmp / "config.yaml").write_text(cfg)
    started = time.time() - 86400
    names = [f"sweep-{chr(ord('a') + i)}" for i in range(n_runs)]
    for i, name in enumerate(names):
        write_run(runs, name, started + 6000 * i, 10 ** (-4 + 2 * i / max(n_runs - 1, 1)))
    write_session(runs, str(runs / names[0] / "adapter"))
    return tmp / "config.yaml"


# ------------------------------------------------------------------------------------------------ the app

class Pane:
    def __init__(self, name: str, command: str):
        self.name = name
        subprocess.run([TMUX, "new-session", "-d", "-s", name, "-x", "120", "-y", "40"], check=True)
        time.sleep(0.5)  # a shell first: a program started by new-session itself may see 80x24
        subprocess.run([TMUX, "send-keys", "-t", name, "-l", command], check=True)
        subprocess.run([TMUX, "send-keys", "-t", name, "Enter"], check=True)
        self.pause = random.Random(3)

    def screen(self) -> str:
        return subprocess.run([TMUX, "capture-pane", "-p", "-t", self.name], capture_output=True, text=True).stdout

    def wait(self, painted, timeout: float, what: str) -> str:
        t0 = time.perf_counter()
        while True:
            screen = self.screen()
            if painted(screen):
                return screen
            if time.perf_counter() - t0 > timeout:
                raise SystemExit(f"{what}: never painted; the screen shows:\n{screen}")
            time.sleep(0.005)  # polling flat out would steal the CPU from the app being measured

    def send(self, key: str) -> None:
        subprocess.run([TMUX, "send-keys", "-t", self.name, key], check=True)

    def press(self, key: str, painted, what: str) -> float:
        """Key-to-paint in ms of `key`, painted when `painted(screen)` holds (it must not hold before)."""
        if painted(self.screen()):
            raise SystemExit(f"{what}: already on screen before {key} was pressed")
        t0 = time.perf_counter()
        self.send(key)
        self.wait(painted, 10, what)
        ms = (time.perf_counter() - t0) * 1000
        time.sleep(self.pause.uniform(0.25, 0.45))
        return ms

    def close(self) -> None:
        subprocess.run([TMUX, "kill-session", "-t", self.name])


def run_rows(screen: str) -> list[str]:
    """The run names in the Runs table, top to bottom."""
    lines = screen.splitlines()
    head = next(i for i, line in enumerate(lines) if re.match(r"\s+run\s+status\s+method", line))
    rows = []
    for line in lines[head + 1:]:
        m = re.match(r"\s*[●]?\s+(\S+)\s+(running|finished|stopped|failed|killed)\s", line)
        if not m:
            break
        rows.append(m.group(1))
    return rows


def legend(screen: str) -> set[str]:
    return set(re.findall(r"━━ (\S+) train", screen))


def marked(screen: str, name: str) -> bool:
    return re.search(rf"●\s+{re.escape(name)}\s", screen) is not None


class Runs:
    """The Runs screen's keys, nothing marked: the plot shows the run under the cursor."""

    def __init__(self, pane: Pane):
        self.pane = pane
        screen = pane.screen()
        self.rows = run_rows(screen)
        [shown] = legend(screen)
        self.cursor = self.rows.index(shown)

    def moves(self, n: int) -> list[float]:
        """Down to the last row, Up to the first, ... with nothing marked: the plot follows the cursor."""
        out, step = [], 1
        for _ in range(n):
            if not 0 <= self.cursor + step < len(self.rows):
                step = -step
            self.cursor += step
            name = self.rows[self.cursor]
            out.append(self.pane.press("Down" if step > 0 else "Up", lambda s: legend(s) == {name},
                                       f"the plot of {name}"))
        return out

    def marks(self, n: int) -> list[float]:
        """Mark the run under the cursor, move one row, then toggle that run n times (mark, unmark, ...):
        its ● and its series come and go beside the first one's. Leaves nothing marked."""
        first = self.rows[self.cursor]
        self.pane.press("space", lambda s: marked(s, first), f"{first} marked")
        step = 1 if self.cursor + 1 < len(self.rows) else -1
        self.cursor += step
        second = self.rows[self.cursor]
        self.pane.send("Down" if step > 0 else "Up")
        time.sleep(0.5)  # the cursor's move paints nothing capture-pane shows (a run is marked)
        out = []
        for i in range(n):
            on = i % 2 == 0
            out.append(self.pane.press(
                "space", lambda s: marked(s, second) == on and legend(s) == ({first, second} if on else {first}),
                f"{second} {'marked' if on else 'unmarked'}"))
        if n % 2:
            self.pane.press("space", lambda s: not marked(s, second), f"{second} unmarked")
        self.pane.send("Up" if step > 0 else "Down")
        self.cursor -= step
        time.sleep(0.5)
        self.pane.press("space", lambda s: not marked(s, first), f"{first} unmarked")
        return out


class Review:
    """The Review screen's keys on the resumed session: judge each prompt 1, 2, t, b, then n; now and then
    p and n again."""
    VERDICTS = (("1", "A (left) better"), ("2", "B (right) better"), ("t", "tie"), ("b", "both bad"))

    def __init__(self, pane: Pane, first: int):
        self.pane, self.item = pane, first  # the prompt shown, from 1

    def title(self, k: int):
        return lambda s: f"Prompt {k}/{ITEMS} ·" in s

    def keys(self, n: int) -> tuple[list[float], list[float]]:
        judge, move = [], []
        while len(judge) + len(move) < n:
            for key, said in self.VERDICTS:
                judge.append(self.pane.press(key, lambda s, said=said: f"judged: {said}" in s,
                                             f"prompt {self.item} judged {said}"))
            if self.item % 3 == 0 and self.item > 1:
                move.append(self.pane.press("p", self.title(self.item - 1), f"prompt {self.item - 1}"))
                move.append(self.pane.press("n", self.title(self.item), f"prompt {self.item}"))
            if self.item == ITEMS:
                raise SystemExit("the review session has no prompt left: ask for fewer presses")
            self.item += 1
            move.append(self.pane.press("n", self.title(self.item), f"prompt {self.item}"))
        return judge, move


# ------------------------------------------------------------------------------------------------ figures

def summary(label: str, ms: list[float]) -> str:
    ms = sorted(ms)
    p95 = ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)]
    return f"{label}: n={len(ms)} p50 {ms[len(ms) // 2]:.0f} ms, p95 {p95:.0f} ms, max {ms[-1]:.0f} ms"


def p95_of(ms: list[float]) -> float:
    ms = sorted(ms)
    return ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)]


def versions() -> str:
    import importlib.metadata as md
    names = ("textual", "rich", "mlx")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), Python "
            f"{platform.python_version()}, " + ", ".join(f"{n} {md.version(n)}" for n in names) +
            f", tmux {subprocess.run([TMUX, '-V'], capture_output=True, text=True).stdout.split()[-1]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presses", type=int, default=40, help="keys per kind while training")
    ap.add_argument("--idle", type=int, default=12, help="keys per kind before training starts")
    ap.add_argument("--threads", type=int, help="BLAS threads for training (default: by the load average)")
    ap.add_argument("--runs", type=int, default=6, help="hand-written finished runs in the runs folder")
    ap.add_argument("--verbose", action="store_true", help="print every key's latency, in order")
    args = ap.parse_args()
    if TMUX is None:
        raise SystemExit("tmux is not installed")
    load = os.getloadavg()
    threads = args.threads or (2 if load[0] < 1.0 else 1)
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {versions()}")
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; training with {threads} BLAS "
          f"thread(s); {args.runs} finished runs of {STEPS} steps + the live one; review of {ITEMS} prompts")
    tmp = Path(tempfile.mkdtemp(prefix="bench-new-screens-"))
    config = setup(tmp, args.runs)
    env = f"MKL_NUM_THREADS={threads} OMP_NUM_THREADS={threads} OPENBLAS_NUM_THREADS={threads}"
    pane = Pane(f"bench-new-{os.getpid()}", f"cd {ROOT} && env {env} {sys.executable} -m tui --config {config}")
    results: dict[str, dict[str, list[float]]] = {"idle": {}, "training": {}}
    try:
        pane.wait(lambda s: "Base model" in s, 30, "the first frame")
        time.sleep(2)  # a person reads the first screen before pressing anything
        review_item = 1
        for phase, n in (("idle", args.idle), ("training", args.presses)):
            if phase == "training":
                pane.send("F3")
                pane.wait(lambda s: "MLX peak" in s, 10, "the Train screen")
                pane.send("C-t")
                pane.wait(lambda s: "tokens/s" in s, 900, "the first step")  # training is under way
            pane.send("F5")
            want = args.runs + (phase == "training")
            pane.wait(lambda s: f"{want} runs in" in s and len(run_rows(s)) == want, 30, f"{want} runs listed")
            runs = Runs(pane)
            results[phase]["runs: move"] = runs.moves(n)
            results[phase]["runs: mark"] = runs.marks(n)
            pane.send("F6")
            pane.wait(lambda s: f"Prompt {review_item}/{ITEMS} ·" in s, 30, "the review session")
            review = Review(pane, review_item)
            results[phase]["review: judge"], results[phase]["review: n/p"] = review.keys(2 * n)
            review_item = review.item
        pane.send("F3")
        screen = pane.wait(lambda s: "MLX peak" in s, 10, "the Train screen")
        progress = next((line.strip() for line in screen.splitlines() if "step" in line and "/" in line), "")
    finally:
        pane.close()
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; training at: {progress}")
    for phase, kinds in results.items():
        print(f"{phase}:")
        for label, ms in kinds.items():
            print("  " + summary(label, ms))
            if args.verbose:
                print("    in order: " + " ".join(f"{v:.0f}" for v in ms))
        for screen in ("runs", "review"):
            ms = [v for label, vals in kinds.items() if label.startswith(screen) for v in vals]
            verdict = "" if phase == "idle" else f"; target p95 <= 100 ms: {'PASS' if p95_of(ms) <= 100 else 'FAIL'}"
            print("  " + summary(f"{screen} screen, all keys", ms) + verdict)


if __name__ == "__main__":
    main()
