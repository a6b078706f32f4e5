"""The main job as a user runs it: `python -m vlm_engine.cli generate FOLDER --model DIR`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from vlm_engine.demo.model import demo_request
from vlm_engine.pipeline import VisionLanguagePipeline
from vlm_engine.testing import make_tiny_checkpoint


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_generate_prints_one_answer_per_image(tmp_path, quantization):
    model = make_tiny_checkpoint(tmp_path / "model", seed=2)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), "red").save(images / "a.png")
    Image.new("L", (20, 50), 128).save(images / "b.jpg")
    (images / "notes.txt").write_text("not an image")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlm_engine.cli",
            "generate",
            str(images),
            "--model",
            str(model),
            "--max-tokens",
            "5",
            "--prompt",
            "What color?",
            *(["--quantization", quantization] if quantization else []),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["a.png", "b.jpg"]
    # The engine's batched answer equals the scheduler-free reference loop on the same prompt.
    pipe = VisionLanguagePipeline.load(model, quantization=quantization)
    prepared = pipe.prepare_chat(demo_request(str(images / "a.png"), "What color?")["messages"])
    expected = pipe.tokenizer.decode(pipe.generate(prepared, 5), skip_special_tokens=True)
    assert lines[0].split("\t")[1] == repr(expected)


def test_help_explains_generate():
    run = subprocess.run(
        [sys.executable, "-m", "vlm_engine.cli", "generate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "--model" in run.stdout and "images" in run.stdout
