"""One blind A/B review: two sources (the base model, an adapter or a checkpoint) answer the same prompts,
each pair shown in a seeded random left/right order, judged, and the tally kept.

A session is one JSON file, `<output.dir>/review/session-<id>.json`, rewritten atomically (engine.atomic:
temp file, fsync, rename) after every answer, typed prompt, judgement and label, so a quit or a crash
loses nothing that was on screen. The order is drawn per prompt from the session's seed and the prompt's
index, and recorded, so a resumed session shows every pair as it was shown before.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine import atomic
from engine.review.stats import wilson_interval, win_rate

BASE = "base"  # the source that is the base model (any other source is an adapter or checkpoint folder)
VERDICTS = ("left", "right", "tie", "both-bad")
LABELS = ("desirable", "undesirable")
VERSION = 1
SAVED = ("version", "id", "sources", "seed", "settings", "prompt_source", "labels_path", "created", "items",
         "answers", "sides", "judgements", "labels")


class SessionError(ValueError):
    """A session file that cannot be read back."""


@dataclass
class Tally:
    """One source's record against the other. Both-bad judgements are neither wins nor losses."""
    source: str
    wins: int = 0
    losses: int = 0
    ties: int = 0
    both_bad: int = 0

    def win_rate(self) -> float | None:
        """Wins over decided comparisons (ties and both-bad left out)."""
        return win_rate(self.wins, self.losses)

    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.wins, self.wins + self.losses)

    def win_rate_with_ties(self) -> float | None:
        """The second figure: a tie counts as half a win and half a loss."""
        return win_rate(self.wins + self.ties / 2, self.losses + self.ties / 2)

    def interval_with_ties(self) -> tuple[float, float]:
        return wilson_interval(self.wins + self.ties / 2, self.wins + self.losses + self.ties)

    def describe(self, name: str) -> str:
        """One line: the counts, the win rate with its 95% interval, and (with ties) the rate that counts
        each tie as half a win: "base: 3W 1L 1T 0 both bad · win 75% [30%–95%] · ties ½: 70%"."""
        line = f"{name}: {self.wins}W {self.losses}L {self.ties}T {self.both_bad} both bad"
        if (rate := self.win_rate()) is not None:
            lo, hi = self.interval()
            line += f" · win {rate:.0%} [{lo:.0%}–{hi:.0%}]"
        if self.ties and (with_ties := self.win_rate_with_ties()) is not None:
            line += f" · ties ½: {with_ties:.0%}"
        return line


