"""Run `ntkmirror serve` as a subprocess on a free loopback port, for the HTTP benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_serve(serve_args: list[str], admin_key: str, log_path: Path, timeout: float = 600):
    """Start the app, wait for /healthz, yield (base URL, startup seconds); Ctrl-C it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "ntkmirror.cli", "serve", "--port", str(port), *serve_args]
    env = {**os.environ, "NTKMIRROR_ADMIN_KEY": admin_key, "RAY_AUTH_MODE": "disabled"}
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        t_start = time.perf_counter()
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                if server.poll() is not None:
                    sys.exit(f"ntkmirror serve exited early; see {log_path}")
                try:
                    if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t_start > timeout:
                    sys.exit(f"the app did not start in {timeout:.0f} s; see {log_path}")
                time.sleep(1)
            yield base, time.perf_counter() - t_start
        finally:
            server.send_signal(signal.SIGINT)  # Ctrl-C: the CLI shuts Serve and Ray down
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
