"""Byte format of one stored embedding: a fixed header, then the tensor's raw bytes.

Layout (all integers little-endian)::

    magic      4 bytes   b"VEC\\x00"
    version    u8        FORMAT_VERSION
    dtype      u8        code from _DTYPE_CODES
    ndim       u8        0.._MAX_NDIM
    reserved   u8        0
    shape      ndim x u64
    length     u64       payload bytes = prod(shape) * itemsize
    digest     32 bytes  blake3 of everything before it, then of the payload
    payload    length bytes, the contiguous tensor in little-endian element order

The digest covers the header fields as well as the payload, so a flipped bit anywhere is
detected. Nothing is unpickled: decoding only parses integers and copies bytes.
"""

from __future__ import annotations

import math
import struct
import sys

import torch
from blake3 import blake3

from vlm_engine.errors import VlmEngineError

MAGIC = b"VEC\x00"
FORMAT_VERSION = 1
DIGEST_SIZE = 32
_MAX_NDIM = 8
_PREFIX = struct.Struct("<4sBBBB")  # magic, version, dtype code, ndim, reserved
_U64 = struct.Struct("<Q")

_DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class CorruptEntryError(VlmEngineError, ValueError):
    """Stored bytes are not a valid embedding entry: damaged, truncated, or of another format."""


def encode_tensor(tensor: torch.Tensor) -> bytes:
    """Serialize `tensor` (float32, float16 or bfloat16, any shape, any device)."""
    if tensor.dtype not in _DTYPE_CODES:
        raise ValueError(f"cannot store a {tensor.dtype} tensor; expected one of {_dtype_names()}")
    if tensor.dim() > _MAX_NDIM:
        raise ValueError(f"cannot store a {tensor.dim()}-d tensor; at most {_MAX_NDIM} dims")
    if sys.byteorder != "little":
        raise RuntimeError("the embedding format assumes a little-endian host")
    payload = _raw_bytes(tensor)
    header = _header_fields(_DTYPE_CODES[tensor.dtype], tuple(tensor.shape), len(payload))
    return b"".join((header, _digest(header, payload), payload))


def decode_tensor(
    data: bytes,
    expected_dtype: torch.dtype | None = None,
    expected_shape_tail: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Parse and verify bytes from `encode_tensor` into a CPU tensor.

    Raises CorruptEntryError on any mismatch: magic, version, dtype, shape against length,
    truncation or trailing bytes, digest, or the expected dtype / trailing dims when given.
    """
    view = memoryview(data)
    dtype, shape, header_end = _parse_header(view)
    payload_start = header_end + DIGEST_SIZE
    digest = bytes(view[header_end:payload_start])
    payload = view[payload_start:]
    if _digest(view[:header_end], payload) != digest:
        raise CorruptEntryError("checksum mismatch: the entry was damaged")
    _check_expected(dtype, shape, expected_dtype, expected_shape_tail)
    return _tensor_from_bytes(payload, dtype, shape)


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    # numpy has no bfloat16; a byte view carries every dtype unchanged.
    return flat.view(torch.uint8).numpy().tobytes()


def _header_fields(dtype_code: int, shape: tuple[int, ...], num_payload_bytes: int) -> bytes:
    parts = [_PREFIX.pack(MAGIC, FORMAT_VERSION, dtype_code, len(shape), 0)]
    parts += [_U64.pack(size) for size in shape]
    parts.append(_U64.pack(num_payload_bytes))
    return b"".join(parts)


def _digest(header: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    hasher = blake3(header)
    hasher.update(payload)
    return hasher.digest(DIGEST_SIZE)


def _parse_header(view: memoryview) -> tuple[torch.dtype, tuple[int, ...], int]:
    """Validate the fixed fields; returns (dtype, shape, offset of the digest)."""
    if len(view) < _PREFIX.size:
        raise CorruptEntryError(f"entry of {len(view)} bytes is shorter than a header")
    magic, version, dtype_code, ndim, reserved = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntryError(f"bad magic {bytes(magic)!r}: not an embedding entry")
    if version != FORMAT_VERSION:
        raise CorruptEntryError(f"format version {version}, this build reads {FORMAT_VERSION}")
    if dtype_code not in _CODE_DTYPES:
        raise CorruptEntryError(f"unknown dtype code {dtype_code}")
    if ndim > _MAX_NDIM or reserved != 0:
        raise CorruptEntryError(f"bad header: ndim={ndim}, reserved={reserved}")
    header_end = _PREFIX.size + (ndim + 1) * _U64.size
    if len(view) < header_end + DIGEST_SIZE:
        raise CorruptEntryError(f"entry of {len(view)} bytes is truncated inside its header")
    fields = struct.unpack_from(f"<{ndim + 1}Q", view, _PREFIX.size)
    shape, num_payload_bytes = tuple(fields[:ndim]), fields[ndim]
    dtype = _CODE_DTYPES[dtype_code]
    if num_payload_bytes != math.prod(shape) * dtype.itemsize:
        raise CorruptEntryError(f"payload length {num_payload_bytes} does not fit shape {shape}")
    if len(view) != header_end + DIGEST_SIZE + num_payload_bytes:
        raise CorruptEntryError(
            f"entry has {len(view)} bytes, header promises {header_end + DIGEST_SIZE + num_payload_bytes}"
        )
    return dtype, shape, header_end


def _check_expected(
    dtype: torch.dtype,
    shape: tuple[int, ...],
    expected_dtype: torch.dtype | None,
    expected_shape_tail: tuple[int, ...] | None,
) -> None:
    if expected_dtype is not None and dtype != expected_dtype:
        raise CorruptEntryError(f"entry holds {dtype}, expected {expected_dtype}")
    if expected_shape_tail is None:
        return
    tail = tuple(expected_shape_tail)
    if len(shape) < len(tail) or shape[len(shape) - len(tail) :] != tail:
        raise CorruptEntryError(f"entry has shape {shape}, expected trailing dims {tail}")


def _tensor_from_bytes(
    payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    if len(payload) == 0:
        return torch.empty(shape, dtype=dtype)
    # A writable copy: torch.frombuffer over read-only bytes would alias immutable memory.
    flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def _dtype_names() -> str:
    return ", ".join(str(dtype).removeprefix("torch.") for dtype in _DTYPE_CODES)
