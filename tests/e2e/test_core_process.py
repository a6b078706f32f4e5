"""The engine core in its own process: the same outputs as in-process, errors that keep their
type, a core that dies ends every pending request with EngineDeadError, and no core process
outlives its frontend (closed, interrupted, or killed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlm_engine import AsyncEngine, ConfigError, Engine, EngineDeadError, SamplingParams
from vlm_engine.core.process_client import SHUTDOWN_SECONDS
from vlm_engine.errors import NotAnImageError
from vlm_engine.testing import make_tiny_checkpoint
from vlm_engine.testing.samples import random_image

OPTIONS = dict(device="cpu", dtype="float32", block_size=8)
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def engines(checkpoint):
    with (
        Engine(checkpoint, **OPTIONS, core_process=False) as local,
        # the remote one also resizes its images in the core: they cross at their own sizes
        Engine(checkpoint, **OPTIONS, core_process=True, resize_on_device=True) as remote,
    ):
        yield local, remote


def mixed_requests() -> tuple[list, list[SamplingParams]]:
    prompts = [
        {"prompt": f"<start_of_image>picture {i}", "images": [random_image(40, 32, seed=i % 3)]}
        for i in range(5)
    ] + [f"text prompt number {i} about squares" for i in range(4)]
    params = [
        SamplingParams(temperature=0, max_tokens=9),
        SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=9),
        SamplingParams(temperature=0, max_tokens=9, logprobs=2),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=12, min_tokens=4),
    ]
    return prompts, [params[i % len(params)] for i in range(len(prompts))]


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pid: int, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_outputs_equal_the_in_process_core(engines):
    local, remote = engines
    prompts, params = mixed_requests()
    expected = local.generate(prompts, params)
    got = remote.generate(prompts, params)
    for a, b in zip(expected, got, strict=True):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        # Batches form differently (the core steps as requests arrive): float32 sums may differ
        # in the last bits.
        assert (a.logprobs is None) == (b.logprobs is None)
        for step_a, step_b in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert [(x.token_id, x.rank) for x in step_a] == [(x.token_id, x.rank) for x in step_b]
            assert [x.logprob for x in step_a] == pytest.approx(
                [x.logprob for x in step_b], abs=1e-4
            )
    assert remote.core.all_blocks_free()
    stats = remote.stats()
    assert stats.keys() == local.stats().keys()
    assert stats["encoder_cache"]["entries"] == 3 and stats["requests"]["finished"] == 9


def test_stream_stop_strings_and_aborts(engines):
    local, remote = engines
    words = local.generate("count with me", SamplingParams(temperature=0, max_tokens=12))[0].text
    stop = SamplingParams(temperature=0, max_tokens=30, stop=[words[4:7]])
    (expected,) = local.generate("count with me", stop)
    deltas = list(remote.stream("count with me", stop))
    assert "".join(d.text for d in deltas) == expected.text and deltas[-1].finish_reason == "stop"
    stream = remote.stream(["one long", "two long"], LONG)
    first = next(stream)
    stream.close()  # aborts both, though the core is stepping ahead of us
    assert not first.finished and not remote.has_unfinished()
    assert remote.core.all_blocks_free() and remote.stats()["scheduler"]["num_requests"] == 0


def test_bad_input_is_rejected_in_the_frontend(engines):
    _, remote = engines
    bad = {"prompt": "<start_of_image>x", "images": [b"not an image"]}
    with pytest.raises(NotAnImageError):
        remote.generate(bad)
    out = remote.generate([bad, "fine"], SamplingParams(max_tokens=3), on_error="return")
    assert out[0].finish_reason == "error" and len(out[1].token_ids) == 3
    assert remote.is_healthy


def test_a_start_up_error_keeps_its_type(checkpoint):
    with pytest.raises(ConfigError, match="does not fit"):
        Engine(checkpoint, **OPTIONS, core_process=True, kv_cache_memory_gb=1e-9)


def test_close_stops_the_process_and_removes_its_sockets(checkpoint):
    with Engine(checkpoint, **OPTIONS, core_process=True) as engine:
        engine.generate("hello", SamplingParams(max_tokens=2))
        process, folder = engine.core.process, Path(engine.core._dir)
        assert folder.exists() and alive(process.pid)
    assert process.returncode == 0 and not folder.exists()
    assert not engine.is_healthy
    with pytest.raises(EngineDeadError):
        engine.add_request("after close")
    engine.close()  # twice is fine


def test_a_dead_core_fails_every_pending_request(checkpoint):
    async def run():
        engine = AsyncEngine(checkpoint, **OPTIONS, core_process=True)
        streams = [engine.generate(f"stream {i}", LONG) for i in range(3)]
        firsts = [await s.__anext__() for s in streams]
        os.kill(engine.engine.core.process.pid, signal.SIGKILL)
        errors = []
        for stream in streams:
            with pytest.raises(EngineDeadError, match="exited with code -9") as info:
                async for _ in stream:
                    pass
            errors.append(info.value)
        with pytest.raises(EngineDeadError):
            await engine.generate("after", LONG).__anext__()
        healthy = engine.is_healthy, engine.engine.is_healthy
        await engine.close()
        return firsts, errors, healthy

    firsts, errors, healthy = asyncio.run(asyncio.wait_for(run(), 60))
    assert all(not f.finished for f in firsts) and len(errors) == 3
    assert healthy == (False, False)


def test_a_dead_core_fails_a_blocking_generate(checkpoint):
    engine = Engine(checkpoint, **OPTIONS, core_process=True)
    stream = engine.stream(["a", "b"], LONG)
    next(stream)
    engine.core.process.kill()
    with pytest.raises(EngineDeadError):
        list(stream)
    assert not engine.is_healthy and not engine.has_unfinished()
    engine.close()


HOST = """
import faulthandler, signal, sys
from vlm_engine import Engine, SamplingParams
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if it hangs
# Ctrl-C raises KeyboardInterrupt even where the suite was started in the background, whose
# programs inherit SIGINT ignored (and Python then leaves it ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
engine = Engine(sys.argv[1], device="cpu", dtype="float32", core_process=True)
print(engine.core.process.pid, flush=True)
while True:
    engine.generate(["a", "b", "c"], SamplingParams(max_tokens=50, ignore_eos=True))
    print("round", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["interrupted", "killed"])
