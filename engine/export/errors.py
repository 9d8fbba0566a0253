"""What an export or import can fail with: one line for the user, nothing left behind."""

from __future__ import annotations


class ExportError(RuntimeError):
    """The export (or import) cannot be done: a wrong base, an unknown architecture, a full disk. The message
    is one line naming the file or setting and what to do; nothing partial was left at the target."""


class ExportUsageError(ExportError):
    """The command asked for something impossible before any work: --out exists, a wrong --to/--quant, a
    missing --adapter (exit code 2, as bad usage)."""
