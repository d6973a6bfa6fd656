"""`gptforge serve` in a subprocess for the benchmarks that measure through HTTP (serve_load, hellaswag_paths)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, port: int, *args: str, device: str = "cpu", wait_s: float = 180) -> subprocess.Popen:
    """`gptforge serve RUN --port PORT --device DEVICE ARGS...`, returned once /health answers; if it does not
    within wait_s, a RuntimeError with the last line it logged."""
    import httpx

    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", str(run), "--port", str(port), "--device",
                             device, *args], stdout=log, stderr=log)
    deadline = time.time() + wait_s
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    log.seek(0)
    tail = log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"gptforge serve did not start: {tail[0]}")
