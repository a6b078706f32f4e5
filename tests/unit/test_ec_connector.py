"""EC connectors: the codec, the disk and Redis stores, failure handling and fingerprints."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid

import pytest
import redis
import torch
from safetensors.torch import save_file

from vlm_engine.errors import CheckpointError
from vlm_engine.runtime.connectors import (
    CorruptEntryError,
    DiskECConnector,
    ECConnector,
    RedisECConnector,
    decode_tensor,
    encode_tensor,
    entry_key,
    make_connector,
    model_fingerprint,
)
from vlm_engine.runtime.connectors.codec import DIGEST_SIZE
from vlm_engine.runtime.connectors.redis import _Backoff

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(256, 64), (1, 7), (13,), (3, 5, 7), (0, 16), ()]
HIDDEN = 32


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Integer view, so NaN payloads and -0.0 compare exactly."""
    as_int = {4: torch.int32, 2: torch.int16}[tensor.element_size()]
    return tensor.contiguous().view(as_int)


def _fingerprint() -> str:
    return uuid.uuid4().hex


def _header_size(ndim: int) -> int:
    return 8 + 8 * (ndim + 1) + DIGEST_SIZE


# ----- codec -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_codec_round_trip(dtype, shape):
    tensor = _random(shape, dtype)
    decoded = decode_tensor(encode_tensor(tensor), dtype, shape[1:])
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    assert torch.equal(_bits(decoded), _bits(tensor))


@pytest.mark.parametrize("dtype", DTYPES)
def test_codec_keeps_special_values_bit_exact(dtype):
    tensor = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-8, 3.0], dtype=dtype)
    assert torch.equal(_bits(decode_tensor(encode_tensor(tensor))), _bits(tensor))


def test_codec_handles_views_and_returns_an_independent_writable_tensor():
    base = _random((6, 10), torch.bfloat16)
    view = base.t()[2:5]  # non-contiguous, non-zero storage offset
    data = encode_tensor(view)
    decoded = decode_tensor(data)
    assert torch.equal(decoded, view)
    decoded.fill_(7)  # writable, and shares nothing with the bytes or the source
    assert torch.equal(decode_tensor(data), view)


def test_codec_rejects_unsupported_dtypes():
    with pytest.raises(ValueError, match="int64"):
        encode_tensor(torch.arange(4))


def _valid_entry() -> bytes:
    return encode_tensor(_random((5, 6), torch.bfloat16))


def test_every_flipped_header_byte_is_detected():
    data = _valid_entry()
    for position in range(_header_size(2)):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        with pytest.raises(CorruptEntryError):
            decode_tensor(bytes(damaged))


@pytest.mark.parametrize("position", [0, 1, 17, 59])
def test_flipped_payload_byte_is_detected(position):
    damaged = bytearray(_valid_entry())
    damaged[_header_size(2) + position] ^= 0x80
    with pytest.raises(CorruptEntryError, match="checksum"):
        decode_tensor(bytes(damaged))


def test_truncation_and_trailing_bytes_are_detected():
    data = _valid_entry()
    cuts = [0, 1, 4, 7, 8, 20, _header_size(2) - 1, _header_size(2), len(data) // 2, len(data) - 1]
    for cut in cuts:
        with pytest.raises(CorruptEntryError):
            decode_tensor(data[:cut])
    with pytest.raises(CorruptEntryError):
        decode_tensor(data + b"\x00")


def test_wrong_magic_version_and_dtype_code_name_the_problem():
    data = _valid_entry()
    cases = {0: "magic", 4: "version", 5: "dtype"}
    for position, problem in cases.items():
        damaged = bytearray(data)
        damaged[position] = 0x7F
        with pytest.raises(CorruptEntryError, match=problem):
            decode_tensor(bytes(damaged))


def test_wrong_expected_dtype_or_shape_tail_is_rejected():
    data = encode_tensor(_random((4, HIDDEN), torch.float16))
    assert decode_tensor(data, torch.float16, (HIDDEN,)).shape == (4, HIDDEN)
    with pytest.raises(CorruptEntryError, match="expected"):
        decode_tensor(data, expected_dtype=torch.bfloat16)
    for tail in [(HIDDEN + 1,), (5, HIDDEN), (1, 4, HIDDEN)]:
        with pytest.raises(CorruptEntryError, match="expected"):
            decode_tensor(data, expected_shape_tail=tail)


def test_random_and_empty_bytes_are_rejected():
    with pytest.raises(CorruptEntryError):
        decode_tensor(b"")
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        size = int(torch.randint(1, 4000, (1,), generator=generator))
        noise = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator)
        with pytest.raises(CorruptEntryError):
            decode_tensor(noise.numpy().tobytes())


