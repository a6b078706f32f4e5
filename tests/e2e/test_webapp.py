"""The Gradio app as a user runs it: `python apps/gradio_app.py` in a subprocess, driven by a
headless Chromium (Debian's, through Playwright's driver; scripts/test.sh installs it)."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlm_engine.demo.model import DEMO_PROMPT, default_model_path, demo_request
from vlm_engine.testing.ports import free_port

pytest.importorskip("gradio", reason="the app needs the `app` extra (gradio)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright")

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "examples" / "images" / "a_blue_square_center_gray_background.png"
OTHER_IMAGE = REPO / "examples" / "images" / "three_red_stars_left_pink_background.png"
CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps calling home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STARTUP_SECONDS = 90
ANSWER_MS = 30_000


def test_importing_webapp_leaves_gradio_unloaded():
    code = "import sys, vlm_engine.webapp; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_stats_markdown_lists_every_cache_layer():
    from vlm_engine.webapp import stats_markdown

    layer = {"hits": 3, "misses": 4}
    stats = {
        "processor_cache": layer,
        "encoder_cache": layer,
        "ec_connector": {**layer, "saves": 1},
        "prefix_cache": {"queries": 7, **layer},
        "kv_cache": {"usage": 0.25, "num_blocks": 8, "num_free_blocks": 6, "block_size": 16},
        "requests": {"finished": 2, "rejected": 1, "generated_tokens": 9},
    }
    text = stats_markdown(stats)
    for name in ("processor cache", "encoder cache", "ec connector", "prefix cache (tokens)"):
        assert f"| {name} | 3 | 4 |" in text
    assert "25.0% in use, 6 of 8 blocks free" in text
    assert "2 answered, 1 rejected, 9 tokens generated" in text
    stats["ec_connector"] = {"enabled": False}
    assert "| ec connector | off | off |" in stats_markdown(stats)


# ---- the served app -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The shipped script on a free port, default host; its process group is killed after."""
    tmp = tmp_path_factory.mktemp("webapp")
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "apps" / "gradio_app.py"), "--port", str(port)],
            cwd=tmp,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        _wait_until_serving(proc, port, log)
        yield f"http://127.0.0.1:{port}", port
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: scripts/test.sh installs Debian's with apt-get")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def expected_answers():
    """What the engine itself answers for each picture, greedy, with the app's default max
    tokens."""
    from vlm_engine import Engine, SamplingParams
    from vlm_engine.webapp import DEFAULT_MAX_TOKENS

    images = [IMAGE, OTHER_IMAGE]
    with Engine(default_model_path()) as engine:
        params = SamplingParams(max_tokens=DEFAULT_MAX_TOKENS, temperature=0)
        outs = engine.generate([demo_request(str(p), DEMO_PROMPT) for p in images], params)
    return {path: out.text for path, out in zip(images, outs, strict=True)}


@pytest.fixture(scope="module")
def expected_answer(expected_answers):
    return expected_answers[IMAGE]


def test_binds_localhost_by_default(server):
    _, port = server
    assert _listening_addresses(port) == {ipaddress.ip_address("127.0.0.1")}


def test_answer_streams_in_and_equals_the_engine(server, browser, expected_answer):
    url, _ = server
    page = browser.new_page()
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(url)
    expect = sync_api.expect
    expect(page.locator("#question textarea")).to_have_value(DEMO_PROMPT)
    before = _read_stats(page)
    _upload(page, IMAGE)
    _record_answer_states(page)
    page.click("#ask")
    expect(page.locator("#answer textarea")).to_have_value(expected_answer, timeout=ANSWER_MS)
    assert expected_answer  # the demo model captions the picture
    partial = [s for s in page.evaluate("window.answerStates") if s and s != expected_answer]
    assert partial, "the answer appeared at once instead of streaming in"
    assert all(expected_answer.startswith(s) for s in partial), partial

    first = _wait_for_stats(page, f"{before['answered'] + 1} answered")
    assert first["generated_tokens"] > before["generated_tokens"]
    assert first["processor cache"][1] > 0 and first["prefix cache (tokens)"][1] > 0

    page.click("#ask")  # the same picture again: served from the caches
    second = _wait_for_stats(page, f"{before['answered'] + 2} answered")
    expect(page.locator("#answer textarea")).to_have_value(expected_answer)
    assert second["processor cache"][0] > first["processor cache"][0]
    assert second["prefix cache (tokens)"][0] > first["prefix cache (tokens)"][0]
    assert all(u.startswith(url) or u.startswith(("data:", "blob:")) for u in requests), requests
    page.close()


