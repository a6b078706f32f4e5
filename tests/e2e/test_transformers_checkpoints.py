"""Checkpoints that transformers writes itself, in today's layout and in the legacy one of the
Hub's Gemma3 repositories: the engine loads them, and its greedy tokens equal transformers'
`generate` on them for text, images of every mode, pan-and-scan on wide and tall images, two
images in one prompt and a multi-turn chat; with a small token budget (chunked prefill), a KV
cache small enough to force preemption, cold and again on warm caches (prefix, encoder and the
persistent connector).

- today's layout: `model.save_pretrained` + `Gemma3Processor.save_pretrained` (the image
  processor nested in processor_config.json, the chat template in chat_template.jinja);
- legacy: `model.save_pretrained`, `Gemma3ImageProcessorPil.save_pretrained`
  (preprocessor_config.json) and the tokenizer's `save_pretrained` without a template; the two
  files transformers 5 no longer writes, a processor_config.json of processor-level fields and
  chat_template.json (the only place the template is), are written here in their old schema.

The weights come from the project's tiny random checkpoint, loaded by transformers first.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers_reference import as_transformers_input

from vlm_engine import Engine, SamplingParams
from vlm_engine.testing import TinySpec, make_tiny_checkpoint
from vlm_engine.testing.samples import random_image

pytestmark = pytest.mark.transformers

DEVICE = os.environ.get("VLM_TEST_DEVICE", "cpu")
SPEC = TinySpec()


def noise(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, width * height * Image.getmodebands(mode), dtype=np.uint8)
    return Image.frombytes(mode, (width, height), data.tobytes())


def rgba_with_clear_pixels(seed: int) -> Image.Image:
    """Random colours; the left third fully transparent, a band half transparent."""
    image = noise("RGBA", 48, 40, seed)
    alpha = np.full((40, 48), 255, dtype=np.uint8)
    alpha[:, :16] = 0
    alpha[10:20, 16:] = 128
    image.putalpha(Image.fromarray(alpha))
    return image


def palette_with_transparency(seed: int) -> Image.Image:
    image = noise("P", 44, 36, seed)
    image.putpalette(np.random.default_rng(seed).integers(0, 256, 768, dtype=np.uint8).tobytes())
    image.info["transparency"] = int(np.asarray(image)[5, 5])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    reloaded = Image.open(io.BytesIO(buffer.getvalue()))
    reloaded.load()
    assert reloaded.mode == "P" and "transparency" in reloaded.info
    return reloaded


IMAGES = {
    "rgba": rgba_with_clear_pixels(1),
    "la": noise("LA", 41, 37, 2),
    "p_transparency": palette_with_transparency(3),
    "cmyk": noise("CMYK", 39, 45, 4),
    "l": noise("L", 50, 30, 5),
    "wide": random_image(900, 300, 6),  # 3 crops with transformers' pan-and-scan defaults
    "tall": random_image(300, 800, 7),  # 3 crops
}


def chat(image: Image.Image) -> list[dict]:
    return [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}],
        },
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
    ]


# name -> (prompt text or None for the chat, image names, max tokens)
REQUESTS = {
    "text": ("Tell me about shapes and colours.", [], 7),
    **{f"mode_{n}": ("<start_of_image>What is this?", [n], 6) for n in list(IMAGES)[:5]},
    "two_images": ("Compare <start_of_image> with <start_of_image> please.", ["rgba", "l"], 8),
    "wide": ("<start_of_image>Describe it.", ["wide"], 6),
    "tall": ("Look: <start_of_image>", ["tall"], 6),
    "chat": (None, ["p_transparency"], 7),
}


def engine_prompt(name: str) -> dict:
    text, image_names, _ = REQUESTS[name]
    images = [IMAGES[n] for n in image_names]
    return {"prompt": text, "images": images} if text is not None else {"messages": chat(*images)}


def write_with_transformers(source: Path, dest: Path, layout: str) -> Path:
    model = Gemma3ForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    # transformers' own defaults but for the tiny model's input size.
    image_processor = Gemma3ImageProcessorPil(
        size={"height": SPEC.image_size, "width": SPEC.image_size}
    )
    model.save_pretrained(dest)
    if layout == "current":
        processor = Gemma3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
            image_seq_length=SPEC.mm_tokens_per_image,
        )
        processor.save_pretrained(dest)
        assert "image_processor" in json.loads((dest / "processor_config.json").read_text())
        assert not (dest / "preprocessor_config.json").exists()
        return dest
    template, tokenizer.chat_template = tokenizer.chat_template, None
    tokenizer.save_pretrained(dest)
    image_processor.save_pretrained(dest)
    processor_fields = {
        "image_seq_length": SPEC.mm_tokens_per_image,
        "processor_class": "Gemma3Processor",
    }
    (dest / "processor_config.json").write_text(json.dumps(processor_fields))
    (dest / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert (dest / "preprocessor_config.json").exists()
    assert not (dest / "chat_template.jinja").exists()
    assert json.loads((dest / "tokenizer_config.json").read_text()).get("chat_template") is None
    return dest


@pytest.fixture(scope="module", params=["current", "legacy"])
def checkpoint(request, tmp_path_factory) -> Path:
    source = make_tiny_checkpoint(tmp_path_factory.mktemp("source"), seed=3)
    return write_with_transformers(source, tmp_path_factory.mktemp(request.param), request.param)


def hf_inputs(processor, name: str, pan_and_scan: bool):
    text, image_names, _ = REQUESTS[name]
    images = [as_transformers_input(IMAGES[n]) for n in image_names]
    if text is None:  # the chat's one image is too small for pan-and-scan crops either way
        return processor.apply_chat_template(
            chat(*images), add_generation_prompt=True, tokenize=True, return_dict=True
        )
    options = {"do_pan_and_scan": True} if pan_and_scan else {}
    return processor(text=text, images=images or None, return_tensors="pt", **options)


@pytest.fixture(scope="module")
def reference(checkpoint) -> dict[tuple[str, bool], tuple[list[int], list[int]]]:
    """transformers' (prompt ids, greedy tokens) per (request, pan-and-scan), each alone."""
    model = Gemma3ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
    results = {}
    for name, (_, _, max_tokens) in REQUESTS.items():
        for pan_and_scan in (False, True):
            inputs = hf_inputs(processor, name, pan_and_scan).convert_to_tensors("pt")
            with torch.inference_mode():
                out = model.generate(
                    **inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
                )
            prompt = inputs["input_ids"][0].tolist()
            results[name, pan_and_scan] = prompt, out[0, len(prompt) :].tolist()
    return results


