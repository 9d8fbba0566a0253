"""The sample files `lora-tui init` writes: the default config.yaml and the sample task's data.

In the repository they live at its root (`config.yaml`, `data/`); an installed wheel carries copies in
`engine/_samples/` (pyproject.toml's `force-include`), as a wheel holds only its packages. `sample_path`
looks in the package first, then in the clone around it.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
DATA = ("data/tool_calls.jsonl", "data/heldout.jsonl", "data/heldout_answers.jsonl")
SAMPLES = (CONFIG, *DATA)

PACKAGED = Path(__file__).resolve().parent / "_samples"  # filled by the wheel build
REPOSITORY = Path(__file__).resolve().parent.parent  # a clone: engine/ sits at its root


def sample_path(name: str) -> Path:
    """Where sample `name` ("config.yaml", "data/tool_calls.jsonl", ...) is: inside the installed package,
    else in the repository around it. FileNotFoundError for a name that is not a sample, or a sample that
    neither place holds (a broken install)."""
    if name not in SAMPLES:
        raise FileNotFoundError(f"{name}: not a sample (one of {', '.join(SAMPLES)})")
    for root in (PACKAGED, REPOSITORY):
        path = root / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name}: sample missing from {PACKAGED} and {REPOSITORY} (reinstall lora-tui)")


def is_sample_data_path(raw: str | Path) -> bool:
    """`raw` names one of the sample data files as the defaults do (`data/tool_calls.jsonl`, relative): a
    missing one means a folder without the samples, which `lora-tui init` writes."""
    p = Path(raw)
    return not p.is_absolute() and p.as_posix().removeprefix("./") in DATA
