"""Keep freed memory in glibc's heap instead of handing it back to the kernel (Linux CPU training).

MLX's CPU allocator is `malloc`, and a training step frees and reallocates its whole working set
(activations, gradients, the head's chunks) every step. With glibc's defaults, blocks above the
mmap threshold go back to the kernel on `free`, and the next step page-faults them in again, zeroed:
~2 million faults over four steps of the embedded model. Serving every block from the heap and never
trimming it drops that to a quarter and the step by ~14% (bench/RESULTS.md, eleventh session).
The heap then stays at the step's peak; MLX's own peak is unchanged.

macOS, musl and a user's `LORA_TUI_HEAP=default` leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # free top-of-heap memory only above this many bytes
M_MMAP_MAX = -4  # how many blocks may be served by their own mmap; 0 = none
_INT_MAX = 2**31 - 1  # mallopt takes an int

_applied: str | None = None


def keep_freed_memory() -> str:
    """Tune glibc's malloc once for this process; returns what was done, for the run's device line."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = _tune()
    return _applied


def _tune() -> str:
    if os.environ.get("LORA_TUI_HEAP", "").strip().lower() == "default":
        return "malloc defaults (LORA_TUI_HEAP=default)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "malloc defaults (not glibc)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
    except (OSError, AttributeError) as e:
        return f"malloc defaults ({e})"
    return "freed memory kept in the heap" if ok else "malloc defaults (mallopt refused)"