def test_no_core_outlives_its_host_program(checkpoint, tmp_path, signum):
    script = tmp_path / "host.py"
    script.write_text(HOST)
    stderr = tmp_path / "host.err"  # a file, not a pipe: nothing blocks on a full pipe
    with stderr.open("w") as err:
        host = subprocess.Popen(
            [sys.executable, str(script), str(checkpoint)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        core_pid = int(host.stdout.readline())
        assert host.stdout.readline().strip() == "round"  # generating
        host.send_signal(signum)
        try:  # an interrupted host asks its core to stop and waits for it up to SHUTDOWN_SECONDS
            host.wait(SHUTDOWN_SECONDS + 30)
        except subprocess.TimeoutExpired:
            host.send_signal(signal.SIGUSR1)
            time.sleep(2)
            host.kill()
            host.wait()
            pytest.fail(f"the host did not exit; its threads:\n{stderr.read_text()[-6000:]}")
        assert wait_gone(core_pid), f"core {core_pid} outlived its host ({signum.name})"
    finally:
        host.kill()
        host.wait()
        host.stdout.close()


LIGHT_FRONTEND = """
import json, sys
from vlm_engine import Engine, SamplingParams
with Engine(sys.argv[1], device="cpu", dtype="float32", core_process=True) as engine:
    image = {"prompt": "<start_of_image>What?", "images": [sys.argv[2]]}
    out = engine.generate(["a b c", image], SamplingParams(max_tokens=3, ignore_eos=True))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("vlm_engine", "triton"))
    print(json.dumps({"tokens": [len(o.token_ids) for o in out], "loaded": loaded}))
"""


def test_a_frontend_with_its_core_in_its_own_process_loads_no_kernels(checkpoint, tmp_path):
    """The frontend process tokenizes, preprocesses images and detokenizes; the model, the
    runtime, the kernels and triton are the core process's alone."""
    script, image = tmp_path / "frontend.py", tmp_path / "image.png"
    script.write_text(LIGHT_FRONTEND)
    random_image(40, 30, 1).save(image)
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(image)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["tokens"] == [3, 3]
    heavy = ("vlm_engine.kernels", "vlm_engine.models", "vlm_engine.runtime", "triton")
    assert [m for m in report["loaded"] if m.startswith(heavy)] == []
    assert "vlm_engine.frontend.image_processor" in report["loaded"]  # the check sees modules