# ----- a controllable in-memory store: failures, slowness, non-blocking saves --------------


class MemoryConnector(ECConnector):
    def __init__(self, fingerprint: str = "fp", **kwargs) -> None:
        super().__init__(fingerprint, **kwargs)
        self.data: dict[str, bytes] = {}
        self.fail_with: Exception | None = None
        self.put_gate: threading.Event | None = None  # when set, puts wait for it
        self.put_entered = threading.Event()

    def _get_bytes(self, key):
        if self.fail_with:
            raise self.fail_with
        return self.data.get(key)

    def _put_bytes(self, key, data):
        self.put_entered.set()
        if self.put_gate is not None:
            self.put_gate.wait()
        if self.fail_with:
            raise self.fail_with
        self.data[key] = data

    def _exists(self, key):
        if self.fail_with:
            raise self.fail_with
        return key in self.data


def test_save_returns_at_once_and_a_full_queue_drops():
    connector = MemoryConnector(max_pending_saves=2)
    connector.put_gate = threading.Event()
    tensor = _random((8, HIDDEN), torch.float32)
    start = time.monotonic()
    connector.save("a", tensor)
    assert connector.put_entered.wait(5)  # the writer is now stuck inside the slow put
    for mm_hash in ["b", "c", "d", "e"]:
        connector.save(mm_hash, tensor)
    assert time.monotonic() - start < 0.5
    assert connector.flush(timeout=0.05) is False
    assert connector.stats()["dropped_saves"] == 2
    connector.put_gate.set()
    assert connector.flush(timeout=5)
    assert connector.stats()["saves"] == 3
    assert [connector.has(h) for h in "abcde"] == [True, True, True, False, False]
    connector.close()


def test_close_gives_up_on_a_stuck_store_and_counts_what_it_dropped():
    connector = MemoryConnector()
    connector.put_gate = threading.Event()
    tensor = _random((2, HIDDEN), torch.float32)
    connector.save("a", tensor)
    assert connector.put_entered.wait(5)
    connector.save("b", tensor)
    start = time.monotonic()
    connector.close(timeout=0.1)
    assert time.monotonic() - start < 1.0
    connector.save("c", tensor)  # after close: dropped, not raised
    assert connector.stats()["dropped_saves"] == 2
    connector.put_gate.set()


def test_store_failures_are_misses_counted_and_logged_once(caplog):
    connector = MemoryConnector()
    connector.fail_with = OSError("disk on fire")
    tensor = _random((2, HIDDEN), torch.float32)
    with caplog.at_level(logging.WARNING, logger="vlm_engine"):
        for _ in range(30):
            assert connector.load("a") is None
            assert connector.has("a") is False
            assert connector.load_many(["a", "b"]) == [None, None]
            assert connector.has_many(["a", "b"]) == [False, False]
            connector.save("a", tensor)
        connector.save("x", torch.arange(3))  # an unstorable dtype is a save error too
        assert connector.flush(timeout=5)
    stats = connector.stats()
    assert stats["load_errors"] == 120 and stats["misses"] == 90
    assert stats["save_errors"] == 31 and stats["saves"] == 0
    assert len([r for r in caplog.records if "load failed" in r.getMessage()]) == 1
    assert len([r for r in caplog.records if "save failed" in r.getMessage()]) == 1
    connector.close()


def test_entry_key_separates_models_and_validates():
    assert entry_key("fp1", "h") != entry_key("fp2", "h")
    for bad in [("", "h"), ("fp", ""), ("a:b", "h")]:
        with pytest.raises(ValueError):
            entry_key(*bad)


# ----- disk and Redis stores ---------------------------------------------------------------


