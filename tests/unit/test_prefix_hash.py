import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_engine.sampling_params import SamplingParams
from vlm_engine.scheduler import prefix_hash
from vlm_engine.scheduler.prefix_hash import block_extra_keys, hash_block, update_block_hashes
from vlm_engine.vocab.inputs import ImageGroup, ImagePlaceholder
from vlm_engine.vocab.request import MultiModalFeature, Request

IMAGE_TOKEN = 99


def make_request(token_ids, images=(), cache_salt=None, request_id="r"):
    """`images`: (mm_hash, offset, length) per image."""
    features = [
        MultiModalFeature(mm_hash, ImagePlaceholder((ImageGroup(offset, length),)), torch.zeros(1))
        for mm_hash, offset, length in images
    ]
    return Request(
        request_id, list(token_ids), SamplingParams(), frozenset(), features, cache_salt=cache_salt
    )


def image_prompt(offset, length, total):
    return [t if not offset <= t < offset + length else IMAGE_TOKEN for t in range(total)]


def hashes_of(request, block_size=4):
    update_block_hashes(request, block_size)
    return request.block_hashes


CHAIN_SCRIPT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("prefix_hash", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
parent = None
for block in ([1, 2, 3, 4], [5, 6, 7, 8]):
    parent = module.hash_block(parent, block, (("img-hash", -3), "salt", 7))
    print(parent.hex())
"""


def chain_in_process():
    parent, digests = None, []
    for block in ([1, 2, 3, 4], [5, 6, 7, 8]):
        parent = hash_block(parent, block, (("img-hash", -3), "salt", 7))
        digests.append(parent.hex())
    return digests


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_hash_chain_is_the_same_in_another_process(seed):
    env = {**os.environ, "PYTHONHASHSEED": seed}
    path = Path(prefix_hash.__file__)
    result = subprocess.run(
        [sys.executable, "-c", CHAIN_SCRIPT, str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == chain_in_process()


def test_hash_is_a_32_byte_digest_that_depends_on_every_input():
    base = hash_block(None, [1, 2, 3, 4], ())
    parent = hash_block(None, [9, 9, 9, 9], ())
    assert isinstance(base, bytes) and len(base) == 32
    assert hash_block(None, [1, 2, 3, 4], ()) == base
    variants = [
        hash_block(None, [1, 2, 3, 5], ()),
        hash_block(None, [4, 3, 2, 1], ()),
        hash_block(None, [1, 2, 3], ()),
        hash_block(parent, [1, 2, 3, 4], ()),
        hash_block(None, [1, 2, 3, 4], (("img", 0),)),
        hash_block(None, [1, 2, 3, 4], ("salt",)),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_framing_keeps_look_alike_extra_keys_apart():
    tokens = [1, 2, 3, 4]
    keys = [
        ("ab",),
        ("a", "b"),
        ("as", "c"),  # without length prefixes these two would frame alike
        ("a", "sc"),
        (("a", 1),),
        ("a", 1),
        ("1",),
        (1,),
        (b"1",),
        (None,),
        ((),),
        (),
    ]
    digests = {hash_block(None, tokens, k) for k in keys}
    assert len(digests) == len(keys)


def test_large_and_negative_token_ids_do_not_collide():
    assert hash_block(None, [2**32], ()) != hash_block(None, [0], ())
    assert hash_block(None, [-1], ()) != hash_block(None, [2**63 - 1], ())


def test_bad_inputs_are_rejected():
    with pytest.raises(TypeError):
        hash_block(None, [1], (True,))
    with pytest.raises(TypeError):
        hash_block(None, [1], (1.5,))
    with pytest.raises(ValueError, match="32 bytes"):
        hash_block(b"short", [1], ())


def test_extra_keys_name_each_overlapping_image_relative_to_the_block():
    # Image A covers tokens [5, 15), image B [15, 17); blocks of 4.
    request = make_request(range(20), images=[("A", 5, 10), ("B", 15, 2)])
    assert block_extra_keys(request, 0, 4) == ()
    assert block_extra_keys(request, 4, 8) == (("A", 1),)
    assert block_extra_keys(request, 8, 12) == (("A", -3),)
    assert block_extra_keys(request, 12, 16) == (("A", -7), ("B", 3))
    assert block_extra_keys(request, 16, 20) == (("B", -1),)


def test_cache_salt_goes_into_the_first_block_only():
    request = make_request(range(8), cache_salt="tenant-1")
    assert block_extra_keys(request, 0, 4) == ("tenant-1",)
    assert block_extra_keys(request, 4, 8) == ()


def test_changing_the_salt_changes_every_block_through_the_chain():
    tokens = list(range(16))
    plain = hashes_of(make_request(tokens))
    salted = hashes_of(make_request(tokens, cache_salt="a"))
    other_salt = hashes_of(make_request(tokens, cache_salt="b"))
    assert len(plain) == len(salted) == len(other_salt) == 4
    for i in range(4):
        assert len({plain[i], salted[i], other_salt[i]}) == 3


def test_the_same_image_at_another_offset_changes_the_block_hashes():
    # Identical token ids: only the placeholder position tells the two prompts apart.
    tokens = image_prompt(4, 8, 16)
    at_4 = hashes_of(make_request(tokens, images=[("img", 4, 8)]))
    at_5 = hashes_of(make_request(tokens, images=[("img", 5, 7)]))
    assert at_4[0] == at_5[0]  # block [0, 4) touches neither image
    assert at_4[1] != at_5[1]
    assert at_4[3] != at_5[3]  # the chain carries the difference past the image


def test_a_different_image_changes_the_block_hashes_from_the_image_on():
    tokens = image_prompt(6, 4, 16)
    cat = hashes_of(make_request(tokens, images=[("cat", 6, 4)]))
    dog = hashes_of(make_request(tokens, images=[("dog", 6, 4)]))
    same_cat = hashes_of(make_request(tokens, images=[("cat", 6, 4)]))
    assert cat == same_cat
    assert cat[0] == dog[0]
    assert all(cat[i] != dog[i] for i in (1, 2, 3))


def test_update_hashes_only_full_blocks_and_chains_them():
    request = make_request(range(10), images=[("img", 2, 3)])
    update_block_hashes(request, 4)
    assert len(request.block_hashes) == 2  # tokens 8 and 9 do not fill a block
    first = hash_block(None, [0, 1, 2, 3], (("img", 2),))
    assert request.block_hashes == [first, hash_block(first, [4, 5, 6, 7], (("img", -2),))]


def test_update_is_incremental_and_matches_hashing_all_at_once():
    request = make_request(range(6))
    update_block_hashes(request, 4)
    before = list(request.block_hashes)
    for token in (6, 7, 8):
        request.append_output_token(token)
        update_block_hashes(request, 4)
    assert request.block_hashes[:1] == before
    assert len(request.block_hashes) == 2
    assert request.block_hashes == hashes_of(make_request(range(9)))
