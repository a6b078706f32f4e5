"""SigLIP vision tower as Gemma3 uses it: patch embedding, bidirectional encoder, final LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm_engine.config import VisionConfig
from vlm_engine.kernels.vision_attention import vision_attention
from vlm_engine.models.fusion import fuse_linears


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.patches_per_side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [N, 3, H, W] -> [N, num_patches, hidden], patches in row-major order.
        # The stride-p convolution is a GEMM over the flattened non-overlapping patches; it also
        # leaves the result contiguous (a transposed conv output would make every later add and
        # LayerNorm copy or stride through memory).
        conv = self.patch_embedding
        batch, channels, height, width = pixel_values.shape
        p = conv.kernel_size[0]
        patches = pixel_values.reshape(batch, channels, height // p, p, width // p, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * p * p)
        embeds = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)
        return embeds + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, P, hidden]; every patch sees every patch of its own image.
        batch, num_patches, hidden = x.shape
        if self.qkv_proj is not None:  # attention reads q, k, v in place, writes [N, P, hidden]
            return self.out_proj(vision_attention(self.qkv_proj(x), self.num_heads))
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)

        def heads(t: torch.Tensor) -> torch.Tensor:  # -> [N, heads, P, head_dim]
            return t.view(batch, num_patches, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.out_proj(out.transpose(1, 2).reshape(batch, num_patches, hidden))

    def fuse_projections(self) -> None:
        if self.qkv_proj is not None:
            return
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        self.q_proj = self.k_proj = self.v_proj = None


class SiglipMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # the bias and tanh-GELU run in the GEMM's epilogue (cuBLASLt)
            h = torch._addmm_activation(
                self.fc1.bias, x.flatten(0, -2), self.fc1.weight.t(), use_gelu=True
            )
            return self.fc2(h.view(*x.shape[:-1], -1))
        # (on the CPU, _addmm_activation's GELU is the erf form, not the tanh one)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [N, 3, H, W] -> last hidden state [N, num_patches, hidden]
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))

    def fuse_projections(self) -> None:
        for layer in self.encoder.layers:
            layer.self_attn.fuse_projections()