@pytest.fixture(params=["disk", "redis"])
def make_store(request, tmp_path):
    """Builds connectors of one kind on one shared store; closes them at teardown."""
    made: list[ECConnector] = []
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url

        def build(fingerprint: str) -> ECConnector:
            return RedisECConnector(url, fingerprint=fingerprint)
    else:

        def build(fingerprint: str) -> ECConnector:
            return DiskECConnector(tmp_path / "ec", fingerprint=fingerprint)

    def make(fingerprint: str | None = None) -> ECConnector:
        made.append(build(fingerprint or _fingerprint()))
        return made[-1]

    yield make
    for connector in made:
        connector.close()


def test_store_save_flush_load(make_store):
    connector = make_store()
    tensors = {f"h{i}": _random((4 + i, HIDDEN), DTYPES[i], seed=i) for i in range(3)}
    for mm_hash, tensor in tensors.items():
        connector.save(mm_hash, tensor)
    assert connector.flush(timeout=10)
    for mm_hash, tensor in tensors.items():
        loaded = connector.load(mm_hash, expected_dtype=tensor.dtype, expected_shape_tail=(HIDDEN,))
        assert loaded is not None and torch.equal(loaded, tensor)
    stats = connector.stats()
    assert stats["saves"] == 3 and stats["hits"] == 3 and stats["misses"] == 0
    assert stats["bytes_written"] == stats["bytes_read"] > 0


def test_store_has_has_many_load_many_and_miss_counts(make_store):
    connector = make_store()
    first, second = _random((3, HIDDEN), torch.bfloat16), _random((5, HIDDEN), torch.bfloat16, 1)
    connector.save("first", first)
    connector.save("second", second)
    assert connector.flush(timeout=10)
    assert connector.has("first") and not connector.has("absent")
    assert connector.has_many(["absent", "second", "first"]) == [False, True, True]
    assert connector.has_many([]) == [] and connector.load_many([]) == []
    loaded = connector.load_many(["second", "absent", "first", "other"])
    assert loaded[1] is None and loaded[3] is None
    assert torch.equal(loaded[0], second) and torch.equal(loaded[2], first)
    stats = connector.stats()
    assert stats["hits"] == 2 and stats["misses"] == 2 and stats["corrupt"] == 0


def test_store_corrupt_entry_is_a_counted_miss_and_is_removed(make_store):
    connector = make_store()
    valid = encode_tensor(_random((4, HIDDEN), torch.float16))
    connector._put_bytes(entry_key(connector.fingerprint, "junk"), b"not an embedding")
    connector._put_bytes(entry_key(connector.fingerprint, "cut"), valid[:-3])
    connector._put_bytes(entry_key(connector.fingerprint, "wide"), valid)
    assert connector.load("junk") is None
    assert connector.load_many(["cut"]) == [None]
    assert connector.load("wide", expected_shape_tail=(HIDDEN * 2,)) is None
    stats = connector.stats()
    assert stats["corrupt"] == 3 and stats["misses"] == 3 and stats["hits"] == 0
    assert connector.has_many(["junk", "cut", "wide"]) == [False, False, False]


def test_store_fingerprints_never_share_entries(make_store):
    fingerprint = _fingerprint()
    writer, same_model, other_model = make_store(fingerprint), make_store(fingerprint), make_store()
    tensor = _random((2, HIDDEN), torch.bfloat16)
    writer.save("image", tensor)
    assert writer.flush(timeout=10)
    assert other_model.has("image") is False and other_model.load("image") is None
    loaded = same_model.load("image")
    assert loaded is not None and torch.equal(loaded, tensor)


def test_disk_entries_survive_a_new_instance(tmp_path):
    tensor = _random((7, HIDDEN), torch.bfloat16)
    with DiskECConnector(tmp_path, fingerprint="fp") as first:
        first.save("image", tensor)
        assert first.flush(timeout=10)
    with DiskECConnector(tmp_path, fingerprint="fp") as restarted:
        loaded = restarted.load("image")
    assert loaded is not None and torch.equal(loaded, tensor)


