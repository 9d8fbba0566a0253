"""Where rows come from: one function that recognises a container by its name and first bytes and returns
its rows, numbered as a person finds them again (lines in text files, indices in tables).

  JSONL / NDJSON     one JSON object per line                       text.jsonl_rows
  JSON               one array of objects                           text.json_array_rows
  CSV / TSV          a header row, then one record per row          text.csv_rows
  Parquet, Arrow     files written by pandas, pyarrow, `datasets`   tables.parquet_rows / arrow_rows
  `datasets` folder  `save_to_disk` output (`PATH` or `PATH:split`) tables.datasets_folder_rows
  folder of files, hub id (`owner/name[:split]`), via load_dataset   tables.load_dataset_rows
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from engine.data.sources import tables, text
from engine.data.sources.state import DatasetError, ReadState
from engine.samples import is_sample_data_path

ACCEPTED = ("JSONL, a JSON array, CSV/TSV, Parquet, Arrow, a `datasets` folder (save_to_disk), a folder of "
            "such files, or a Hugging Face hub id (owner/name)")
SUFFIXES = {".jsonl": "JSONL", ".ndjson": "JSONL", ".json": "JSON", ".csv": "CSV", ".tsv": "TSV",
            ".parquet": "Parquet", ".pq": "Parquet", ".arrow": "Arrow", ".feather": "Arrow", ".ipc": "Arrow"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# First bytes of containers people try that we do not read: named in the error, with what to do.
FOREIGN = {b"PK\x03\x04": "a zip archive (an Excel workbook?): export it as CSV or Parquet",
           b"\x1f\x8b": "gzip-compressed: decompress it first (gunzip)",
           b"SQLite format 3": "an SQLite database: export the table as CSV or Parquet",
           b"\x89HDF": "an HDF5 file: export it as Parquet"}


@dataclass
class RowSource:
    path: str  # as the user named it
    shape: str  # the container, as the dataset screen shows it: "JSONL", "Parquet", ...
    unit: str  # what issues are numbered by: "line" (text files) or "row" (tables, from 0)
    read: Callable[[ReadState], Iterator[tuple[int, object, tuple[str, str] | None]]]
    state: ReadState = field(default_factory=ReadState)
    file: Path | None = None  # a local file: its size and mtime tell whether it changed while read
    arrow: bool = False  # rows come from Arrow: a struct fills the keys a row lacks with null
    cells: bool = False  # fields may hold JSON text (CSV has nothing else; tables often store it so)

    def rows(self) -> Iterator[tuple[int, object, tuple[str, str] | None]]:
        # Progress in bytes for a file; a table's reader replaces it with its row count.
        self.state = ReadState(total=self.file.stat().st_size if self.file else 0)
        return self.read(self.state)

    def fingerprint(self) -> tuple[int, int] | None:
        try:
            st = self.file.stat() if self.file else None
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns) if st else None


def open_source(raw: str | Path) -> RowSource:
    """The rows behind a data.path entry, or DatasetError saying what was found and what we read."""
    name = str(raw)
    p, split = _split_suffix(Path(name).expanduser())
    try:
        exists = p.exists()
        if not exists and p.is_symlink():
            raise DatasetError(f"{p}: a symbolic link that leads nowhere (broken, or a loop)")
        if exists and p.is_dir():
            return _folder(name, p, split)
        if exists and not p.is_file():
            raise DatasetError(f"{p}: not a regular file")
    except OSError as exc:  # a symlink loop, a permission problem
        raise DatasetError(f"{p}: {exc.strerror or exc}") from None
    if not exists:
        if HUB_ID.match(name.split(":")[0]) and p.suffix.lower() not in SUFFIXES:
            return RowSource(name, "hub dataset", "row", partial(tables.load_dataset_rows, name.split(":")[0],
                                                                   split), arrow=True, cells=True)
        if is_sample_data_path(name):  # the defaults' sample data, in a folder without it
            raise DatasetError(f"{p}: no such file: run `lora-tui init` to write the sample data here")
        raise DatasetError(f"{p}: no such file")
    _refuse_foreign(p)  # a gzip file named .jsonl is still gzip
    kind = SUFFIXES.get(p.suffix.lower()) or _sniff(p)
    if kind == "JSON":
        kind = "JSON array" if _first_char(p) == "[" else "JSONL"
    if kind == "JSONL":
        return RowSource(name, kind, "line", partial(text.jsonl_rows, p), file=p)
    if kind in ("CSV", "TSV"):
        return RowSource(name, kind, "line", partial(text.csv_rows, p, delimiter="," if kind == "CSV" else "\t"), file=p,
                         cells=True)
    if kind == "JSON array":  # numbered by index: several elements may share a line
        return RowSource(name, kind, "row", partial(text.json_array_rows, p), file=p)
    read = tables.parquet_rows if kind == "Parquet" else tables.arrow_rows
    return RowSource(name, kind, "row", partial(read, p), file=p, arrow=True, cells=True)


def _split_suffix(p: Path) -> tuple[Path, str | None]:
    """`folder:split` names a split of a `datasets` folder (or a hub id); a path with a colon stays whole."""
    if p.exists() or ":" not in p.name:
        return p, None
    head, split = str(p).rsplit(":", 1)
    return Path(head), split or None


def _folder(name: str, p: Path, split: str | None) -> RowSource:
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        return RowSource(name, "`datasets` folder" + (f" (split {split})" if split else ""), "row",
                         partial(tables.datasets_folder_rows, p, split), arrow=True, cells=True)
    files = [f for f in p.rglob("*") if f.suffix.lower() in SUFFIXES and f.is_file()]
    if not files:
        raise DatasetError(f"{p}: is a directory with no dataset in it: expected {ACCEPTED}")
    return RowSource(name, f"folder of {files[0].suffix[1:]} files (load_dataset)", "row",
                     partial(tables.load_dataset_rows, str(p), split), arrow=True, cells=True)


def _first_char(p: Path) -> str:
    with open(p, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("latin-1")


def _refuse_foreign(p: Path) -> None:
    with open(p, "rb") as fh:
        head = fh.read(16)
    for magic, what in FOREIGN.items():
        if head.startswith(magic):
            raise DatasetError(f"{p}: {what}; we read {ACCEPTED}")


def _sniff(p: Path) -> str:
    """A file without a known suffix, recognised by its first bytes."""
    with open(p, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(b"PAR1"):
        return "Parquet"
    if head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
        return "Arrow"
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"{":
        return "JSONL"
    if first == b"[":
        return "JSON array"
    if not head.strip():
        return "JSONL"  # an empty file: validation says it has no records
    found = "binary data" if b"\x00" in head else f"text starting {head[:40].decode('utf-8', 'replace')!r}"
    raise DatasetError(f"{p}: not a dataset format we read (found {found}); we read {ACCEPTED} "
                       "(a .csv or .tsv name tells a table apart from text)")


def record_text(path: str, unit: str, number: int, limit: int = 400) -> str:
    """The start of one record as the file holds it (a line) or as JSON (a table's row), for the dataset
    screen's preview of a bad row; read in bounded pieces: a line can be hundreds of MB."""
    try:
        if unit == "line":
            return _line_text(Path(path).expanduser(), number, limit)
        for index, record, error in open_source(path).rows():
            if index == number:
                text = json.dumps(record, ensure_ascii=False, default=str) if error is None else error[1]
                return text[:limit] + ("…" if len(text) > limit else "")
            if index > number:
                break
    except (OSError, DatasetError) as exc:
        return f"(cannot read: {getattr(exc, 'strerror', None) or exc})"
    return "(not found)"


def _line_text(path: Path, number: int, limit: int) -> str:
    with open(path, "rb") as fh:
        for _ in range(number - 1):
            while (piece := fh.readline(1 << 20)) and not piece.endswith(b"\n"):
                pass
        raw = fh.readline(limit * 4)
    text = raw.decode("utf-8", "replace").rstrip("\r\n")
    cut = len(text) > limit or not raw.endswith(b"\n") and len(raw) == limit * 4
    return text[:limit] + ("…" if cut else "")
