"""Gemma3 decoder and the vision-language model around it.

Modules keep the checkpoint's names (`q_proj`, `pre_feedforward_layernorm`, ...) so that weight
loading is a rename of prefixes. Inputs are flat token batches: `[T]` ids with a ForwardContext
that says which sequence each token belongs to and what it may attend to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm_engine.config import ModelConfig, TextConfig
from vlm_engine.errors import InvalidInputError
from vlm_engine.kernels.attention import attention
from vlm_engine.kernels.attention.metadata import ForwardContext
from vlm_engine.kernels.attention_inputs import norm_rope_store
from vlm_engine.kernels.gate_up import GATE_UP_GROUP
from vlm_engine.kernels.linear import linear
from vlm_engine.kernels.norm import post_norm_residual_pre_norm, rms_norm
from vlm_engine.kernels.rotary import Rotary, rope_inv_freq
from vlm_engine.models.fusion import fusable, fuse_linears
from vlm_engine.models.projector import Gemma3MultiModalProjector
from vlm_engine.models.siglip import SiglipVisionTower


class Gemma3RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Gemma3MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return linear(linear(x, self.gate_up_proj, act="gelu_mul"), self.down_proj)
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))

    def fuse_projections(self) -> None:
        # gate and up rows interleaved (kernels/activation.py); an odd width stays unfused
        if self.gate_up_proj is not None or self.gate_proj.out_features % GATE_UP_GROUP:
            return
        if not fusable(self.gate_proj, self.up_proj):
            return
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj, interleave=True)
        self.gate_proj = self.up_proj = None


class Gemma3Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attn_scale
        self.window = config.window(layer_idx)
        hidden, dim = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * dim, hidden, bias=False)
        self.q_norm = Gemma3RMSNorm(dim, config.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(dim, config.rms_norm_eps)
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections()

    def forward(self, x: torch.Tensor, rotary: Rotary, ctx: ForwardContext) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        num_tokens = x.shape[0]
        q, k, v = self._project_qkv(x)  # [T, heads * dim], [T, kv_heads * dim] x 2
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        cache = ctx.kv_caches[self.layer_idx] if ctx.uses_kv_cache else None
        q, k = norm_rope_store(
            q, k, v, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, rotary, cache,
            ctx.slot_mapping if cache is not None else None,
        )  # fmt: skip
        out = attention(q, k, v, ctx, self.layer_idx, self.scale, self.window)
        return linear(out.reshape(num_tokens, self.num_heads * self.head_dim), self.o_proj)

    def _project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return linear(x, self.qkv_proj).split([q_size, kv_size, kv_size], dim=-1)  # strided views

    def fuse_projections(self) -> None:
        if self.qkv_proj is not None or not fusable(self.q_proj, self.k_proj, self.v_proj):
            return
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        self.q_proj = self.k_proj = self.v_proj = None


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = Gemma3Attention(config, layer_idx)
        self.mlp = Gemma3MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = Gemma3RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = Gemma3RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(config.hidden_size, eps)

    def forward(
        self,
        residual: torch.Tensor,
        normed: torch.Tensor,
        rotary: Rotary,
        ctx: ForwardContext,
        next_norm: Gemma3RMSNorm,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # residual: the stream entering the layer; normed: its input_layernorm, computed by the
        # previous layer's last fused step. Returns the stream leaving the layer and next_norm of
        # it (the next layer's input_layernorm, or the final norm after the last layer).
        h = self.self_attn(normed, rotary, ctx)
        # residual + post_norm(h), then the following pre-norm of that: one kernel on a GPU
        residual, h = post_norm_residual_pre_norm(
            h, residual, self.post_attention_layernorm.weight,
            self.pre_feedforward_layernorm.weight, self.post_attention_layernorm.eps,
        )  # fmt: skip
        return post_norm_residual_pre_norm(
            self.mlp(h), residual, self.post_feedforward_layernorm.weight, next_norm.weight,
            self.post_feedforward_layernorm.eps,
        )  # fmt: skip


class Gemma3TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = Gemma3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.inv_freq: dict[str, torch.Tensor] = {}
        self.embed_scale: torch.Tensor | None = None

    def init_rope(self, device: torch.device) -> None:
        """Device constants, made once after loading (a forward must not copy from the host:
        decode steps are replayed from CUDA graphs)."""
        self.inv_freq = {
            layer_type: rope_inv_freq(self.config.head_dim, rope.theta, rope.scaling_factor, device)
            for layer_type, rope in self.config.rope.items()
        }
        # Gemma scales embeddings by sqrt(hidden), the scale rounded to the weight dtype first.
        scale = torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32)
        self.embed_scale = scale.to(self.embed_tokens.weight.dtype).to(device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale

    def forward(self, inputs_embeds: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # inputs_embeds: [T, hidden] -> final-normed hidden states [T, hidden]
        rotary = {kind: Rotary(ctx.positions, inv_freq) for kind, inv_freq in self.inv_freq.items()}
        norms = [*(layer.input_layernorm for layer in self.layers), self.norm]
        residual, normed = inputs_embeds, norms[0](inputs_embeds)
        for layer, next_norm in zip(self.layers, norms[1:], strict=True):
            residual, normed = layer(residual, normed, rotary[layer.layer_type], ctx, next_norm)
        return normed


class Gemma3Model(nn.Module):
    """Gemma3 language model with an optional SigLIP tower and projector (text-only checkpoints)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = Gemma3TextModel(config.text)
        self.vision_tower = None
        self.multi_modal_projector = None
        if config.is_multimodal:
            self.vision_tower = SiglipVisionTower(config.vision)
            self.multi_modal_projector = Gemma3MultiModalProjector(
                config.vision, config.image_tokens, config.text.hidden_size
            )
        if not config.text.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def fuse_projections(self) -> None:
        """Merge q/k/v and gate/up (and the vision tower's q/k/v) into single GEMMs: done once
        after loading, since checkpoints and the loader keep the projections apart."""
        for layer in self.language_model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        if self.vision_tower is not None:
            self.vision_tower.fuse_projections()

    @torch.inference_mode()
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [N, 3, H, W] (one row per image or crop) -> [N, mm_tokens_per_image, hidden]
        if self.vision_tower is None:
            raise InvalidInputError("this checkpoint is text-only: it cannot take images")
        dtype = self.language_model.embed_tokens.weight.dtype
        patches = self.vision_tower(pixel_values.to(dtype))
        return self.multi_modal_projector(patches)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        ctx: ForwardContext,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # input_ids: [T]  image_mask: the rows that take image_embeds, as a [T] bool mask or as
        # int64 row indices (what the runner passes: no device sync to count or find them)
        # image_embeds: [rows, hidden] in token order -> hidden states [T, hidden]
        return self.language_model(self.embed_inputs(input_ids, image_embeds, image_mask), ctx)

    def embed_inputs(self, input_ids, image_embeds, image_mask) -> torch.Tensor:
        """Token embeddings [T, hidden] with the image rows taken from `image_embeds`."""
        image = self.config.image_tokens
        if image is not None and image.image_token_id >= self.config.text.vocab_size:
            # transformers embeds an out-of-vocabulary image token id as the pad token
            input_ids = input_ids.masked_fill(input_ids == image.image_token_id, 0)
        embeds = self.language_model.embed(input_ids)
        if image_embeds is None:
            return embeds
        is_mask = image_mask is not None and image_mask.dtype == torch.bool
        rows = None if image_mask is None else int(image_mask.sum()) if is_mask else len(image_mask)
        if rows != image_embeds.shape[0]:
            raise InvalidInputError("image_embeds needs an image_mask with one row per embedding")
        # Image rows take the vision embeddings as they are: they are not scaled by sqrt(hidden).
        if is_mask:
            embeds[image_mask] = image_embeds.to(embeds.dtype)
        else:
            embeds.index_copy_(0, image_mask, image_embeds.to(embeds.dtype))
        return embeds

    @torch.inference_mode()
    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [N, hidden] -> logits [N, vocab]
        # a decode step of a few tokens streams the 262k-row head through the skinny kernel
        if self.config.text.tie_word_embeddings:
            return linear(hidden_states, self.language_model.embed_tokens)
        return linear(hidden_states, self.lm_head)
