"""Daemon worker threads for the frontend's preprocessing.

`concurrent.futures.ThreadPoolExecutor` joins its threads at interpreter exit, and a worker that
finishes a job takes a lock the submitting thread also takes: a Ctrl-C landing while the main
thread holds it leaves it held, the worker blocks on it, and the program never exits. These
threads are daemons fed through a `queue.SimpleQueue` (no Python-level lock), so an interrupted
program always exits.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class DaemonPool:
    def __init__(self, num_threads: int, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._num_threads = num_threads
        for i in range(num_threads):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Stop the threads once the jobs queued before this are done (or cancelled)."""
        for _ in range(self._num_threads):
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)