def test_pan_and_scan_crops_only_the_wide_and_tall_images(reference):
    for name in REQUESTS:
        with_crops, without = reference[name, True][0], reference[name, False][0]
        if name in ("wide", "tall"):  # the image and 3 crops of 16 tokens each
            assert len(with_crops) > len(without) + 3 * SPEC.mm_tokens_per_image, name
        else:
            assert with_crops == without, name


CONFIGS = {
    "roomy": {},
    "pan_and_scan": {"processor_options": {"do_pan_and_scan": True}},
    # Chunks of 24 tokens: no chunk may split an image, so pan-and-scan (an image and its crops
    # are one span of 94) needs the larger budget below.
    "chunked_prefill": {"max_num_batched_tokens": 24},
    "chunked_prefill_pan_and_scan": {
        "processor_options": {"do_pan_and_scan": True},
        "max_num_batched_tokens": 100,
    },
    "preemption": {
        "processor_options": {"do_pan_and_scan": True},
        "num_kv_blocks": 16,
        "max_num_batched_tokens": 128,
    },
}


def run(engine: Engine) -> list[list[int]]:
    params = [
        SamplingParams(temperature=0, max_tokens=n, min_tokens=n) for *_, n in REQUESTS.values()
    ]
    outputs = engine.generate([engine_prompt(name) for name in REQUESTS], params)
    assert not engine.has_unfinished() and engine.core.all_blocks_free()
    return [out.token_ids for out in outputs]


@pytest.mark.parametrize("config", CONFIGS)
def test_greedy_tokens_match_transformers_cold_and_warm(checkpoint, reference, config):
    options = CONFIGS[config]
    pan_and_scan = bool(options.get("processor_options"))
    expected = [reference[name, pan_and_scan][1] for name in REQUESTS]
    engine = Engine(checkpoint, device=DEVICE, dtype="float32", **options)
    assert run(engine) == expected
    cold = engine.stats()
    assert run(engine) == expected  # warm: every image and prefix cached
    warm = engine.stats()
    assert warm["vision_encoder"]["items_encoded"] == cold["vision_encoder"]["items_encoded"]
    assert warm["processor_cache"]["hits"] > cold["processor_cache"]["hits"]
    if config != "preemption":  # a KV cache this small keeps no prefix from run to run
        assert warm["prefix_cache"]["hits"] > cold["prefix_cache"]["hits"]
    if config.startswith("chunked_prefill"):  # the prompts needed many budget-sized steps
        prompt_tokens = sum(len(reference[name, pan_and_scan][0]) for name in REQUESTS)
        assert cold["scheduler"]["num_steps"] >= prompt_tokens // options["max_num_batched_tokens"]
    if config == "preemption":
        assert cold["scheduler"]["num_preemptions"] > 0


def test_greedy_tokens_match_transformers_from_the_persistent_cache(
    checkpoint, reference, tmp_path
):
    """A second engine on the same disk connector takes every image from it, none from the
    tower, and still gives transformers' tokens."""
    options = {"processor_options": {"do_pan_and_scan": True}, "ec_connector": f"disk:{tmp_path}"}
    expected = [reference[name, True][1] for name in REQUESTS]
    with Engine(checkpoint, device=DEVICE, dtype="float32", **options) as first:
        assert run(first) == expected
    second = Engine(checkpoint, device=DEVICE, dtype="float32", **options)
    assert run(second) == expected
    stats = second.stats()["vision_encoder"]
    assert stats["items_encoded"] == 0 and stats["images_loaded"] > 0
