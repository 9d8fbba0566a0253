"""Columnar containers, read a batch of rows at a time: Parquet and Arrow files through pyarrow, `datasets`
folders (`save_to_disk`) and hub ids or folders of data files through the `datasets` library's own loaders.

Rows are numbered by their index from 0, as `dataset[i]` and pandas name them. Imports are local: pyarrow
and `datasets` cost seconds to import and only these containers need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from engine.data.sources.state import DatasetError, ReadState

BATCH = 512  # rows decoded to Python at a time: memory stays flat for any file size


def parquet_rows(path: Path, state: ReadState) -> Iterator[tuple[int, object, tuple[str, str] | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    state.total = pf.metadata.num_rows
    yield from _batches(pf.iter_batches(batch_size=BATCH), state, pa.ArrowException)


def arrow_rows(path: Path, state: ReadState) -> Iterator[tuple[int, object, tuple[str, str] | None]]:
    """An Arrow IPC file (Feather v2) or stream (the shards `save_to_disk` writes)."""
    import pyarrow as pa
    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            state.total = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = iter(pa.ipc.open_stream(source))
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: not a readable Arrow file ({_first_line(exc)})") from None
    pieces = (b.slice(at, BATCH) for b in batches for at in range(0, b.num_rows, BATCH))
    yield from _batches(pieces, state, pa.ArrowException)


def _batches(batches, state: ReadState, broken: type[Exception]):
    index = 0
    try:
        for batch in batches:
            for row in batch.to_pylist():
                yield index, row, None
                index += 1
            state.done = index
    except broken as exc:  # a corrupt page or a cut-off file: what was read stays counted
        yield index, None, state.end(f"unreadable from here on ({_first_line(exc)})")


def datasets_folder_rows(path: Path, split: str | None,
                         state: ReadState) -> Iterator[tuple[int, object, tuple[str, str] | None]]:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (memory-mapped, not loaded)."""
    import datasets
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - the library raises many kinds; the user needs one line
        raise DatasetError(f"{path}: not a readable `datasets` folder ({_first_line(exc)})") from None
    ds = _pick_split(loaded, split, path)
    state.total = ds.num_rows
    yield from _rows_of(ds.iter(batch_size=BATCH), state)


def load_dataset_rows(name: str, split: str | None,
                      state: ReadState) -> Iterator[tuple[int, object, tuple[str, str] | None]]:
    """A hub id (`owner/name`) or a local folder of data files, through `datasets.load_dataset`, streamed."""
    import datasets
    datasets.disable_progress_bars()  # they would draw over the app's screen
    datasets.logging.set_verbosity_error()
    if not Path(name).exists():
        _check_hub(name)
    try:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, missing split: one line for each
        hint = ("; offline (HF_HUB_OFFLINE) and not cached? name a local file, or load it once where the machine "
                "is online" if not Path(name).exists() else "")
        raise DatasetError(f"{name}: cannot load with `datasets` ({_first_line(exc)}){hint}") from None
    splits = getattr(ds.info, "splits", None) or {}
    known = splits.get(split or "train")
    state.total = getattr(known, "num_examples", 0) or 0
    yield from _rows_of(ds.iter(batch_size=BATCH), state)


def _check_hub(name: str) -> None:
    """Ask the hub once, without retries, so that offline or a wrong id is one line in seconds (load_dataset
    itself retries for half a minute, printing each attempt)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError
    try:
        HfApi().dataset_info(name, timeout=10)
    except GatedRepoError:
        raise DatasetError(f"{name}: a gated dataset: accept its terms on huggingface.co and log in "
                           "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise DatasetError(f"{name}: no such dataset on the Hugging Face hub (or it is private: log in with "
                           "`hf auth login`)") from None
    except OfflineModeIsEnabled:
        return  # HF_HUB_OFFLINE: load_dataset may still find it in its cache
    except Exception as exc:  # noqa: BLE001 - no network, a proxy, a timeout
        raise DatasetError(f"{name}: not a local path, and the Hugging Face hub cannot be reached "
                           f"({_first_line(exc)}): offline? name a local file instead") from None


def _pick_split(loaded, split: str | None, path: Path):
    import datasets
    if isinstance(loaded, datasets.Dataset):
        return loaded
    names = list(loaded)
    chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
    if chosen not in names:
        raise DatasetError(f"{path}: the folder holds splits {', '.join(names)}: name one, e.g. "
                           f"data.path: {path}:{names[0]}")
    return loaded[chosen]


def _rows_of(batches, state: ReadState):
    index = 0
    try:
        for batch in batches:
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                yield index, dict(zip(columns, values)), None
                index += 1
            state.done = index
    except Exception as exc:  # noqa: BLE001 - a lost connection or a corrupt shard ends the read
        yield index, None, state.end(f"unreadable from here on ({_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
