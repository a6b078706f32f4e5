"""The server's edges, each on a server of its own: remote images (off by default; fetched with a
size cap when allowed), a client that gives up on a whole answer, the waiting limit, a dead
engine core, and `serve --help`."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the server tests drive the official openai client")
pytest.importorskip("fastapi", reason="the server needs the serve extra")

import httpx  # noqa: E402  (the openai client's own HTTP library)
from server_helpers import MODEL, chat, metric, picture, wait_for_idle  # noqa: E402

from vlm_engine.testing.server_process import ServerProcess  # noqa: E402

LONG = {"ignore_eos": True, "min_tokens": 400}


def serve(tmp_path, *args: str) -> ServerProcess:
    return ServerProcess(["--served-model-name", MODEL, *args], tmp_path / "server.log")


def client_of(server: ServerProcess, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, **kwargs)


@pytest.fixture
def image_site(tmp_path):
    """A local web server with one demo picture (small) and one large file."""
    import base64

    url, expected = picture(3)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "picture.png").write_bytes(base64.b64decode(url.split(",", 1)[1]))
    (tmp_path / "site" / "large.png").write_bytes(os.urandom(300_000))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=tmp_path / "site")
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}", expected
    site.shutdown()


def test_remote_images_when_allowed_with_a_size_cap(tmp_path, image_site):
    base, expected = image_site
    server = serve(tmp_path, "--allow-remote-media", "--remote-media-max-bytes", "200000")
    try:
        client = client_of(server)
        answer = client.chat.completions.create(
            model=MODEL, messages=chat(f"{base}/picture.png"), temperature=0, max_tokens=24
        )
        assert answer.choices[0].message.content == expected
        for name, message in (
            ("large.png", "larger than 200000 bytes"),
            ("nothing.png", "HTTP 404"),
        ):
            with pytest.raises(openai.BadRequestError, match=message):
                client.chat.completions.create(
                    model=MODEL, messages=chat(f"{base}/{name}"), max_tokens=2
                )
    finally:
        assert server.stop() == 0


def test_a_client_that_gives_up_on_a_whole_answer_aborts_it(tmp_path):
    server = serve(tmp_path, "--max-model-len", "1024")
    try:
        impatient = client_of(server, timeout=1.0)
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(
                model=MODEL, prompt="Once", max_tokens=400, extra_body=LONG
            )
        text = wait_for_idle(server, timeout=10)
        assert metric(text, 'vlm_requests_total{endpoint="completions",outcome="aborted"}') == 1
        assert metric(text, "vlm_kv_cache_free_blocks") == metric(text, "vlm_kv_cache_blocks")
    finally:
        assert server.stop() == 0


def test_requests_past_the_waiting_limit_get_503(tmp_path):
    server = serve(tmp_path, "--max-num-seqs", "1", "--max-waiting", "1", "--max-model-len", "1024")
    try:
        body = {"model": MODEL, "prompt": "Once", "max_tokens": 400, **LONG}

        def send(results: list) -> None:
            results.append(httpx.post(f"{server.url}/v1/completions", json=body, timeout=120))

        results: list[httpx.Response] = []
        threads = [threading.Thread(target=send, args=(results,)) for _ in range(2)]
        for thread in threads:  # one runs, one waits
            thread.start()
            time.sleep(0.5)
        refused = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "service_unavailable"
        for thread in threads:
            thread.join()
        assert [r.status_code for r in results] == [200, 200]
    finally:
        assert server.stop() == 0


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_dead_engine_core_makes_health_and_requests_503(tmp_path):
    server = serve(tmp_path, "--core-process", "on")
    try:
        client = client_of(server)
        client.completions.create(model=MODEL, prompt="a b", max_tokens=2)
        (core,) = child_pids(server.process.pid)
        os.kill(core, 9)
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL, prompt="a b", max_tokens=2)
        assert info.value.status_code == 503
    finally:
        server.stop()


def test_serve_help_explains_every_option():
    run = subprocess.run(
        [sys.executable, "-m", "vlm_engine.cli", "serve", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    for option in (
        "--host", "--port", "--api-key", "--allowed-local-media-path", "--allow-remote-media",
        "--max-request-bytes", "--max-waiting", "--shutdown-grace", "--model", "--dtype",
        "--max-num-seqs", "--max-model-len", "--ec-connector", "--pan-and-scan",
    ):  # fmt: skip
        assert option in run.stdout, option
    assert "127.0.0.1" in run.stdout and "VLM_ENGINE_API_KEY" in run.stdout
