"""The built-in demo model: true captions of held-out pictures through the engine, the same
captions from transformers, the main command on the example images, and the training script."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, Gemma3ForConditionalGeneration

from vlm_engine import Engine
from vlm_engine.demo import DEMO_MAX_TOKENS, DEMO_PROMPT, default_model_path, demo_schema
from vlm_engine.demo.evaluation import (
    caption_images,
    held_out_examples,
    json_answers,
    score_captions,
    score_json,
)
from vlm_engine.demo.shapes import ATTRIBUTES, parse_caption

pytestmark = pytest.mark.transformers

REPO = Path(__file__).resolve().parents[2]
NUM_HELD_OUT = 200
MIN_ALL_CORRECT = 0.9


@pytest.fixture(scope="module")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def held_out():
    return held_out_examples(NUM_HELD_OUT)


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine(model_path)  # default options: float32 on a CPU, every cache on


@pytest.fixture(scope="module")
def engine_captions(engine, held_out) -> list[str]:
    return caption_images(engine, [image for image, _ in held_out])


def test_shipped_checkpoint_is_small_and_complete(model_path):
    names = {p.name for p in model_path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
        "generation_config.json",
    } <= names
    size_mb = (model_path / "model.safetensors").stat().st_size / 1e6
    weights = load_file(model_path / "model.safetensors")
    num_parameters = sum(t.numel() for t in weights.values())
    assert 1e6 < num_parameters < 10e6 and size_mb < 10
    text_config = json.loads((model_path / "config.json").read_text())["text_config"]
    assert text_config["sliding_window_pattern"] == 2  # sliding and full attention layers
    assert text_config["num_hidden_layers"] >= 2


def test_held_out_captions_are_right(engine, held_out, engine_captions):
    score = score_captions([scene for _, scene in held_out], engine_captions)
    mistakes = "; ".join(f"{want!r} -> {got!r}" for want, got in score.mistakes[:8])
    assert score.all_correct_rate >= MIN_ALL_CORRECT, f"{score.summary()}; mistakes: {mistakes}"
    for name in ATTRIBUTES:
        assert score.accuracy(name) >= MIN_ALL_CORRECT, score.summary()


def test_held_out_json_answers_are_right_and_always_parse(engine, held_out):
    """Asked for JSON, the model answers with its scene's object; held to the demo schema by
    structured outputs, every answer parses and validates, and at least 90% are right."""
    jsonschema = pytest.importorskip("jsonschema", reason="validates the answers")
    scenes, images = [scene for _, scene in held_out], [image for image, _ in held_out]
    answers = json_answers(engine, images)
    for answer in answers:
        jsonschema.validate(json.loads(answer), demo_schema())
    score = score_json(scenes, answers)
    mistakes = "; ".join(f"{want} -> {got}" for want, got in score.mistakes[:5])
    assert score.all_correct_rate >= MIN_ALL_CORRECT, f"{score.summary()}; mistakes: {mistakes}"
    assert score.canonical == score.all_correct  # right answers are written as scene_json writes
    # The model learned the format itself too; the constraint makes it a guarantee.
    free = score_json(scenes[:40], json_answers(engine, images[:40], constrained=False))
    assert free.all_correct_rate >= MIN_ALL_CORRECT, free.summary()


def test_cache_hits_give_the_same_captions(engine, held_out, engine_captions):
    """A second pass over some pictures hits the processor, encoder and prefix caches."""
    images = [image for image, _ in held_out[:16]]
    before = engine.stats()
    assert caption_images(engine, images) == engine_captions[:16]
    after = engine.stats()
    assert after["processor_cache"]["hits"] >= before["processor_cache"]["hits"] + 16
    assert after["prefix_cache"]["hits"] > before["prefix_cache"]["hits"]


def test_transformers_generates_the_same_captions(model_path, held_out, engine_captions):
    model, loading = Gemma3ForConditionalGeneration.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched tensors
    processor = AutoProcessor.from_pretrained(model_path, backend="pil")
    for (image, _), expected in zip(held_out[:6], engine_captions[:6], strict=True):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEMO_PROMPT}]}
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=text, images=[image], return_tensors="pt")
        with torch.inference_mode():
            out = model.eval().generate(**inputs, max_new_tokens=DEMO_MAX_TOKENS, do_sample=False)
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        assert processor.decode(new_tokens, skip_special_tokens=True) == expected


def test_main_command_captions_the_example_images():
    """`vlm-engine generate examples/images` with the built-in model, as scripts/demo.sh runs it;
    each example's file name spells its scene (two_red_circles_left_white_background.png)."""
    images = sorted((REPO / "examples" / "images").glob("*.png"))
    assert len(images) >= 4
    run = subprocess.run(
        [sys.executable, "-m", "vlm_engine.cli", "generate", str(REPO / "examples" / "images")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    answers = dict(line.split("\t") for line in run.stdout.strip().splitlines())
    assert sorted(answers) == [p.name for p in images]
    for image in images:
        expected = parse_caption(image.stem.replace("_", " "))
        got = parse_caption(ast.literal_eval(answers[image.name]))  # the CLI prints repr(text)
        assert got.canonical and _fields(got) == _fields(expected), (image.name, got)


def _fields(parsed) -> dict:
    return {name: getattr(parsed, name) for name in ATTRIBUTES}


def test_training_script_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "train_demo_model.py"),
            "--out",
            str(out),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--eval-images",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "trained" in run.stdout and "held-out accuracy through the engine" in run.stdout
    _, loading = Gemma3ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(loading.values()), loading
    engine = Engine(out)
    texts = caption_images(engine, [image for image, _ in held_out_examples(2)])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_held_out_captions_stay_right_in_fp8(model_path, held_out, engine_captions):
    """quantization="fp8": the decoder's projections in float8 with per-channel scales and each
    token's activations rounded to float8 (on a CPU, the dequantized reference of the GPU's FP8
    GEMMs). The captions stay right, and almost all are word for word the float32 engine's."""
    with Engine(model_path, quantization="fp8") as engine:
        layer = engine.core.engine_core.runner.model.language_model.layers[0]
        assert layer.mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
        captions = caption_images(engine, [image for image, _ in held_out])
    score = score_captions([scene for _, scene in held_out], captions)
    assert score.all_correct_rate >= MIN_ALL_CORRECT, score.summary()
    same = sum(a == b for a, b in zip(captions, engine_captions, strict=True))
    assert same >= 0.9 * len(captions)
