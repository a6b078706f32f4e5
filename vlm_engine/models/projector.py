"""Gemma3 multimodal projector: average-pool the patch grid, RMSNorm, project to the text width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm_engine.config import ImageTokenConfig, VisionConfig
from vlm_engine.kernels.norm import rms_norm


class Gemma3MultiModalProjector(nn.Module):
    def __init__(self, vision: VisionConfig, image_tokens: ImageTokenConfig, text_hidden: int):
        super().__init__()
        self.patches_per_side = vision.patches_per_side
        self.pool = vision.patches_per_side // image_tokens.tokens_per_side
        self.eps = vision.layer_norm_eps
        self.mm_input_projection_weight = nn.Parameter(
            torch.empty(vision.hidden_size, text_hidden), requires_grad=False
        )
        self.mm_soft_emb_norm = nn.Module()
        self.mm_soft_emb_norm.weight = nn.Parameter(
            torch.empty(vision.hidden_size), requires_grad=False
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # patches: [N, side*side, C] -> image embeddings [N, tokens_per_side**2, text_hidden]
        batch, _, channels = patches.shape
        grid = patches.transpose(1, 2).reshape(batch, channels, self.patches_per_side, -1)
        pooled = F.avg_pool2d(grid, self.pool, self.pool).flatten(2).transpose(1, 2)
        normed = rms_norm(pooled, self.mm_soft_emb_norm.weight, self.eps)
        return (normed @ self.mm_input_projection_weight).to(patches.dtype)
