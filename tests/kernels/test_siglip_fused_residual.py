"""The SigLIP tower's fused residual path (a residual stream without the closing projections'
biases, GEMMs that accumulate onto it, LayerNorm kernels that add the biases' running sum) against
its plain modules.

Without CUDA the fused path is forced on the CPU and its LayerNorm kernel runs on Triton's
interpreter (the `interpret` fixture of conftest.py); with CUDA the tower runs natively. Both in
float32, where the two paths differ only in the order of the residual sums.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vlm_engine import envs  # noqa: E402
from vlm_engine.config import VisionConfig  # noqa: E402
from vlm_engine.kernels import norm, triton_norm, triton_norm_linear  # noqa: E402
from vlm_engine.models import siglip  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# hidden 72 (3 heads of 24) and 136: widths that are not powers of two, as SigLIP's 1152 / 4304
CONFIG = VisionConfig(
    hidden_size=72,
    intermediate_size=136,
    num_hidden_layers=3,
    num_attention_heads=3,
    image_size=56,
    patch_size=14,
)
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def norm_calls(interpret, monkeypatch) -> list:
    """The LayerNorm kernel's calls; without CUDA the fused path is switched on for CPU tensors."""
    if not CUDA:
        interpret(triton_norm)
        monkeypatch.setattr(siglip, "runs_on_triton", lambda x: True)
        monkeypatch.setattr(norm, "runs_on_triton", lambda x: True)
    calls = []
    kernel = triton_norm.layer_norm

    def spy(x, *args, **kwargs):
        calls.append(x.shape)
        return kernel(x, *args, **kwargs)

    monkeypatch.setattr(triton_norm, "layer_norm", spy)
    return calls


def make_tower(seed: int) -> siglip.SiglipVisionTower:
    # random weights everywhere (LayerNorm weights around 1, every bias nonzero)
    torch.manual_seed(seed)
    tower = siglip.SiglipVisionTower(CONFIG)
    with torch.no_grad():
        for name, param in tower.named_parameters():
            shift = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            param.copy_(torch.randn(param.shape) * 0.2 + shift)
    return tower.to(DEVICE).requires_grad_(False)


def run_tower(tower, pixels, monkeypatch, *, fused: bool) -> torch.Tensor:
    monkeypatch.setattr(envs.values, "vision_fused_residual", fused)
    with torch.inference_mode():
        return tower(pixels)


