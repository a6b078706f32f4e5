"""Our Gemma3 against transformers on the same tiny random checkpoints, float32.

Prompt token ids and pixels must be identical; logits must agree to a relative error of 1e-4
(max |ours - theirs| / max |theirs|).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

from vlm_engine.kernels.attention.metadata import ForwardContext
from vlm_engine.pipeline import PreparedPrompt, VisionLanguagePipeline, image_mask
from vlm_engine.testing import make_tiny_checkpoint
from vlm_engine.testing.samples import random_image, random_words
from vlm_engine.vocab.inputs import PromptInputs

pytestmark = pytest.mark.transformers

REL_TOL = 1e-4
# The same tests run on a GPU with VLM_TEST_DEVICE=cuda (float32 there too).
DEVICE = os.environ.get("VLM_TEST_DEVICE", "cpu")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.float().cpu(), ref.float().cpu()
    return float((ours - ref).abs().max() / ref.abs().max())


def long_text(num_words: int, seed: int) -> str:
    return random_words(np.random.default_rng(seed), num_words)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module")
def ours(checkpoint):
    return VisionLanguagePipeline.load(checkpoint, dtype="float32", device=DEVICE)


@pytest.fixture(scope="module")
def hf(checkpoint):
    model = Gemma3ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    )
    # Our processor reproduces transformers' PIL backend (its default without torchvision).
    return model.to(DEVICE).eval(), AutoProcessor.from_pretrained(checkpoint, backend="pil")


def hf_inputs(processor, text, images, **kwargs):
    inputs = processor(text=text, images=images or None, return_tensors="pt", **kwargs)
    return inputs.to(DEVICE)


@torch.inference_mode()
def hf_logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits[0]


CASES = {
    "text_only": ("Describe a sunny day in three words.", []),
    "one_image": ("<start_of_image>What shape is this?", [(40, 40, 1)]),
    "two_images": (
        "Compare <start_of_image> with\n<start_of_image> please.",
        [(32, 48, 2), (77, 31, 3)],
    ),
    "long_with_images": (
        f"{long_text(60, 0)} <start_of_image> {long_text(50, 1)}\n\n<start_of_image>{long_text(40, 2)}",
        [(50, 50, 4), (33, 65, 5)],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, ours, hf):
    text, sizes = CASES[case]
    images = [random_image(*size) for size in sizes]
    inputs = hf_inputs(hf[1], text, images)
    prepared = ours.prepare(text, images)
    assert prepared.prompt.token_ids == inputs["input_ids"][0].tolist()
    if images:
        assert torch.equal(prepared.pixel_values, inputs["pixel_values"].cpu())
    (logits,) = ours.forward_logits([prepared])
    assert rel_err(logits, hf_logits(hf[0], inputs)) <= REL_TOL


def test_pan_and_scan_matches_transformers(checkpoint, hf):
    ours = VisionLanguagePipeline.load(
        checkpoint, dtype="float32", device=DEVICE, do_pan_and_scan=True
    )
    text = "Look: <start_of_image> and then <start_of_image> done."
    images = [random_image(96, 30, 6), random_image(24, 70, 7)]
    inputs = hf_inputs(hf[1], text, images, do_pan_and_scan=True, pan_and_scan_min_crop_size=8)
    prepared = ours.prepare(text, images)
    assert [len(p.groups) for p in prepared.prompt.placeholders] == [4, 4]  # 3 crops + original
    assert prepared.prompt.token_ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prepared.pixel_values, inputs["pixel_values"].cpu())
    (logits,) = ours.forward_logits([prepared])
    assert rel_err(logits, hf_logits(hf[0], inputs)) <= REL_TOL


def test_chat_matches_transformers(ours, hf):
    image = random_image(45, 45, 8)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "What is in the picture?"},
            ],
        },
    ]
    inputs = (
        hf[1]
        .apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        .to(DEVICE)
    )
    prepared = ours.prepare_chat(messages)
    assert prepared.prompt.token_ids == inputs["input_ids"][0].tolist()
    (logits,) = ours.forward_logits([prepared])
    assert rel_err(logits, hf_logits(hf[0], inputs)) <= REL_TOL


def test_batched_forward_matches_each_alone(ours, hf):
    """Several sequences in one flat forward: each equals transformers on it alone."""
    prepared, refs = [], []
    for text, sizes in CASES.values():
        images = [random_image(*size) for size in sizes]
        prepared.append(ours.prepare(text, images))
        refs.append(hf_logits(hf[0], hf_inputs(hf[1], text, images)))
    for logits, ref in zip(ours.forward_logits(prepared), refs, strict=True):
        assert rel_err(logits, ref) <= REL_TOL


def test_masks_matter(ours, hf):
    """Dropping the sliding window or the bidirectional image groups changes the logits, so the
    parity above really checks both (a prompt longer than the window, images of 16 tokens)."""
    text, sizes = CASES["long_with_images"]
    images = [random_image(*size) for size in sizes]
    prepared = ours.prepare(text, images)
    ref = hf_logits(hf[0], hf_inputs(hf[1], text, images))
    ids = torch.tensor(prepared.prompt.token_ids, device=DEVICE)
    embeds = ours.image_embeds(prepared).flatten(0, 1)
    causal_only = ForwardContext.full_sequences([len(ids)], [[]], DEVICE)
    mask = image_mask([prepared.prompt], DEVICE)
    logits = ours.model.compute_logits(ours.model(ids, causal_only, embeds, mask))
    assert rel_err(logits, ref) > 1e-3
    windows = [layer.self_attn.window for layer in ours.model.language_model.layers]
    assert None in windows and 16 in windows  # both layer types present
    try:
        for layer in ours.model.language_model.layers:
            layer.self_attn.window = None
        (logits,) = ours.forward_logits([prepared])
    finally:
        for layer, window in zip(ours.model.language_model.layers, windows, strict=True):
            layer.self_attn.window = window
    assert rel_err(logits, ref) > 1e-3


@pytest.mark.parametrize("block_size,chunk_size", [(4, 7), (16, None), (5, 40)])
def test_paged_greedy_matches_transformers_generate(block_size, chunk_size, ours, hf):
    """Chunked prefill and decode over a paged KV cache with shuffled blocks."""
    text, sizes = CASES["long_with_images"]
    images = [random_image(*size) for size in sizes]
    inputs = hf_inputs(hf[1], text, images)
    max_new = 8
    with torch.inference_mode():
        out = hf[0].generate(
            **inputs,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    ref_tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    prepared = ours.prepare(text, images)
    total = len(prepared.prompt.token_ids) + max_new
    num_blocks = -(-total // block_size)
    order = np.random.default_rng(block_size).permutation(num_blocks).tolist()
    from vlm_engine.runtime.greedy import greedy_decode

    tokens, logits = greedy_decode(
        ours.model,
        prepared.prompt,
        ours.image_embeds(prepared),
        max_new,
        block_size=block_size,
        chunk_size=chunk_size,
        block_order=order,
    )
    assert tokens == ref_tokens
    for step_logits, ref in zip(logits, out.logits, strict=True):
        assert rel_err(step_logits, ref[0]) <= REL_TOL


def test_text_only_checkpoint_matches_transformers(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "text", seed=3, text_only=True)
    ours = VisionLanguagePipeline.load(path, dtype="float32", device=DEVICE)
    model = Gemma3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).to(DEVICE)
    text = long_text(80, 9)
    ids = ours.tokenizer(text, return_tensors="pt")["input_ids"]
    prepared = ours.prepare(text)
    assert prepared.prompt.token_ids == ids[0].tolist()
    (logits,) = ours.forward_logits([prepared])
    with torch.inference_mode():
        ref = model(input_ids=ids.to(DEVICE)).logits[0]
    assert rel_err(logits, ref) <= REL_TOL


def test_image_token_ids_in_text_are_embedded_as_text(ours, hf):
    """Token ids that merely equal the image token (e.g. generated ones) take the token's own
    embedding, as in transformers when no pixels come with them."""
    image_token = ours.config.image_tokens.image_token_id
    ids = [ours.tokenizer.bos_token_id, 20, image_token, 31, image_token, 40]
    prepared = PreparedPrompt(PromptInputs(ids, []), None)
    (logits,) = ours.forward_logits([prepared])
    with torch.inference_mode():
        ref = hf[0](input_ids=torch.tensor([ids], device=DEVICE)).logits[0]
    assert rel_err(logits, ref) <= REL_TOL
