"""The engine's greedy tokens equal transformers `generate`, token for token, for many concurrent
mixed requests under chunked prefill, preemption, prefix-cache hits, shared images and block
boundaries inside images. After each run every KV block and encoder reference is free again."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Gemma3ForConditionalGeneration

from vlm_engine import Engine, SamplingParams
from vlm_engine.testing import make_tiny_checkpoint
from vlm_engine.testing.samples import WORDS, random_words
from vlm_engine.testing.samples import random_image as sample_image

pytestmark = pytest.mark.transformers

NUM_IMAGES = 5
# VLM_TEST_DEVICE=cuda runs the engine on a GPU (Triton kernels, CUDA graphs) against the same
# transformers reference, float32.
DEVICE = os.environ.get("VLM_TEST_DEVICE", "cpu")


def random_image(seed: int) -> Image.Image:
    width, height = np.random.default_rng(seed).integers(20, 90, 2)
    return sample_image(int(width), int(height), seed)


def make_specs() -> list[tuple[str, list[int], int]]:
    """(text with <start_of_image> markers, image indices, max_tokens): 18 mixed requests."""
    rng = np.random.default_rng(0)
    specs = [
        ("Tell me about shapes.", [], 6),
        (random_words(rng, 70), [], 9),  # several sliding windows long, text only
        ("<start_of_image>What is this?", [0], 8),
        ("<start_of_image>Describe the colors.", [0], 7),  # same image and prefix, new question
        ("Compare <start_of_image> and <start_of_image>.", [1, 2], 10),
        (f"{random_words(rng, 40)} <start_of_image> {random_words(rng, 30)}", [3], 12),
    ]
    while len(specs) < 18:
        num_images = int(rng.integers(0, 3))
        parts = [random_words(rng, int(rng.integers(0, 40)))]
        for _ in range(num_images):
            parts += ["<start_of_image>", random_words(rng, int(rng.integers(0, 25)))]
        images = rng.integers(0, NUM_IMAGES, num_images).tolist()
        specs.append((" ".join(parts), images, int(rng.integers(3, 13))))
    return specs


SPECS = make_specs()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module")
def images():
    return [random_image(100 + i) for i in range(NUM_IMAGES)]


@pytest.fixture(scope="module")
def reference(checkpoint, images) -> list[list[int]]:
    """transformers' greedy tokens for each spec, each request run alone."""
    model = Gemma3ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
    tokens = []
    for text, image_ids, max_tokens in SPECS:
        inputs = processor(
            text=text, images=[images[i] for i in image_ids] or None, return_tensors="pt"
        )
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
            )
        tokens.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    return tokens


def run_engine(checkpoint, images, specs=SPECS, **options):
    engine = Engine(checkpoint, device=DEVICE, dtype="float32", **options)
    prompts = [{"prompt": text, "images": [images[i] for i in ids]} for text, ids, _ in specs]
    params = [SamplingParams(temperature=0, max_tokens=n, min_tokens=n) for _, _, n in specs]
    outputs = engine.generate(prompts, params)
    assert not engine.has_unfinished()
    assert engine.core.all_blocks_free()
    return engine, outputs