@pytest.mark.parametrize("fuse_projections", [False, True], ids=["q-k-v", "qkv"])
def test_fused_residual_matches_the_plain_layers(norm_calls, monkeypatch, fuse_projections):
    tower = make_tower(seed=0)
    if fuse_projections:
        tower.fuse_projections()
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, CONFIG.image_size, CONFIG.image_size, generator=gen).to(DEVICE)
    before = pixels.clone()

    plain = run_tower(tower, pixels, monkeypatch, fused=False)
    assert norm_calls == []
    fused = run_tower(tower, pixels, monkeypatch, fused=True)
    num_patches = (CONFIG.image_size // CONFIG.patch_size) ** 2
    # two norms a layer and the final one, each adding the biases left out so far
    expected_calls = 2 * CONFIG.num_hidden_layers + 1
    assert norm_calls == [(2, num_patches, CONFIG.hidden_size)] * expected_calls
    torch.testing.assert_close(fused, plain, **TOLERANCE)
    assert torch.equal(pixels, before)


@pytest.mark.parametrize("fuse_projections", [False, True], ids=["q-k-v", "qkv"])
def test_norms_folded_into_fc1_match_the_plain_layers(
    norm_calls, interpret, monkeypatch, fuse_projections
):
    # Each layer's second norm folded into fc1 (kernels/norm_linear.py), forced on here: on the
    # GPU it runs for bf16/fp16 on Hopper only; without CUDA its kernels are interpreted.
    if not CUDA:
        interpret(triton_norm_linear)
    monkeypatch.setattr(siglip, "folds_norms", lambda device, dtype: True)
    tower = make_tower(seed=7)
    if fuse_projections:
        tower.fuse_projections()  # folds too, where folds_norms says so
    else:
        tower.encoder.fold_norms()
    folds = [layer.folded_fc1 for layer in tower.encoder.layers]
    assert all(fold is not None for fold in folds)
    tower.fuse_projections()  # a second call keeps the folds it finds (no second copy)
    assert all(layer.folded_fc1 is f for layer, f in zip(tower.encoder.layers, folds, strict=True))
    gen = torch.Generator().manual_seed(8)
    pixels = torch.randn(2, 3, CONFIG.image_size, CONFIG.image_size, generator=gen).to(DEVICE)
    plain = run_tower(tower, pixels, monkeypatch, fused=False)
    stats_calls = []
    stats = triton_norm.layer_norm_stats
    monkeypatch.setattr(
        triton_norm, "layer_norm_stats", lambda x, *a: stats_calls.append(x.shape) or stats(x, *a)
    )
    folded = run_tower(tower, pixels, monkeypatch, fused=True)
    num_patches = (CONFIG.image_size // CONFIG.patch_size) ** 2
    # the first norm of each layer and the final one stay; the second norms only read statistics
    assert len(norm_calls) == CONFIG.num_hidden_layers + 1
    assert stats_calls == [(2 * num_patches, CONFIG.hidden_size)] * CONFIG.num_hidden_layers
    torch.testing.assert_close(folded, plain, **TOLERANCE)
    monkeypatch.setattr(envs.values, "vision_fold_norms", False)  # the switch for A/B runs
    norm_calls.clear()
    torch.testing.assert_close(
        run_tower(tower, pixels, monkeypatch, fused=True), plain, **TOLERANCE
    )
    assert len(norm_calls) == 2 * CONFIG.num_hidden_layers + 1


def test_fused_encoder_adds_the_biases_it_left_out(norm_calls, monkeypatch):
    # The encoder alone (no final norm to take the biases' sum) returns the full residual stream.
    tower = make_tower(seed=5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, CONFIG.hidden_size, generator=gen).to(DEVICE)
    monkeypatch.setattr(envs.values, "vision_fused_residual", False)
    with torch.inference_mode():
        plain = tower.encoder(x.clone())
    monkeypatch.setattr(envs.values, "vision_fused_residual", True)
    with torch.inference_mode():
        fused = tower.encoder(x.clone())
    assert len(norm_calls) == 2 * CONFIG.num_hidden_layers
    torch.testing.assert_close(fused, plain, **TOLERANCE)


def test_fused_residual_leaves_the_weights_as_they_were(norm_calls, monkeypatch):
    # Only the residual stream is written in place: a second call gives the same result.
    tower = make_tower(seed=2)
    weights = {name: t.clone() for name, t in tower.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(1, 3, CONFIG.image_size, CONFIG.image_size, generator=gen).to(DEVICE)
    first = run_tower(tower, pixels, monkeypatch, fused=True)
    assert norm_calls, "the fused path did not run"
    for name, t in tower.state_dict().items():
        assert torch.equal(t, weights[name]), name
    assert torch.equal(run_tower(tower, pixels, monkeypatch, fused=True), first)


def test_layers_keep_autograd_where_gradients_are_wanted(norm_calls, monkeypatch):
    # The LayerNorm kernel has no backward: with trainable weights the plain modules run.
    monkeypatch.setattr(envs.values, "vision_fused_residual", True)
    tower = make_tower(seed=4).requires_grad_(True)
    pixels = torch.randn(1, 3, CONFIG.image_size, CONFIG.image_size, device=DEVICE)
    tower(pixels).sum().backward()
    assert norm_calls == []
    assert tower.encoder.layers[0].layer_norm1.weight.grad is not None


def test_fp8_layers_on_the_fused_path_match_the_plain_layers(norm_calls, monkeypatch):
    """Every linear layer of the tower in FP8 (quantization="fp8-all"): the fused path adds the FP8
    GEMMs' outputs to the stream and applies fc2's GELU inside its input quantization."""
    from vlm_engine.models.fp8 import Fp8Linear, quantize_layers

    tower = make_tower(seed=4)
    names = [n for n, m in tower.named_modules() if isinstance(m, torch.nn.Linear)]
    quantize_layers(tower, names)
    tower.fuse_projections()
    assert isinstance(tower.encoder.layers[0].mlp.fc2, Fp8Linear)
    gen = torch.Generator().manual_seed(5)
    pixels = torch.randn(2, 3, CONFIG.image_size, CONFIG.image_size, generator=gen).to(DEVICE)
    plain = run_tower(tower, pixels, monkeypatch, fused=False)
    fused = run_tower(tower, pixels, monkeypatch, fused=True)
    assert len(norm_calls) == 2 * CONFIG.num_hidden_layers + 1
    # float8 rounding of the activations can flip where the float32 sums differ in their last
    # bits; a missing or doubled GELU would be off by far more
    error = (fused - plain).abs().max() / plain.abs().max()
    assert error < 1e-2, f"relative error {error:.2e}"
