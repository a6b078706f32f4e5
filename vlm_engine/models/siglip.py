"""SigLIP vision tower as Gemma3 uses it: patch embedding, bidirectional encoder, final LayerNorm.

On a GPU the encoder keeps its residual stream in one buffer, without the biases of the
projections that close each sublayer (out_proj, fc2): those projections' GEMMs accumulate onto the
stream (addmm_ with beta = 1, no bias), and each LayerNorm kernel adds the running sum of the
biases left out so far, in float32, to the row it reads. That saves the two residual adds' passes
over [tokens, hidden] and the norms' write-back of a biased stream; the sums round in another
order than `x + f(x)` does. The switch VLM_ENGINE_VISION_FUSED_RESIDUAL (vlm_engine/envs.py) is
read at each call.

On a Hopper GPU in bf16/fp16 the second norm of each layer is also folded into fc1
(kernels/norm_linear.py): a pass that only reads the stream for each row's statistics, then one
GEMM that applies the norm in its epilogue with the bias and GELU, instead of the norm writing a
normalized copy for cuBLAS to read. `fuse_projections` builds the folded weights (gamma-scaled
fc1 weights: 268 MB for so400m in bf16, kept beside the originals, which the other paths use);
the switch VLM_ENGINE_VISION_FOLD_NORMS is read at each call.

FP8 layers (a checkpoint that quantizes the tower, or `quantization="fp8-all"`; models/fp8.py)
run as FP8 GEMMs whose outputs are added to the stream; fc1 keeps its norm unfolded, and the
GELU between fc1 and an FP8 fc2 runs inside fc2's activation quantization (one pass over the
intermediate activation instead of three).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm_engine import envs
from vlm_engine.config import VisionConfig
from vlm_engine.kernels.fp8 import fp8_linear
from vlm_engine.kernels.norm import layer_norm
from vlm_engine.kernels.norm_linear import (
    FoldedNormLinear,
    fold_norm_linear,
    folds_norms,
    norm_linear,
)
from vlm_engine.kernels.platform import runs_on_triton
from vlm_engine.kernels.vision_attention import vision_attention
from vlm_engine.models.fp8 import Fp8Linear
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
        size = channels * p * p
        grid = pixel_values.reshape(batch, channels, height // p, p, width // p, p)
        grid = grid.permute(0, 2, 4, 1, 3, 5)  # [N, rows, cols, channels, p, p]
        weight = conv.weight.reshape(conv.out_channels, size)
        if pixel_values.is_cuda and size % 8:
            # cuBLAS's fast kernels want rows of 16-byte multiples: 3 x 14 x 14 = 588 columns
            # ran ~4x slower than 592 (H100, 32 images), so pad with zero columns
            padded = size + (-size) % 8
            patches = pixel_values.new_empty(*grid.shape[:3], padded)
            patches[..., size:] = 0
            patches[..., :size].view(grid.shape).copy_(grid)
            weight = F.pad(weight, (0, padded - size))
        else:
            patches = grid.reshape(*grid.shape[:3], size)
        embeds = F.linear(patches.flatten(1, 2), weight, conv.bias)
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
        return self.out_proj(self.attend(x))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, P, hidden] -> the heads' outputs before out_proj, [N, P, hidden] contiguous;
        # every patch sees every patch of its own image.
        batch, num_patches, hidden = x.shape
        if self.qkv_proj is not None:  # attention reads q, k, v in place
            return vision_attention(self.qkv_proj(x), self.num_heads)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)

        def heads(t: torch.Tensor) -> torch.Tensor:  # -> [N, heads, P, head_dim]
            return t.view(batch, num_patches, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return out.transpose(1, 2).reshape(batch, num_patches, hidden)

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
        return self.fc2(self.activate(x))

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., hidden] -> gelu_tanh(fc1(x)): [..., intermediate], the input of fc2
        # On a GPU the bias and tanh-GELU run in the GEMM's epilogue (cuBLASLt); that op has no
        # backward, so autograd (training the tower) takes the separate ops below.
        if isinstance(self.fc1, Fp8Linear):
            return F.gelu(self.fc1(x), approximate="tanh")
        if x.is_cuda and not (torch.is_grad_enabled() and self.fc1.weight.requires_grad):
            h = torch._addmm_activation(
                self.fc1.bias, x.flatten(0, -2), self.fc1.weight.t(), use_gelu=True
            )
            return h.view(*x.shape[:-1], -1)
        # (on the CPU, _addmm_activation's GELU is the erf form, not the tanh one)
        return F.gelu(self.fc1(x), approximate="tanh")


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)
        # layer_norm2 folded into fc1, for the fused path: set by SiglipEncoder.fold_norms()
        self.folded_fc1: FoldedNormLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, P, hidden] -> [N, P, hidden], the plain modules (the encoder takes the fused path)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))

    def forward_unbiased_(
        self, x: torch.Tensor, shift1: torch.Tensor, shift2: torch.Tensor, fold: bool = False
    ):
        """The fused GPU path, in place on x ([N, P, hidden], contiguous): the residual stream
        less the biases of the closing projections so far. shift1 ([hidden], float32) is their
        sum before this layer, shift2 that plus out_proj's bias; this layer's out_proj and fc2
        leave their biases out too. `fold`: the second norm runs folded into fc1 (folded_fc1,
        built for shift2)."""
        attn, mlp = self.self_attn, self.mlp
        h = _norm(x, self.layer_norm1, shift1)
        _add_linear_(x, attn.attend(h), attn.out_proj)
        if fold:
            _add_linear_(x, norm_linear(x, self.folded_fc1, gelu=True), mlp.fc2)
        elif isinstance(mlp.fc2, Fp8Linear):  # the GELU runs in fc2's input quantization
            h = mlp.fc1(_norm(x, self.layer_norm2, shift2))
            _add_linear_(x, h, mlp.fc2, input_act="gelu_tanh")
        else:
            _add_linear_(x, mlp.activate(_norm(x, self.layer_norm2, shift2)), mlp.fc2)


def _fuses_residual(x: torch.Tensor) -> bool:
    # The LayerNorm kernel has no backward: where gradients are wanted, the plain modules run.
    return envs.values.vision_fused_residual and runs_on_triton(x) and not x.requires_grad


def _bias_sums(layers) -> torch.Tensor:
    # [2 * len(layers) + 1, hidden] float32: 0, then the running sum of out_proj's and fc2's
    # biases, layer by layer (row 2i: what layer i's first norm adds, 2i + 1: its second norm's)
    biases = [b for layer in layers for b in (layer.self_attn.out_proj.bias, layer.mlp.fc2.bias)]
    return F.pad(torch.stack(biases).float().cumsum(0), (0, 0, 1, 0))


def _norm(x: torch.Tensor, norm: nn.LayerNorm, shift: torch.Tensor) -> torch.Tensor:
    return layer_norm(x, norm.weight, norm.bias, norm.eps, shift)


def _add_linear_(
    x: torch.Tensor, h: torch.Tensor, linear: nn.Module, input_act: str | None = None
) -> None:
    # x [..., out] += h [..., in] @ W^T, accumulated by the GEMM (beta = 1), without the bias;
    # input_act="gelu_tanh" (FP8 layers): the layer's input is gelu_tanh(h)
    rows = h.reshape(-1, h.shape[-1])
    if isinstance(linear, Fp8Linear):  # the FP8 GEMM writes its own output, added after
        out = fp8_linear(rows, linear.weight, linear.weight_scale, input_act=input_act)
        x.view(-1, x.shape[-1]).add_(out)
        return
    if input_act is not None:
        raise ValueError("an input activation is fused into FP8 layers only")
    x.view(-1, x.shape[-1]).addmm_(rows, linear.weight.t())


class SiglipEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, P, hidden], the tower's own residual stream: the fused GPU path updates it in
        place (the tower passes its fresh patch embeddings)."""
        if _fuses_residual(x):
            x, shift = self.forward_unbiased_(x)
            return x.add_(shift)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_unbiased_(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the fused path: -> (x in place, less the biases it left out; their sum, float32)
        sums = _bias_sums(self.layers)
        fold = self._folds(x)
        for i, layer in enumerate(self.layers):
            layer.forward_unbiased_(x, sums[2 * i], sums[2 * i + 1], fold)
        return x, sums[-1]

    def fold_norms(self) -> None:
        """Fold each layer's second norm into its fc1 (with the biases' running sum that the
        fused path's norm adds): a copy of the weights, built again by each call."""
        sums = _bias_sums(self.layers)
        for i, layer in enumerate(self.layers):
            layer.folded_fc1 = fold_norm_linear(layer.layer_norm2, layer.mlp.fc1, sums[2 * i + 1])

    def _folds(self, x: torch.Tensor) -> bool:
        folded = self.layers[0].folded_fc1 if len(self.layers) else None
        return (
            envs.values.vision_fold_norms
            and folded is not None
            and folded.weight.device == x.device
            and folded.weight.dtype == x.dtype
            and folds_norms(x.device, x.dtype)
        )


class SiglipVisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [N, 3, H, W] -> last hidden state [N, num_patches, hidden]
        x = self.embeddings(pixel_values)
        if _fuses_residual(x):
            x, shift = self.encoder.forward_unbiased_(x)
            return _norm(x, self.post_layernorm, shift)
        return self.post_layernorm(self.encoder(x))

    def fuse_projections(self) -> None:
        """Merge each layer's q/k/v; where the fused path folds norms (kernels/norm_linear.py),
        fold the second norms into fc1. Done once after loading (a second call changes nothing);
        after changing weights, call encoder.fold_norms() again."""
        for layer in self.encoder.layers:
            layer.self_attn.fuse_projections()
        weight = self.post_layernorm.weight
        unfolded = any(layer.folded_fc1 is None for layer in self.encoder.layers)
        fp8 = any(isinstance(layer.mlp.fc1, Fp8Linear) for layer in self.encoder.layers)
        if unfolded and not fp8 and folds_norms(weight.device, weight.dtype):
            self.encoder.fold_norms()
