"""FP8: checkpoints in the compressed-tensors FP8-dynamic format, written by the compressed-tensors
library itself, run as transformers runs them; `quantization="fp8"` makes the same model from
the unquantized checkpoint.

On a CPU in float32 the engine computes what transformers computes with such a checkpoint: the
float8 weights times their per-channel scales, and each token's activations rounded to float8 on
the way into every quantized layer. Logits agree to 1e-4 relative error (max |ours - theirs| /
max |theirs|), greedy tokens are equal.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from vlm_engine import Engine, SamplingParams
from vlm_engine.errors import CheckpointError
from vlm_engine.kernels import fp8 as fp8_kernels
from vlm_engine.models.fp8 import Fp8Linear
from vlm_engine.pipeline import VisionLanguagePipeline
from vlm_engine.testing import make_tiny_checkpoint
from vlm_engine.testing.samples import random_image

pytest.importorskip(
    "compressed_tensors", reason="FP8 checkpoints are written by compressed-tensors"
)
from transformers import AutoProcessor, Gemma3ForCausalLM, Gemma3ForConditionalGeneration  # noqa: E402

from vlm_engine.testing.fp8_checkpoint import write_fp8_checkpoint  # noqa: E402

pytestmark = pytest.mark.transformers
REL_TOL = 1e-4
DEVICE = os.environ.get("VLM_TEST_DEVICE", "cpu")

CASES = {
    "text_only": ("Describe a sunny day in three words.", []),
    "one_image": ("<start_of_image>What shape is this?", [(40, 40, 1)]),
    "two_images": ("Compare <start_of_image> with\n<start_of_image> please.", [(32, 48, 2), (77, 31, 3)]),
}  # fmt: skip


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.float().cpu(), ref.float().cpu()
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module")
def fp8_dir(source, tmp_path_factory):
    return write_fp8_checkpoint(source, tmp_path_factory.mktemp("fp8"))


@pytest.fixture(scope="module")
def hf(fp8_dir):
    model = Gemma3ForConditionalGeneration.from_pretrained(
        fp8_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.to(DEVICE).eval(), AutoProcessor.from_pretrained(fp8_dir, backend="pil")


@pytest.fixture(scope="module")
def ours(fp8_dir):
    return VisionLanguagePipeline.load(fp8_dir, dtype="float32", device=DEVICE)


def logits_of(pipeline: VisionLanguagePipeline, text: str, images) -> torch.Tensor:
    (logits,) = pipeline.forward_logits([pipeline.prepare(text, images)])
    return logits


@torch.inference_mode()
def hf_logits(hf, text: str, images) -> torch.Tensor:
    model, processor = hf
    inputs = processor(text=text, images=images or None, return_tensors="pt").to(DEVICE)
    return model(**inputs).logits[0]


def test_the_checkpoint_is_the_libraries_fp8_dynamic_format(fp8_dir):
    config = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "float-quantized"
    with safe_open(fp8_dir / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        q_proj = "model.language_model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{q_proj}.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor(f"{q_proj}.weight_scale").shape == (64, 1)
        vision = [n for n in names if "vision_tower" in n and n.endswith("q_proj.weight")]
        assert vision and all(f.get_tensor(n).dtype == torch.float32 for n in vision)
    assert sum(n.endswith(".weight_scale") for n in names) == 4 * 7  # every decoder projection


def test_the_engine_builds_fp8_layers_where_the_config_says(ours):
    model = ours.model
    layer = model.language_model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Fp8Linear) and isinstance(
        layer.mlp.down_proj, Fp8Linear
    )
    assert not any(isinstance(m, Fp8Linear) for m in model.vision_tower.modules())
    assert layer.self_attn.q_proj.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, ours, hf):
    text, sizes = CASES[case]
    images = [random_image(*size) for size in sizes]
    assert rel_err(logits_of(ours, text, images), hf_logits(hf, text, images)) <= REL_TOL


def test_the_comparison_sees_the_activation_rounding(ours, hf, monkeypatch):
    """With the activations left unrounded the logits move far past the tolerance: the agreement
    above includes transformers' per-token activation quantization."""
    text, _ = CASES["text_only"]
    reference = hf_logits(hf, text, [])
    monkeypatch.setattr(fp8_kernels, "quantize_tokens", lambda x: (x, torch.ones_like(x[..., :1])))
    assert rel_err(logits_of(ours, text, []), reference) > 100 * REL_TOL


def test_fused_projections_give_the_same_logits(fp8_dir, ours):
    fused = VisionLanguagePipeline.load(fp8_dir, dtype="float32", device=DEVICE)
    fused.model.fuse_projections()
    layer = fused.model.language_model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Fp8Linear)
    assert isinstance(layer.mlp.gate_up_proj, Fp8Linear)
    text, sizes = CASES["one_image"]
    images = [random_image(*size) for size in sizes]
    assert rel_err(logits_of(fused, text, images), logits_of(ours, text, images)) <= 1e-6