def test_disk_size_limit_evicts_old_entries(tmp_path):
    entry_bytes = 64 * 1024
    with DiskECConnector(tmp_path, size_limit_bytes=8 * entry_bytes, fingerprint="fp") as conn:
        for i in range(24):
            conn.save(f"h{i}", _random((entry_bytes // 4 // HIDDEN, HIDDEN), torch.float32, i))
        assert conn.flush(timeout=10)
        present = conn.has_many([f"h{i}" for i in range(24)])
        assert conn._cache.volume() <= 10 * entry_bytes
    assert present[-1] and not present[0] and 4 <= sum(present) <= 9


def test_redis_two_engines_share_entries_and_ttl_applies(redis_server):
    fingerprint = _fingerprint()
    with (
        RedisECConnector(redis_server.url, ttl_seconds=60, fingerprint=fingerprint) as a,
        RedisECConnector(redis_server.url, fingerprint=fingerprint) as b,
    ):
        tensor = _random((3, HIDDEN), torch.float16)
        a.save("shared", tensor)
        assert a.flush(timeout=10)
        assert b.has("shared")
        assert torch.equal(b.load("shared"), tensor)
    raw = redis.Redis.from_url(redis_server.url)
    assert 0 < raw.ttl(entry_key(fingerprint, "shared")) <= 60
    raw.close()


def test_redis_outage_is_cheap_and_recovery_automatic(redis_server):
    connector = RedisECConnector(
        redis_server.url, fingerprint=_fingerprint(), retry_interval_s=0.2, max_retry_interval_s=0.2
    )
    tensor = _random((2, HIDDEN), torch.bfloat16)
    connector.save("before", tensor)
    assert connector.flush(timeout=10) and connector.has("before")
    redis_server.stop()
    try:
        assert connector.load("before") is None  # the first failure
        for _ in range(10):
            start = time.monotonic()
            assert connector.load("before") is None
            assert connector.has("before") is False
            assert connector.load_many(["before", "x"]) == [None, None]
            connector.save("during", tensor)
            assert time.monotonic() - start < 0.2
        assert connector.flush(timeout=10)
        stats = connector.stats()
        assert stats["load_errors"] >= 31 and stats["save_errors"] >= 1
    finally:
        redis_server.start()
    deadline = time.monotonic() + 5
    while (loaded := _save_and_load(connector, "after", tensor)) is None:
        assert time.monotonic() < deadline, "the connector did not recover"
        time.sleep(0.05)
    assert torch.equal(loaded, tensor)
    connector.close()


def _save_and_load(connector: ECConnector, mm_hash: str, tensor: torch.Tensor):
    connector.save(mm_hash, tensor)
    assert connector.flush(timeout=10)
    return connector.load(mm_hash)


@pytest.fixture
def blackhole_url():
    """A TCP port that accepts connections and never answers: every call times out."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


def test_redis_back_off_skips_a_hanging_server(blackhole_url):
    connector = RedisECConnector(
        blackhole_url, socket_timeout=0.3, fingerprint="fp", retry_interval_s=30
    )
    start = time.monotonic()
    assert connector.load("a") is None
    assert time.monotonic() - start >= 0.25  # the first call pays the timeout once
    start = time.monotonic()
    for _ in range(20):
        assert connector.load("a") is None and connector.has("a") is False
        connector.save("a", torch.ones(2, HIDDEN))
    assert time.monotonic() - start < 0.5  # 60 calls, none pays it again
    assert connector.flush(timeout=5)
    stats = connector.stats()
    assert stats["load_errors"] == 41 and stats["save_errors"] == 20 and stats["misses"] == 21
    connector.close(timeout=1)


def test_back_off_interval_doubles_to_a_cap_and_resets():
    backoff = _Backoff(0.05, 0.15)
    backoff.check()
    intervals = []
    for _ in range(4):
        backoff.failed()
        intervals.append(backoff._interval_s)
    assert intervals == [0.05, 0.1, 0.15, 0.15]
    with pytest.raises(ConnectionError):
        backoff.check()
    backoff.succeeded()
    backoff.check()


# ----- make_connector ----------------------------------------------------------------------


def test_make_connector_parses_specs(tmp_path):
    assert make_connector(None, "fp") is None and make_connector("", "fp") is None
    with make_connector(f"disk:{tmp_path}/a", "fp") as disk:
        assert isinstance(disk, DiskECConnector) and disk.path == f"{tmp_path}/a"
    with make_connector(f"disk:{tmp_path}/b?size_gb=0.5", "fp") as disk:
        assert disk._cache.size_limit == 512 * 1024**2 and disk.fingerprint == "fp"
    for url in ["redis://127.0.0.1:1/0", "rediss://user:secret@127.0.0.1:1/2"]:
        connector = make_connector(url, "fp")
        assert isinstance(connector, RedisECConnector) and "secret" not in repr(connector)
        connector.close()


@pytest.mark.parametrize(
    "spec",
    [
        "s3://bucket/x",
        "/plain/path",
        "disk:",
        "disk:?size_gb=1",
        "disk:/x?size_gb=-1",
        "disk:/x?size_gb=abc",
        "disk:/x?size_gb=inf",
        "disk:/x?colour=red",
        "disk:/x?size_gb",
    ],
)
def test_make_connector_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="spec"):
        make_connector(spec, "fp")


# ----- model_fingerprint -------------------------------------------------------------------


def _write_checkpoint(root, config=None, tensors=None, metadata=None):
    root.mkdir(parents=True, exist_ok=True)
    config = config or {"model_type": "gemma3", "hidden_size": 8}
    (root / "config.json").write_text(json.dumps(config))
    tensors = tensors or {"vision.weight": torch.arange(64, dtype=torch.float32).reshape(8, 8)}
    save_file(tensors, root / "model.safetensors", metadata=metadata)
    return root


def test_model_fingerprint_is_stable_and_path_independent(tmp_path):
    original = _write_checkpoint(tmp_path / "a")
    copy = shutil.copytree(original, tmp_path / "b")
    assert model_fingerprint(original, "bfloat16") == model_fingerprint(copy, "bfloat16")
    assert model_fingerprint(original, "bfloat16") == model_fingerprint(original, torch.bfloat16)


def test_model_fingerprint_changes_with_what_decides_embeddings(tmp_path):
    weights = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    variants = {  # name -> (checkpoint contents, compute dtype)
        "base": ({}, "bfloat16"),
        "dtype": ({}, "float16"),
        "config": ({"config": {"model_type": "gemma3"}}, "bfloat16"),
        "shape": ({"tensors": {"vision.weight": weights.reshape(4, 16)}}, "bfloat16"),
        "name": ({"tensors": {"vision.bias": weights}}, "bfloat16"),
        "metadata": ({"metadata": {"format": "pt"}}, "bfloat16"),
        "values": ({"tensors": {"vision.weight": weights + 1}}, "bfloat16"),
    }
    fingerprints = {
        model_fingerprint(_write_checkpoint(tmp_path / name, **contents), dtype)
        for name, (contents, dtype) in variants.items()
    }
    assert len(fingerprints) == len(variants)


def test_model_fingerprint_is_fast_on_a_huge_checkpoint(tmp_path):
    root = _write_checkpoint(tmp_path / "huge")
    with open(root / "model.safetensors", "r+b") as f:
        f.truncate(4 * 1024**3)  # sparse: 4 GiB of weights that take no disk space
    start = time.monotonic()
    fingerprint = model_fingerprint(root, "bfloat16")
    assert time.monotonic() - start < 1.0
    with open(root / "model.safetensors", "r+b") as f:
        f.seek(4 * 1024**3 - 100)  # the last bytes are always sampled
        f.write(b"\x01" * 100)
    assert model_fingerprint(root, "bfloat16") != fingerprint


def test_model_fingerprint_rejects_incomplete_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        model_fingerprint(tmp_path, "bfloat16")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="safetensors"):
        model_fingerprint(tmp_path, "bfloat16")
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        model_fingerprint(tmp_path, "bfloat16")


def test_fingerprint_keys_make_connectors_disjoint(tmp_path):
    root = _write_checkpoint(tmp_path / "ckpt")
    fp_bf16, fp_fp16 = model_fingerprint(root, "bfloat16"), model_fingerprint(root, "float16")
    tensor = _random((2, HIDDEN), torch.bfloat16)
    with make_connector(f"disk:{tmp_path}/ec", fp_bf16) as bf16:
        bf16.save("image", tensor)
        assert bf16.flush(timeout=10)
    with make_connector(f"disk:{tmp_path}/ec", fp_fp16) as fp16:
        assert fp16.load("image") is None
    assert os.path.isdir(tmp_path / "ec")
