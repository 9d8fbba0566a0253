"""One entry for every export: the CLI's `lora-tui export` and the app's Export action call `export()`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from engine.config.schema import Config
from engine.export.errors import ExportUsageError

FORMATS = ("gguf", "ollama", "peft", "mlx")
DEFAULT_QUANT = {"gguf": "q8_0", "ollama": "q8_0"}


def size_of(path: str | Path) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def export(cfg: Config, adapter: str | Path | None, to: str, out: str | Path, quant: str | None = None,
           progress: Callable[[str, float], None] | None = None) -> dict:
    """Write base + adapter as `to` at `out`; returns at least path, bytes and format."""
    if to not in FORMATS:
        raise ExportUsageError(f"--to {to}: not a format we export; use one of {', '.join(FORMATS)}")
    if quant and to not in DEFAULT_QUANT:
        raise ExportUsageError(f"--quant {quant}: only GGUF exports (gguf, ollama) are quantized")
    if to == "gguf":
        from engine.export.gguf import export_gguf
        return export_gguf(cfg, adapter, out, quant or DEFAULT_QUANT[to], progress)
    if to == "ollama":
        from engine.export.ollama import export_ollama
        return export_ollama(cfg, adapter, out, quant or DEFAULT_QUANT[to], progress)
    if adapter is None:
        raise ExportUsageError(f"--to {to}: needs --adapter (an adapter, checkpoint or run folder)")
    if to == "peft":
        from engine.export.peft import export_peft
        return export_peft(cfg, adapter, out, progress)
    from engine.export.fuse import fuse
    result = fuse(cfg, adapter, out)
    return result | {"bytes": size_of(result["path"]), "format": "mlx"}