def test_engine_greedy_tokens_match_transformers_generate(fp8_dir, hf):
    model, processor = hf
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [
        ("Tell me about the weather today.", []),
        ("<start_of_image>What is in the picture?", [random_image(50, 40, 4)]),
    ]
    with Engine(fp8_dir, device=DEVICE, dtype="float32", max_num_batched_tokens=24) as engine:
        outs = engine.generate([{"prompt": t, "images": i} for t, i in prompts], params)
    for (text, images), out in zip(prompts, outs, strict=True):
        inputs = processor(text=text, images=images or None, return_tensors="pt").to(DEVICE)
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        assert out.token_ids == generated[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def fp8_vision_dir(source, tmp_path_factory):
    return write_fp8_checkpoint(source, tmp_path_factory.mktemp("fp8v"), quantize_vision=True)


@pytest.mark.parametrize("quantization", ["fp8", "fp8-all"])
def test_online_fp8_is_the_checkpoint_the_library_writes(quantization, source, request):
    """quantization="fp8" on the unquantized checkpoint: the same float8 weights and
    scales as compressed-tensors wrote for the decoder (the published layout), hence the same
    logits; "fp8-all": the same with the vision tower's linear layers quantized too."""
    written = request.getfixturevalue("fp8_dir" if quantization == "fp8" else "fp8_vision_dir")
    ours = VisionLanguagePipeline.load(written, dtype="float32", device=DEVICE)
    online = VisionLanguagePipeline.load(
        source, dtype="float32", device=DEVICE, quantization=quantization
    )
    float8 = 0
    for (name, a), (_, b) in zip(
        online.model.named_parameters(), ours.model.named_parameters(), strict=True
    ):
        assert a.dtype == b.dtype and torch.equal(a.cpu().float(), b.cpu().float()), name
        float8 += a.dtype == torch.float8_e4m3fn and name.startswith("vision_tower.")
    assert (float8 > 0) == (quantization == "fp8-all")
    text, sizes = CASES["two_images"]
    images = [random_image(*size) for size in sizes]
    assert torch.equal(logits_of(online, text, images), logits_of(ours, text, images))


def test_online_fp8_from_bfloat16_weights_matches_the_library(source, tmp_path):
    """A bf16 checkpoint: compressed-tensors computes the scales and the rounding in bf16, and so
    does the engine."""
    bf16 = tmp_path / "bf16"
    Gemma3ForConditionalGeneration.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(
        bf16
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "preprocessor_config.json", "processor_config.json", "chat_template.jinja"):  # fmt: skip
        if (source / name).is_file():
            (bf16 / name).write_bytes((source / name).read_bytes())
    written = VisionLanguagePipeline.load(
        write_fp8_checkpoint(bf16, tmp_path / "fp8"), dtype="float32"
    )
    online = VisionLanguagePipeline.load(bf16, dtype="float32", quantization="fp8")
    layer, other = (
        written.model.language_model.layers[1].mlp,
        online.model.language_model.layers[1].mlp,
    )
    assert torch.equal(layer.up_proj.weight_scale, other.up_proj.weight_scale)
    assert torch.equal(layer.up_proj.weight.float(), other.up_proj.weight.float())


def test_a_vision_tower_in_fp8_matches_transformers(fp8_vision_dir):
    ours = VisionLanguagePipeline.load(fp8_vision_dir, dtype="float32", device=DEVICE)
    ours.model.fuse_projections()  # the fused q/k/v of the tower in FP8 too
    tower = ours.model.vision_tower.encoder.layers[0]
    assert isinstance(tower.self_attn.qkv_proj, Fp8Linear) and isinstance(tower.mlp.fc1, Fp8Linear)
    model = Gemma3ForConditionalGeneration.from_pretrained(
        fp8_vision_dir, dtype=torch.float32, attn_implementation="eager"
    )
    hf = model.to(DEVICE).eval(), AutoProcessor.from_pretrained(fp8_vision_dir, backend="pil")
    text, sizes = CASES["two_images"]
    images = [random_image(*size) for size in sizes]
    assert rel_err(logits_of(ours, text, images), hf_logits(hf, text, images)) <= REL_TOL


def test_text_only_fp8_checkpoint(tmp_path):
    source = make_tiny_checkpoint(tmp_path / "text", seed=3, text_only=True)
    fp8_dir = write_fp8_checkpoint(source, tmp_path / "fp8")
    ours = VisionLanguagePipeline.load(fp8_dir, dtype="float32")
    model = Gemma3ForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32).eval()
    text = "A short text-only prompt."
    ids = ours.prepare(text, []).prompt.token_ids
    with torch.inference_mode():
        reference = model(torch.tensor([ids])).logits[0]
    assert rel_err(logits_of(ours, text, []), reference) <= REL_TOL


def test_a_bf16_weight_where_the_config_says_fp8_is_refused(fp8_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for path in fp8_dir.iterdir():
        if path.is_file():
            (broken / path.name).write_bytes(path.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].float()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="up_proj.weight is stored as torch.float32"):
        VisionLanguagePipeline.load(broken, dtype="float32")
