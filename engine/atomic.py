"""Files and folders that a crash or a full disk cannot half-write.

Everything is built under a hidden temp name beside its destination, fsynced, then renamed into place:
a reader (or the next start after a kill) sees the old version or the new one, never a partial one.
Used for configs, checkpoints, the final adapter, the embedded model's import, fused models and exports.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same folder, fsync, rename."""
    with file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temp path beside `final` for a writer that opens files itself (a GGUF writer); when the
    block ends, fsync it and rename it to `final`. On any error the temp file is removed: nothing partial."""
    p = Path(final)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        fsync_dir(p.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


def create(path: str | os.PathLike, data: bytes) -> bool:
    """Write a new file as write_text does, but never over an existing one (a file, folder or link, even a
    dangling one): False, nothing written, when `path` exists. The final step is a hard link of the fsynced
    temp file, which fails rather than replace anything, so a file that appears meanwhile is kept too."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(p):
        return False
    # Not mkstemp: its 0600 would make the new file private; this one gets the umask's mode, as `cp` does.
    tmp = p.parent / f".{p.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, p)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network and FUSE file systems): check, then rename
            if os.path.lexists(p):
                return False
            os.rename(tmp, p)
        fsync_dir(p.parent)
        return True
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def folder(final: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a hidden temp folder beside `final`; when the block ends, fsync what it holds and rename it to
    `final`. An existing `final` is moved aside first and removed last, so a kill at any point leaves one
    complete version; with keep_existing, a `final` that appeared meanwhile (another process finished the
    same work first) wins and ours is dropped. On an error the temp folder is removed and `final` untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)  # an earlier swap killed half-way: put its old version back, to be replaced below
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if keep_existing and final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = None
        if final.exists():
            old = aside(final)
            shutil.rmtree(old, ignore_errors=True)  # left by an earlier kill; `final` is complete
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if old is not None:
                os.rename(old, final)
            elif keep_existing and final.exists():
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def aside(final: Path) -> Path:
    """Where `folder` moves the version it replaces until the new one is in place."""
    return final.with_name(f".{final.name}.old.tmp")


def recover(final: Path) -> bool:
    """Put back the old version of `final` when a kill came between `folder`'s two renames."""
    old = aside(final)
    if final.exists() or not old.is_dir():
        return False
    os.rename(old, final)
    return True
