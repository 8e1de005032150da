"""A `deltatune serve` subprocess for the serving benchmarks (serve_load.py, serve_generate.py): start it on a free
port and wait for its address; read its resident memory from /proc."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(arguments: list[str], deltas: dict[str, Path], threads: int | None = None,
                 timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """`deltatune serve ARGUMENTS --port 0 --delta TASK=PATH...`; (the process, its http://host:port)."""
    command = [sys.executable, "-m", "deltatune.cli", "serve", *arguments, "--port", "0"]
    for task, path in deltas.items():
        command += ["--delta", f"{task}={path}"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=environment)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        found = re.search(r"(http://[\d.]+:\d+)", line)
        if found:
            return server, found.group(1)
        if not line and server.poll() is not None:
            break
    server.kill()
    raise RuntimeError(f"the server did not start (exit code {server.poll()})")


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident set now (VmRSS) and at its peak (VmHWM), MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024 for key in ("VmRSS", "VmHWM")}