def test_bad_upload_shows_the_typed_error_then_a_sample_is_answered(
    server, browser, expected_answer, tmp_path
):
    url, _ = server
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a picture at all")
    page = browser.new_page()
    page.goto(url)
    before = _read_stats(page)
    _upload(page, bad)
    page.click("#ask")
    error = page.get_by_text(re.compile(r"NotAnImageError: .*broken\.png"))
    sync_api.expect(error).to_be_visible(timeout=ANSWER_MS)
    after = _wait_for_stats(page, f"{before['rejected'] + 1} rejected")
    assert after["answered"] == before["answered"]

    page.locator(f"#samples img[src$='{IMAGE.name}']").click()  # the same picture, as a sample
    page.locator(f"#image img[src$='{IMAGE.name}']").wait_for(state="attached")
    page.click("#ask")
    answer = page.locator("#answer textarea")
    sync_api.expect(answer).to_have_value(expected_answer, timeout=ANSWER_MS)
    page.close()


def test_two_users_at_once_each_get_their_answer(server, browser, expected_answers):
    url, _ = server
    pages = {path: browser.new_page() for path in expected_answers}
    for path, page in pages.items():
        page.goto(url)
        _upload(page, path)
    for page in pages.values():
        page.click("#ask")
    for path, page in pages.items():
        answer = page.locator("#answer textarea")
        sync_api.expect(answer).to_have_value(expected_answers[path], timeout=ANSWER_MS)
        page.close()


# ---- helpers --------------------------------------------------------------------------------


def _upload(page, path: Path) -> None:
    page.locator("#image input[type=file]").set_input_files(str(path))
    page.locator(f"#image img[src$='{path.name}']").wait_for(state="attached")


def _record_answer_states(page) -> None:
    """Keep every distinct value the answer box takes, in the page: each value the page's code
    assigns to it (through the element's `value` setter), and a sample every 2 ms besides. The
    setter sees every streamed update even when several arrive before the page next runs a
    timer, as they can on a loaded machine."""
    page.evaluate(
        """() => {
            const box = document.querySelector('#answer textarea');
            const states = window.answerStates = [box.value];
            const note = (value) => {
                if (states[states.length - 1] !== value) states.push(value);
            };
            const value = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value');
            Object.defineProperty(box, 'value', {
                configurable: true,
                get() { return value.get.call(this); },
                set(v) { value.set.call(this, v); note(value.get.call(this)); },
            });
            setInterval(() => note(box.value), 2);
        }"""
    )


def _read_stats(page) -> dict:
    """The stats panel: (hits, misses) per cache layer, and the request counters."""
    panel = page.locator("#stats")
    sync_api.expect(panel).to_contain_text("answered")  # filled in when the page has loaded
    text = panel.inner_text()
    stats = {}
    for name in ("processor cache", "encoder cache", "prefix cache (tokens)"):
        hits, misses = re.search(re.escape(name) + r"\s+(\d+)\s+(\d+)", text).groups()
        stats[name] = (int(hits), int(misses))
    counts = r"(?P<answered>\d+) answered, (?P<rejected>\d+) rejected, (?P<generated_tokens>\d+)"
    found = re.search(counts, text).groupdict()
    return {**stats, **{key: int(value) for key, value in found.items()}}


def _wait_for_stats(page, counts: str) -> dict:
    sync_api.expect(page.locator("#stats")).to_contain_text(counts, timeout=ANSWER_MS)
    return _read_stats(page)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, even if it is killed outright."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _wait_until_serving(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()}")
        if _listening_addresses(port):
            return
        time.sleep(0.2)
    pytest.fail(f"the app did not listen on port {port} in {STARTUP_SECONDS} s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _listening_addresses(port: int) -> set:
    """The addresses with a TCP socket listening on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
                found.add(ipaddress.ip_address(b"".join(words)))
    return found