CONFIGS = {
    "roomy": {},
    # The images' resize in torch, in the core (the default on a GPU), instead of PIL's.
    "resize_on_device": {"resize_on_device": True},
    "chunked_prefill": {"max_num_batched_tokens": 24},
    "preemption": {"num_kv_blocks": 34, "max_num_batched_tokens": 64},
    "block_inside_image": {"block_size": 5, "max_num_batched_tokens": 40},
    "priority_policy": {"scheduling_policy": "priority", "max_num_seqs": 5},
    # Each step scheduled while the previous one runs (pending tokens taken on the device).
    "async_chunked_prefill": {"max_num_batched_tokens": 24, "async_scheduling": True},
    "async_preemption": {
        "num_kv_blocks": 34,
        "max_num_batched_tokens": 64,
        "async_scheduling": True,
    },
    "async_block_inside_image": {
        "block_size": 5,
        "max_num_batched_tokens": 40,
        "async_scheduling": True,
    },
}


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_tokens_match_transformers(name, checkpoint, images, reference):
    engine, outputs = run_engine(checkpoint, images, **CONFIGS[name])
    assert [o.token_ids for o in outputs] == reference
    assert all(o.finish_reason == "length" for o in outputs)
    stats = engine.stats()
    if name.endswith("preemption"):
        assert stats["scheduler"]["num_preemptions"] > 0
    if name.endswith("chunked_prefill"):
        assert stats["scheduler"]["num_steps"] > max(n for *_, n in SPECS) + 10
    if name == "roomy":  # all prefills in one step: an image shared by requests is encoded once
        distinct = len({i for _, ids, _ in SPECS for i in ids})
        assert stats["vision_encoder"]["items_encoded"] == distinct


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_prefix_cache_hits_keep_outputs_exact(checkpoint, images, reference, async_scheduling):
    """A second wave of the same requests hits the prefix cache (images included) and still
    produces transformers' tokens; a block boundary falls inside images."""
    engine, first = run_engine(checkpoint, images, block_size=4, async_scheduling=async_scheduling)
    prompts = [{"prompt": text, "images": [images[i] for i in ids]} for text, ids, _ in SPECS]
    params = [SamplingParams(temperature=0, max_tokens=n, min_tokens=n) for _, _, n in SPECS]
    second = engine.generate(prompts, params)
    assert [o.token_ids for o in second] == reference
    assert all(o.num_cached_tokens > 0 for o in second if o.num_prompt_tokens > 4)
    assert engine.stats()["prefix_cache"]["hits"] > 0
    assert engine.core.all_blocks_free()
    # Same image and prefix, different question: the image's blocks are shared.
    assert second[3].num_cached_tokens >= 16


def test_requests_one_at_a_time(checkpoint, images, reference):
    """Each request alone, its prompt in chunks after cached context: on a GPU these steps
    replay the single-sequence prompt-chunk CUDA graphs (padded token counts)."""
    engine = Engine(checkpoint, device=DEVICE, dtype="float32", max_num_batched_tokens=40)
    for (text, ids, n), expected in zip(SPECS, reference, strict=True):
        params = SamplingParams(temperature=0, max_tokens=n, min_tokens=n)
        (out,) = engine.generate({"prompt": text, "images": [images[i] for i in ids]}, params)
        assert out.token_ids == expected
    assert engine.core.all_blocks_free()
    if DEVICE == "cuda":
        assert engine.stats()["scheduler"]["cuda_graph_replays"]["prompt_chunk"] >= len(SPECS)


def test_different_image_same_tokens_does_not_hit(checkpoint, images):
    """Image tokens all have the same id: only the image hash tells the blocks apart."""
    engine = Engine(checkpoint, device=DEVICE, dtype="float32", block_size=4)
    params = SamplingParams(temperature=0, max_tokens=3)
    engine.generate({"prompt": "<start_of_image>What is this?", "images": [images[0]]}, params)
    (out,) = engine.generate(
        {"prompt": "<start_of_image>What is this?", "images": [images[1]]}, params
    )
    assert out.num_cached_tokens <= 4  # the <bos> "\n\n" <boi> block at most


def test_cache_salt_isolates_prefixes(checkpoint):
    engine = Engine(checkpoint, device=DEVICE, dtype="float32", block_size=4)
    params = SamplingParams(temperature=0, max_tokens=2)
    text = " ".join(WORDS)
    engine.add_request(text, params, cache_salt="alice")
    while engine.has_unfinished():
        engine.step()
    engine.add_request(text, params, request_id="bob", cache_salt="bob")
    engine.add_request(text, params, request_id="alice-2", cache_salt="alice")
    cached = {}
    while engine.has_unfinished():
        for out in engine.step():
            cached[out.request_id] = out.num_cached_tokens
    assert cached["bob"] == 0 and cached["alice-2"] > 0
