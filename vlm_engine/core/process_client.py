"""The frontend's handle on an engine core running in its own process (core/server.py).

`ProcessClient` is the `CoreClient` (core/client.py) of a core in another process, over two ZMQ
sockets: requests go out on one, the core's step outputs and call replies come back
on the other. The core steps on its own while requests are unfinished; `step()` here hands back
the outputs of the next core step, waiting for it if none has arrived yet.

Waiting also watches the process itself (a Linux pidfd, or a short poll elsewhere), so a core
that dies never leaves a caller hanging: the wait raises `EngineDeadError`, and so does every
later call. `close()` (also run at interpreter exit) stops the process and removes its sockets.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import zmq

from vlm_engine import errors
from vlm_engine.core import messages
from vlm_engine.core.client import CoreClient
from vlm_engine.engine_config import EngineConfig
from vlm_engine.vocab import protocol
from vlm_engine.vocab.protocol import EngineCoreOutput
from vlm_engine.vocab.request import Request, RequestStatus

SHUTDOWN_SECONDS = 30.0  # for the core to finish connector saves and exit before it is killed
_POLL_MS = 200  # how often liveness is checked where no pidfd is available
_STARTUP_ERRORS = (ValueError, TypeError, FileNotFoundError, RuntimeError, MemoryError)


class ProcessClient(CoreClient):
    @classmethod
    def start(cls, checkpoint_dir: Path, config: EngineConfig) -> ProcessClient:
        """Start the core process; it loads the model while the caller goes on. Call
        `wait_ready()` before the first request."""
        return cls(checkpoint_dir, config)

    def __init__(self, checkpoint_dir: str | Path, config: EngineConfig):
        self._dir = tempfile.mkdtemp(prefix="vlm-engine-")
        self._context = zmq.Context()
        self._inbox = self._context.socket(zmq.PUSH)  # the core's inbox
        self._outbox = self._context.socket(zmq.PULL)  # the core's outbox
        self._inbox.setsockopt(zmq.SNDHWM, 0)
        self._outbox.setsockopt(zmq.RCVHWM, 0)
        inbox, outbox = f"ipc://{self._dir}/inbox", f"ipc://{self._dir}/outbox"
        self._inbox.bind(inbox)
        self._outbox.bind(outbox)
        package_root = str(Path(__file__).resolve().parents[2])  # the folder holding vlm_engine
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        command = [
            sys.executable, "-m", "vlm_engine.core.server",
            "--checkpoint", str(checkpoint_dir), "--config", json.dumps(asdict(config)),
            "--inbox", inbox, "--outbox", outbox, "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        self._pidfd = _pidfd(self.process.pid)
        self._finalizer = weakref.finalize(
            self, _stop, self.process, self._pidfd, self._context, self._dir, self._inbox
        )
        self._poller = zmq.Poller()
        self._poller.register(self._outbox, zmq.POLLIN)
        if self._pidfd is not None:
            self._poller.register(self._pidfd, zmq.POLLIN)
        self._steps: collections.deque[list[EngineCoreOutput]] = collections.deque()
        self._replies: dict[int, Any] = {}
        self._call_ids = itertools.count()
        self._live: set[str] = set()  # sent and neither finished nor aborted
        self.error: str | None = None  # why the core is gone
        self._failure: dict[str, Any] | None = None  # what the core said when it failed
        self.max_model_len = 0

    # ---- start-up --------------------------------------------------------------------------

    def wait_ready(self) -> None:
        """Wait until the core has built the model; raise its error if it could not (a start-up
        error of a known kind, such as a model that does not fit, keeps its type)."""
        try:
            kind, frames = self._receive()
        except errors.EngineDeadError as e:
            self.close()
            failure = self._failure or {}
            cls = getattr(errors, str(failure.get("type")), None)
            cls = cls or getattr(builtins, str(failure.get("type")), None)
            if isinstance(cls, type) and issubclass(cls, _STARTUP_ERRORS):
                raise cls(failure.get("message")) from None
            raise RuntimeError(f"the engine core failed to start: {e}") from None
        if kind != protocol.READY:
            raise RuntimeError(f"the engine core sent {kind!r} before it was ready")
        header = messages.unpack(frames[0])
        self.max_model_len = int(header["max_model_len"])

    # ---- what Engine calls -----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self._check_alive()
        self._inbox.send_multipart([protocol.ADD, *messages.encode_request(request)], copy=False)
        self._live.add(request.request_id)

    def abort_requests(
        self, request_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> None:
        ids = [i for i in request_ids if i in self._live]
        self._live.difference_update(ids)
        if ids and self.error is None:
            header = messages.pack({"ids": ids, "status": status.name})
            self._inbox.send_multipart([protocol.ABORT, header])

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def step(self) -> list[EngineCoreOutput]:
        """The outputs of the core's next step (waiting for it); [] when nothing is unfinished."""
        if not self._live and not self._steps:
            return []
        while not self._steps:
            self._check_alive()
            self._receive_one()
        outputs = self._steps.popleft()
        for out in outputs:
            if out.finish_reason is not None:
                self._live.discard(out.request_id)
        return outputs

    def has_ready_step(self) -> bool:
        while not self._steps and self.error is None and self._outbox.poll(0):
            self._receive_one()
        return bool(self._steps)

    def wait_for_step(self, timeout: float) -> bool:
        if self._steps or self.error is not None or self.process.poll() is not None:
            return True
        return bool(self._outbox.poll(max(1, round(timeout * 1000))))  # step() receives it

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def all_blocks_free(self) -> bool:
        return self._call("all_blocks_free")

    def reset_prefix_cache(self) -> bool:
        return self._call("reset_prefix_cache")

    def evict_unreferenced_encoder_outputs(self) -> None:
        self._call("evict_unreferenced_encoder_outputs")

    @property
    def is_alive(self) -> bool:
        return self.error is None and self.process.poll() is None

    def close(self) -> None:
        """Ask the core to finish and exit; kill it if it does not within SHUTDOWN_SECONDS."""
        if self.error is None:
            self.error = "the engine was closed"
        self._finalizer()

    # ---- receiving -------------------------------------------------------------------------

    def _call(self, method: str) -> Any:
        self._check_alive()
        call_id = next(self._call_ids)
        self._inbox.send_multipart(
            [protocol.CALL, messages.pack({"id": call_id, "method": method})]
        )
        while call_id not in self._replies:
            self._check_alive()
            self._receive_one()
        return self._replies.pop(call_id)

    def _receive_one(self) -> None:
        kind, frames = self._receive()
        if kind == protocol.OUTPUTS:
            self._steps.append(messages.decode_outputs(frames[0]))
        elif kind == protocol.REPLY:
            header = messages.unpack(frames[0])
            self._replies[int(header["id"])] = header["result"]
        else:
            self._fail(f"the engine core sent an unexpected {kind!r} message")

    def _receive(self) -> tuple[bytes, list[bytes]]:
        """The next message from the core; EngineDeadError if it failed or exited instead."""
        while True:
            events = dict(self._poller.poll(None if self._pidfd is not None else _POLL_MS))
            if self._outbox in events:
                kind, *frames = self._outbox.recv_multipart()
                if kind == protocol.FAILED:
                    self._failure = messages.unpack(frames[0])
                    self._fail(f"{self._failure.get('type')}: {self._failure.get('message')}")
                return kind, frames
            if self.process.poll() is not None:
                # A failure message sent just before exiting may still be on its way.
                if self._outbox.poll(1000):
                    continue
                self._fail(f"the engine core process exited with code {self.process.returncode}")

    def _fail(self, why: str) -> None:
        self.error = f"the engine core failed: {why}"
        self._live.clear()
        raise errors.EngineDeadError(self.error)

    def _check_alive(self) -> None:
        if self.error is not None:
            raise errors.EngineDeadError(self.error)


def _pidfd(pid: int) -> int | None:
    with contextlib.suppress(AttributeError, OSError):
        return os.pidfd_open(pid)
    return None


def _stop(
    process: subprocess.Popen,
    pidfd: int | None,
    context: zmq.Context,
    folder: str,
    inbox: zmq.Socket,
) -> None:
    if process.poll() is None:
        with contextlib.suppress(zmq.ZMQError):
            inbox.send_multipart([protocol.SHUTDOWN], flags=zmq.NOBLOCK)
        try:
            process.wait(SHUTDOWN_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if pidfd is not None:
        os.close(pidfd)
    context.destroy(linger=0)
    shutil.rmtree(folder, ignore_errors=True)
