"""Fused projections (q/k/v, gate/up, the tower's q/k/v) compute what the separate ones do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm_engine.config import ModelConfig
from vlm_engine.kernels.attention.metadata import ForwardContext
from vlm_engine.models.fusion import fuse_linears
from vlm_engine.models.loader import load_model
from vlm_engine.testing import make_tiny_checkpoint

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def test_fuse_linears_concatenates_outputs():
    gen = torch.Generator().manual_seed(0)
    linears = [nn.Linear(8, n) for n in (4, 2, 2)]
    for lin in linears:
        lin.weight.data = torch.randn(lin.weight.shape, generator=gen)
        lin.bias.data = torch.randn(lin.bias.shape, generator=gen)
    x = torch.randn(3, 8, generator=gen)
    fused = fuse_linears(*linears)
    torch.testing.assert_close(fused(x), torch.cat([lin(x) for lin in linears], -1), **TOLERANCE)
    with pytest.raises(ValueError, match="same input"):
        fuse_linears(nn.Linear(8, 2), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="bias"):
        fuse_linears(nn.Linear(8, 2), nn.Linear(8, 2, bias=False))


def test_fused_model_matches_the_unfused_one(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m", seed=3)
    config = ModelConfig.from_hf(path)
    plain, fused = load_model(config, path), load_model(config, path)
    fused.fuse_projections()
    fused.fuse_projections()  # idempotent
    layer = fused.language_model.layers[0]
    assert layer.self_attn.q_proj is None and layer.mlp.gate_proj is None
    assert fused.vision_tower.encoder.layers[0].self_attn.qkv_proj is not None

    gen = torch.Generator().manual_seed(1)
    size = config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=gen)
    torch.testing.assert_close(fused.embed_images(pixels), plain.embed_images(pixels), **TOLERANCE)
    ids = torch.randint(0, config.text.vocab_size, (2, 11), generator=gen)
    ctx = ForwardContext.full_sequences([11, 11])
    torch.testing.assert_close(fused(ids.flatten(), ctx), plain(ids.flatten(), ctx), **TOLERANCE)
