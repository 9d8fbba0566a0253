"""Data-parallel training over MLX's distributed layer (`mx.distributed`, started with `mlx.launch`).

lora-tui adds no cluster of its own: `mlx.launch --hostfile hosts.json --backend ring -- lora-tui train`
starts one process per host or GPU (ring over TCP/Thunderbolt, MPI where present, NCCL on CUDA;
training.distributed_backend names one). Each rank
trains on its share of every global batch; gradients, losses and token counts are summed across ranks
before each optimizer step, so N ranks with batch b take the same steps as one process with batch N x b.
Only rank 0 writes checkpoints, logs and the report.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from itertools import accumulate

from engine.train.errors import TrainingError


class DistributedError(RuntimeError):
    """A peer was lost or the group could not agree: the run stops with its last good checkpoint."""


MIN_WAIT = 30.0  # seconds a collective may always wait
START_WAIT = 600.0  # until this rank has timed a step: ranks load, tokenize and compile at their own pace
FIXED_WAIT = os.environ.get("LORA_TUI_DIST_TIMEOUT")  # seconds, instead of the step-time rule
EXIT_LOST = 5  # lora-tui's exit code for a failed training run
# NVLink multicast (NVLS) off: on the lent H100/H200 hosts NCCL's NVLS set-up fails or hangs; a user may still
# set NCCL_NVLS_ENABLE=1 in the environment.
NCCL_DEFAULTS = {"NCCL_NVLS_ENABLE": "0"}
MISSING = {  # what a named backend needs, when this MLX lacks it
    "nccl": "it needs MLX's CUDA build (the `cuda` extra: uv sync --extra cuda) on Linux with NVIDIA GPUs; "
            "use auto or ring",
    "mpi": "it needs an MPI library where the ranks run (e.g. apt-get install openmpi-bin); use auto or ring",
    "ring": "this MLX was built without distributed support",
}


@dataclass
class World:
    rank: int
    size: int
    group: object = None  # mx.distributed.Group, or None when alone
    on_lost: object = None  # callable(message) run by the watchdog before the process exits
    _waiting_since: float | None = field(default=None, repr=False)
    _slowest_step: float = field(default=0.0, repr=False)
    _steps_seen: int = field(default=0, repr=False)
    _watchdog: threading.Thread | None = field(default=None, repr=False)
    blas_threads: int | None = None  # the BLAS thread cap set because ranks share this host's cores
    backend: str = "none"  # the backend the group runs on (ring, nccl, mpi); "none" when alone
    loop_seconds: float = 0.0  # wall time of the training loop from the second step on (compiling left out)
    loop_collective_seconds: float = 0.0  # the part of loop_seconds spent in collectives, waits included
    _last_step_end: float = field(default=0.0, repr=False)
    _collective_since_step: float = field(default=0.0, repr=False)

    @classmethod
    def current(cls, backend: str = "auto") -> "World":
        """The group this process was launched into (mlx.launch sets it up), or a world of one. `backend`
        is training.distributed_backend: auto takes whatever mlx.launch set up; a named one must start."""
        import mlx.core as mx
        launched = any(k in os.environ for k in ("MLX_RANK", "MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"))
        if backend in ("auto", "nccl") and mx.cuda.is_available():
            for key, value in NCCL_DEFAULTS.items():
                os.environ.setdefault(key, value)
        name = "any" if backend == "auto" else backend
        if not mx.distributed.is_available(name):
            if launched and backend != "auto":  # the config's problem, not a lost peer
                raise TrainingError(f"training.distributed_backend is {backend}, but this MLX has no {backend} "
                                    f"backend: {MISSING[backend]}", "config")
            return cls(0, 1)
        try:
            group = mx.distributed.init(strict=launched and backend != "auto", backend=name)
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or ["no reason given"])[0]
            raise TrainingError(f"training.distributed_backend: the {backend} backend did not start ({first}); "
                                f"launch every rank with mlx.launch --backend {backend}", "config") from None
        if group.size() == 1:
            return cls(0, 1)
        world = cls(group.rank(), group.size(), group, backend=_backend_name(name))
        world.share_cores()
        return world

    def ranks_on_this_host(self) -> int:
        """How many ranks of the group run on this machine (mlx.launch -n 2 puts both on one)."""
        import socket
        import zlib

        import mlx.core as mx
        me = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF
        hosts = self._collective(lambda: mx.distributed.all_gather(mx.array([me], dtype=mx.int32), group=self.group))
        return int((hosts == me).sum().item())

    def share_cores(self) -> None:
        """Give each rank of one host its share of the cores for BLAS, so that they don't spin on each other."""
        from engine import blas
        local = self.ranks_on_this_host()
        if local > 1:
            threads = max(1, blas.cores() // local)
            if blas.set_threads(threads):
                self.blas_threads = threads

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def alone(self) -> bool:
        return self.size == 1

    def share(self, batch: list[int]) -> list[int]:
        """This rank's rows of a global batch (rank r takes rows r, r+N, ...)."""
        return batch[self.rank::self.size]

    def sum(self, x):
        """all_sum of an MLX array or a tree of them; the array itself when alone. A tree of float32 arrays
        (a step's gradients, loss and token count) goes as one buffer: one collective a step, not one per
        adapter matrix, each of which pays the link's latency (NCCL's or the ring's)."""
        if self.alone:
            return x
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_map
        leaves = [a for _, a in tree_flatten(x)]
        if len(leaves) < 2 or any(a.dtype != mx.float32 for a in leaves):
            return self._collective(lambda: tree_map(lambda a: mx.distributed.all_sum(a, group=self.group), x))
        flat = self._collective(lambda: mx.distributed.all_sum(
            mx.concatenate([a.reshape(-1) for a in leaves]), group=self.group))
        ends = list(accumulate(a.size for a in leaves))
        pieces = iter(flat[end - a.size:end].reshape(a.shape) for a, end in zip(leaves, ends))
        return tree_map(lambda _: next(pieces), x)

    def _collective(self, collective):
        """Evaluate collective() (a tree of arrays from MLX's collectives) under the watchdog."""
        import mlx.core as mx
        self._start_watchdog()
        self._waiting_since = started = time.monotonic()
        try:
            out = collective()
            mx.eval(out)
        except RuntimeError as exc:
            raise DistributedError(f"lost contact with the other ranks ({exc})") from None
        finally:
            self._waiting_since = None
            self._collective_since_step += time.monotonic() - started
        return out

    def summary(self) -> dict | None:
        """report.json's block for a run of several ranks: the share of the training loop (from the second
        step on: logging, checkpoints and validation included) spent in collectives, waits included."""
        if self.alone:
            return None
        loop, comm = self.loop_seconds, self.loop_collective_seconds
        return {"ranks": self.size, "backend": self.backend, "loop_seconds": round(loop, 3),
                "communication_seconds": round(comm, 3), "communication_share": round(comm / loop, 4) if loop else None}

    def step_took(self, seconds: float) -> None:
        now = time.monotonic()
        if self._steps_seen:  # the first step of a process also compiles (and waits for slower loads)
            self._slowest_step = max(self._slowest_step, seconds)
            self.loop_seconds += now - self._last_step_end
            self.loop_collective_seconds += self._collective_since_step
        self._last_step_end, self._collective_since_step = now, 0.0
        self._steps_seen += 1

    def patience(self) -> float:
        """How long a collective may wait before the group counts as lost: a healthy one waits at most for
        the slowest rank's step, so ten of the slowest steps seen, at least 30 s; 10 minutes before the first
        timed step, while another rank may still be loading a model from a slower disk
        (LORA_TUI_DIST_TIMEOUT sets a fixed number of seconds instead)."""
        if FIXED_WAIT:
            return float(FIXED_WAIT)
        if self._slowest_step == 0.0:
            return START_WAIT
        return max(MIN_WAIT, 10 * self._slowest_step)

    def _start_watchdog(self) -> None:
        # MLX's ring backend blocks for ever when a peer dies mid-collective; the watchdog turns that into
        # a message and an exit (the checkpoints rank 0 wrote are atomic, so the last one is good).
        if self._watchdog is not None:
            return
        def watch():
            while True:
                time.sleep(1.0)
                since = self._waiting_since
                if since is not None and time.monotonic() - since > self.patience():
                    message = (f"rank {self.rank}: no answer from the other ranks for {self.patience():.0f} s "
                               "(a rank died or the network dropped)")
                    if self.on_lost is not None:
                        try:
                            self.on_lost(message)
                        except Exception:
                            pass
                    print(f"lora-tui: error: {message}", file=sys.stderr, flush=True)
                    os._exit(EXIT_LOST)
        self._watchdog = threading.Thread(target=watch, name="lora-tui-dist-watchdog", daemon=True)
        self._watchdog.start()

    def sum_number(self, value: float) -> float:
        if self.alone:
            return value
        import mlx.core as mx
        return self.sum(mx.array(float(value), dtype=mx.float32)).item()

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says so (a stop requested on one stops all at the same step)."""
        return bool(flag) if self.alone else self.sum_number(1.0 if flag else 0.0) > 0

    def from_main(self, value: int) -> int:
        """Rank 0's integer (int32) on every rank, e.g. the run folder's timestamp."""
        if self.alone:
            return value
        import mlx.core as mx
        return int(self.sum(mx.array(value if self.is_main else 0, dtype=mx.int32)).item())


def _backend_name(name: str) -> str:
    """The backend mx.distributed.init("any") took: the one mlx.launch set up, told by the variables it sets."""
    if name != "any":
        return name
    for variable, backend in (("NCCL_HOST_IP", "nccl"), ("MLX_JACCL_COORDINATOR", "jaccl"),
                              ("OMPI_COMM_WORLD_SIZE", "mpi")):
        if variable in os.environ:
            return backend
    return "ring"
