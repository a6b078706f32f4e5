"""Block hashes for prefix caching: `hash(block) = H(parent_hash, token_ids, extra_keys)`.

A block's hash names its KV content, so it must cover everything that content depends on:
every earlier token (through the parent hash, a chain back to block 0), the block's own token
ids, and what the token ids do not show. Every image soft token has the same id, so a block
that overlaps an image carries `(mm_hash, offset - block_start)` for each image it touches,
and a request's `cache_salt` goes into block 0 (and so, through the chain, into every block).

Digests are blake3 over an explicit byte framing (a type tag and a length before each part),
so they are the same in every process and two different inputs never frame to the same bytes.
Python's `hash()` (randomized per process) and pickle (not canonical) are never used.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import blake3

if TYPE_CHECKING:
    from vlm_engine.vocab.request import Request

BlockHash = bytes  # 32-byte blake3 digest

BLOCK_HASH_SIZE = 32
_DOMAIN = b"vlm_engine.prefix_block.v1"


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple) -> BlockHash:
    """The hash of a block of `token_ids` that follows the block hashed `parent` (None: block 0)."""
    hasher = blake3.blake3(_DOMAIN)
    if parent is None:
        hasher.update(b"N")
    elif len(parent) == BLOCK_HASH_SIZE:
        hasher.update(b"P" + parent)
    else:
        raise ValueError(f"parent hash must be {BLOCK_HASH_SIZE} bytes, got {len(parent)}")
    hasher.update(b"T" + _length(len(token_ids)) + struct.pack(f"<{len(token_ids)}q", *token_ids))
    hasher.update(b"E" + _frame(tuple(extra_keys)))
    return hasher.digest()


def block_extra_keys(request: Request, start: int, end: int) -> tuple:
    """What besides token ids decides the KV of tokens [start, end): images and cache salt.

    One `(mm_hash, offset - start)` per image whose placeholder overlaps the range, in
    `request.mm_features` order (the offset is negative for an image begun in an earlier
    block), then `request.cache_salt` in block 0 only.
    """
    keys: list = [
        (feature.mm_hash, feature.offset - start)
        for feature in request.mm_features
        if feature.offset < end and feature.offset + feature.length > start
    ]
    if start == 0 and request.cache_salt is not None:
        keys.append(request.cache_salt)
    return tuple(keys)


def update_block_hashes(request: Request, block_size: int) -> None:
    """Append to `request.block_hashes` the hashes of the blocks of its tokens that became full."""
    token_ids = request.all_token_ids
    for index in range(len(request.block_hashes), len(token_ids) // block_size):
        start, end = index * block_size, (index + 1) * block_size
        parent = request.block_hashes[-1] if index > 0 else None
        keys = block_extra_keys(request, start, end)
        request.block_hashes.append(hash_block(parent, token_ids[start:end], keys))


def _length(n: int) -> bytes:
    return struct.pack("<Q", n)


def _frame(key: object) -> bytes:
    """Tagged, length-prefixed bytes of an extra key: tuples, str, bytes, int, None."""
    if isinstance(key, tuple):
        return b"t" + _length(len(key)) + b"".join(_frame(item) for item in key)
    if isinstance(key, str):
        data = key.encode("utf-8")
        return b"s" + _length(len(data)) + data
    if isinstance(key, bytes):
        return b"b" + _length(len(key)) + key
    if type(key) is int:  # not bool, which would frame like 0/1
        return b"i" + struct.pack("<q", key)
    if key is None:
        return b"n"
    raise TypeError(f"block extra keys take str, bytes, int, None and tuples, not {type(key)}")
