"""engine/heap.py: on Linux with glibc, importing the engine keeps freed memory paged in, so a training step
that frees and reallocates its buffers does not page-fault them in again every step; LORA_TUI_HEAP=default
keeps glibc's behaviour."""

import os
import platform
import subprocess
import sys

import pytest

from helpers import ROOT

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# Allocates, touches and frees 256 MB twice on a new thread each time, as a step's activations are on the app's
# engine thread, and prints the page faults of the second round (MLX's CPU allocator is malloc: ctypes reaches
# the same one).
REUSE = """
import ctypes, resource, engine
from engine import heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
def touch_and_free():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
def on_a_thread():  # as the app trains: on its engine thread
    import threading
    thread = threading.Thread(target=touch_and_free)
    thread.start()
    thread.join()
on_a_thread()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
on_a_thread()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(heap.keep_freed_memory())
"""


def _second_round_faults(**env) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", REUSE], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    return int(out[0]), out[1]


@pytest.mark.skipif(not GLIBC, reason="the tuning is glibc's")
def test_memory_freed_by_a_step_is_reused_without_page_faults():
    faults, what = _second_round_faults(LORA_TUI_HEAP="")
    assert what == "freed memory kept in the heap"
    assert faults < 1000  # 256 MB is 65,536 pages: reused, not faulted in again

    faults, what = _second_round_faults(LORA_TUI_HEAP="default")
    assert what == "malloc defaults (LORA_TUI_HEAP=default)"
    if not _huge_pages_always():  # with 2 MB pages everywhere the kernel would fault in only 128 of them
        assert faults > 60000  # glibc's own behaviour: the block went back to the kernel and came back zeroed


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False
