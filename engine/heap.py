"""Keep freed memory in glibc's heap instead of handing it back to the kernel (Linux CPU training).

MLX's CPU allocator is `malloc`, and a training step frees and reallocates its whole working set
(activations, gradients, the head's chunks) every step. With glibc's defaults, blocks above the
mmap threshold go back to the kernel on `free`, and the next step page-faults them in again, zeroed:
~2 million faults in a 4-step probe of the embedded model. Serving every block from the heap and not
trimming it leaves none in the steady state and takes ~8% off the step (bench/RESULTS.md, eleventh session).
The heap then stays at the step's peak; MLX's own peak is unchanged. One arena for every thread: the app
trains on a worker thread, and a thread's own arena would still map blocks over 64 MB by themselves and
unmap any of its 64 MB heaps that a step leaves empty, whatever the settings.

macOS, musl and a user's `LORA_TUI_HEAP=default` leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # free top-of-heap memory only above this many bytes
M_MMAP_MAX = -4  # how many blocks may be served by their own mmap; 0 = none
M_ARENA_MAX = -8  # how many heaps ("arenas") threads may get; 1 = the main one only
_INT_MAX = 2**31 - 1  # mallopt takes an int: a step that frees more than 2 GB at once gives the rest back

_applied: str | None = None


def keep_freed_memory() -> str:
    """Tune glibc's malloc once for this process (before threads take arenas of their own); returns what was
    done."""
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
        ok = all(libc.mallopt(option, value) == 1
                 for option, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX)))
    except (OSError, AttributeError) as e:
        return f"malloc defaults ({e})"
    return "freed memory kept in the heap" if ok else "malloc defaults (mallopt refused)"