@dataclass
class ReviewSession:
    id: str
    sources: list[str]  # two: BASE or an adapter/checkpoint folder; index 0 is the first picked
    seed: int
    settings: dict  # how both answer: {"max_tokens", "temperature", "top_p"}
    prompt_source: str  # "typed", or the file the prompts were read from
    labels_path: str  # where `d`/`u` append labelled conversations
    created: float = field(default_factory=time.time)
    items: list[dict] = field(default_factory=list)  # {"messages": prompt turns, "origin": "line 4" | "typed"}
    answers: list[list[str | None]] = field(default_factory=list)  # per item, per source (None: not yet)
    sides: list[int] = field(default_factory=list)  # per item: which source is shown on the left
    judgements: list[dict | None] = field(default_factory=list)  # per item: {"verdict", "at"}
    labels: list[list[dict]] = field(default_factory=list)  # per item: {"source", "side", "label", "path", "at"}
    path: Path | None = field(default=None, compare=False)  # where it is saved

    @classmethod
    def new(cls, folder: str | Path, sources: list[str], settings: dict, prompt_source: str,
            labels_path: str, seed: int | None = None) -> ReviewSession:
        if len(sources) != 2 or sources[0] == sources[1]:
            raise SessionError("a review compares two different sources")
        folder = Path(folder)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        sid, n = stamp, 1
        while (folder / f"session-{sid}.json").exists():  # two sessions started within a second
            n += 1
            sid = f"{stamp}-{n}"
        seed = random.SystemRandom().randrange(2 ** 31) if seed is None else seed
        return cls(sid, list(sources), seed, dict(settings), prompt_source, labels_path,
                   path=folder / f"session-{sid}.json")

    # ------------------------------------------------------------------ prompts, answers, sides
    def add_item(self, messages: list[dict], origin: str = "typed") -> int:
        index = len(self.items)
        self.items.append({"messages": [dict(m) for m in messages], "origin": origin})
        self.answers.append([None, None])
        # Seeded by session and index, not by a running generator: the same whatever order items come in.
        self.sides.append(random.Random(f"{self.seed}:{index}").randrange(2))
        self.judgements.append(None)
        self.labels.append([])
        return index

    def source_on(self, index: int, side: str) -> int:
        """The source (0 or 1) shown on `side` ("left" or "right") for item `index`."""
        left = self.sides[index]
        return left if side == "left" else 1 - left

    def answer_on(self, index: int, side: str) -> str | None:
        return self.answers[index][self.source_on(index, side)]

    def answered(self, index: int) -> bool:
        return all(a is not None for a in self.answers[index])

    # ------------------------------------------------------------------ judgements and labels
    def judge(self, index: int, verdict: str) -> None:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
        self.judgements[index] = {"verdict": verdict, "at": time.time()}

    def verdict(self, index: int) -> str | None:
        judged = self.judgements[index]
        return judged["verdict"] if judged else None

    def add_label(self, index: int, source: int, side: str, label: str, path: str) -> None:
        self.labels[index].append({"source": source, "side": side, "label": label, "path": path,
                                   "at": time.time()})

    def label_of(self, index: int, source: int) -> str | None:
        return next((x["label"] for x in self.labels[index] if x["source"] == source), None)

    def next_unjudged(self, start: int = 0) -> int | None:
        """The first unjudged item from `start` on, then from the beginning; None when all are judged."""
        n = len(self.items)
        return next(((start + k) % n for k in range(n) if self.judgements[(start + k) % n] is None), None)

    @property
    def judged(self) -> int:
        return sum(j is not None for j in self.judgements)

    @property
    def finished(self) -> bool:
        return bool(self.items) and self.judged == len(self.items)

    def tally(self) -> list[Tally]:
        """Each source's wins, losses, ties and both-bad, in the order of `sources`."""
        tallies = [Tally(s) for s in self.sources]
        for index, judged in enumerate(self.judgements):
            verdict = judged and judged["verdict"]
            if verdict in ("left", "right"):
                winner = self.source_on(index, verdict)
                tallies[winner].wins += 1
                tallies[1 - winner].losses += 1
            elif verdict == "tie":
                for t in tallies:
                    t.ties += 1
            elif verdict == "both-bad":
                for t in tallies:
                    t.both_bad += 1
        return tallies

    # ------------------------------------------------------------------ the file
    def to_dict(self) -> dict:
        """What the file holds; the tally too, for a reader of the file (load recomputes it)."""
        tally = [{"source": t.source, "wins": t.wins, "losses": t.losses, "ties": t.ties, "both_bad": t.both_bad,
                  "win_rate": t.win_rate(), "interval95": list(t.interval()),
                  "win_rate_ties_half": t.win_rate_with_ties()} for t in self.tally()]
        return {"version": VERSION} | {k: getattr(self, k) for k in SAVED if k != "version"} | {"tally": tally}

    def save(self, path: str | Path | None = None) -> Path:
        self.path = Path(path) if path is not None else self.path
        if self.path is None:
            raise SessionError("the session has no file yet")
        atomic.write_text(self.path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False))
        atomic.fsync_dir(self.path.parent)  # the rename itself survives a power cut
        return self.path

    @classmethod
    def from_dict(cls, data: dict, path: Path | None = None) -> ReviewSession:
        try:
            session = cls(**{k: data[k] for k in SAVED if k != "version"}, path=path)
        except (KeyError, TypeError) as exc:
            raise SessionError(f"{path}: not a review session ({exc})") from None
        n = len(session.items)
        if len(session.sources) != 2 or any(len(getattr(session, k)) != n for k in
                                            ("answers", "sides", "judgements", "labels")):
            raise SessionError(f"{path}: a review session whose lists disagree in length")
        return session

    @classmethod
    def load(cls, path: str | Path) -> ReviewSession:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise SessionError(f"{path}: unreadable ({exc})") from None
        if not isinstance(data, dict):
            raise SessionError(f"{path}: not a review session")
        return cls.from_dict(data, path)


def session_files(folder: str | Path) -> list[Path]:
    """Saved sessions, the last written first (each is rewritten at every step, so this is the last used)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []

    def written(path: Path) -> tuple[int, str]:
        try:
            return path.stat().st_mtime_ns, path.name
        except OSError:  # removed meanwhile
            return 0, path.name
    return sorted(folder.glob("session-*.json"), key=written, reverse=True)


def latest_unfinished(folder: str | Path) -> ReviewSession | None:
    """The newest session not judged to the end (an unreadable file is passed over)."""
    for path in session_files(folder):
        try:
            session = ReviewSession.load(path)
        except SessionError:
            continue
        if not session.finished:
            return session
    return None
