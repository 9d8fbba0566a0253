"""Several datasets mixed by weight (data.path as a list of {path, weight}): each is validated and split on
its own (its own error threshold, its own validation rows), then the training rows are drawn so that each
source makes up its weight's share of the mix. The mix keeps the sources' total size: a source whose share
is larger than its rows repeats them (whole copies, then a seeded sample); a smaller share uses a seeded
sample of its rows, as LLaMA-Factory's interleaving does with probabilities."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from engine.config.validation import coerce_sources
from engine.data.sources.state import DatasetError
from engine.data.validate import DatasetReport, Example


@dataclass(frozen=True)
class SourceSpec:
    path: str
    weight: float = 1.0


def source_specs(value) -> list[SourceSpec]:
    """data.path (a string, a list of {path, weight} or the form's "a.jsonl*0.7, b.csv*0.3") as sources."""
    parsed, err = coerce_sources(value)
    if err:
        raise DatasetError(f"data.path: {err}")
    if isinstance(parsed, str):
        return [SourceSpec(parsed)]
    return [SourceSpec(item["path"], item["weight"]) for item in parsed]


def planned_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Rows each source contributes: its weight's share of all sources' rows together."""
    total, wsum = sum(sizes), sum(weights)
    return [round(total * w / wsum) for w in weights]


def plan_lines(reports: list[DatasetReport], weights: list[float]) -> list[str]:
    """What the mix will be, one line per source, from the rows each would train on."""
    sizes = [r.trainable for r in reports]
    wsum = sum(weights)
    lines = []
    for r, w, n, size in zip(reports, weights, planned_counts(sizes, weights), sizes):
        use = (f"its rows used {n / size:.2f}x on average" + (" (repeated)" if n > size else " (a sample)")
               if size else "no rows")
        lines.append(f"{r.path} [{r.shape}]: weight {w:g} = {w / wsum:.0%} of the training mix ({use})")
    return lines


def mix(groups: list[list[Example]], weights: list[float], seed: int) -> list[Example]:
    """Training rows drawn from each source by weight, seeded (the run shuffles them again per epoch)."""
    rng = random.Random(seed)
    out: list[Example] = []
    for group, n in zip(groups, planned_counts([len(g) for g in groups], weights)):
        if not group:
            continue
        copies, rest = divmod(n, len(group))
        out += group * copies + rng.sample(group, rest)
    return out


def merge_reports(parts: list[DatasetReport], weights: list[float]) -> DatasetReport:
    """One report for the dataset screen and `validate`: counts summed, issues tagged with their file, and the
    mix's plan first among the warnings. It fails when any source fails."""
    merged = DatasetReport(" + ".join(p.path for p in parts), shape="mix", unit=parts[0].unit,
                           columns=parts[0].columns, max_seq_length=parts[0].max_seq_length,
                           error_threshold=parts[0].error_threshold, parts=list(parts))
    for p in parts:
        for name in ("rows", "blank_lines", "valid", "error_lines", "issue_count", "pairs", "trainable",
                     "trained_tokens", "truncated", "seconds"):
            setattr(merged, name, getattr(merged, name) + getattr(p, name))
        for name in ("formats", "labels", "set_aside", "template_notes"):
            getattr(merged, name).update(getattr(p, name))
        merged.lengths += p.lengths
        merged.issues += [replace(i, source=p.path) for i in p.issues]
        merged.warnings += [f"{p.path}: {w}" for w in p.warnings]
        merged.stopped |= p.stopped
    merged.mix = plan_lines(parts, weights)
    return merged
