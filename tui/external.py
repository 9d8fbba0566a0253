"""A training run in other processes, shown on the Train screen: one started elsewhere (followed through
its run folder's metrics.jsonl) or a distributed run this app starts with `mlx.launch` on the hosts of a
hosts file (MLX's JSON format: [{"ssh": "host", "ips": ["10.0.0.1"]}, ...])."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from engine.config.loading import save_config
from engine.config.schema import Config
from engine.follow import follow_run
from engine.protocol import Event


class ExternalRun:
    def __init__(self, run_dir: Path, process: subprocess.Popen | None = None, hosts: int = 0,
                 log: Path | None = None, backend: str = "auto"):
        self.run_dir, self.process, self.hosts, self.log, self.backend = run_dir, process, hosts, log, backend

    @property
    def launched(self) -> bool:
        return self.process is not None

    @classmethod
    def follow(cls, run_dir: Path) -> "ExternalRun":
        if not run_dir.is_dir():
            raise ValueError(f"{run_dir}: not a run folder (or a hosts file to launch on)")
        if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "config.yaml").is_file():
            raise ValueError(f"{run_dir}: no metrics.jsonl: not a lora-tui run folder")
        return cls(run_dir)

    @classmethod
    def launch(cls, cfg: Config, hostfile: Path) -> "ExternalRun":
        try:
            hosts = json.loads(hostfile.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{hostfile}: not an mlx.launch hosts file ({exc})") from None
        if not isinstance(hosts, list) or not hosts:
            raise ValueError(f"{hostfile}: expected a JSON list of hosts")
        launcher = Path(sys.executable).parent / "mlx.launch"
        if not launcher.exists():
            raise ValueError("mlx.launch is not installed next to this Python")
        name = cfg.output.run_name or time.strftime("dist-%Y%m%d-%H%M%S")
        run_dir = (Path(cfg.output.dir).expanduser() / name).resolve()
        config = Path(tempfile.mkdtemp(prefix="lora-tui-dist-")) / "config.yaml"
        save_config(cfg, config)  # every host reads this path: keep it on a shared folder for real clusters
        log = config.with_name("launch.log")
        backend = cfg.training.distributed_backend  # auto: mlx.launch picks NCCL on CUDA hosts, ring elsewhere
        cmd = [str(launcher), "--hostfile", str(hostfile), *(["--backend", backend] if backend != "auto" else []),
               "--", str(Path(sys.executable).parent / "lora-tui"), "--config", str(config), "train",
               "--run-name", name]
        with open(log, "w") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        return cls(run_dir, process, len(hosts), log, backend)

    def describe(self) -> str:
        if self.launched:
            how = "its default backend" if self.backend == "auto" else self.backend
            return f"launched on {self.hosts} hosts with mlx.launch ({how}); following {self.run_dir}"
        return f"following {self.run_dir}"

    def run(self, emit: Callable[[Event], None], cancelled: Callable[[], bool]) -> Event | None:
        """Feed the run's events to `emit` until it ends; a launched run that dies early ends it too."""
        died = lambda: self.process is not None and self.process.poll() is not None  # noqa: E731
        return follow_run(self.run_dir, emit, lambda: cancelled() or died(), wait_for_file=120)

    def stop(self) -> None:
        """SIGTERM to the launched ranks: each asks to stop, they agree on the step, rank 0 saves."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except OSError:
            pass

    def problem(self) -> str | None:
        if self.process is None or self.process.poll() in (None, 0):
            return None
        tail = self.log.read_text(errors="replace").strip().splitlines()[-3:] if self.log and self.log.exists() else []
        return f"mlx.launch exited with code {self.process.returncode}: " + " | ".join(tail)
