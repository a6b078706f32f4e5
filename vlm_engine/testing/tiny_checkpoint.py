"""Tiny, random-weight, complete HF-layout Gemma3 checkpoints for tests and benchmarks.

``make_tiny_checkpoint(path)`` writes what a Hub Gemma3 directory holds (config.json in the legacy
Hub style, safetensors weights, tokenizer, chat template, processor configs, generation config) at
a size that runs in milliseconds on a CPU. Weights come from the spec alone (names and shapes are
written out here, not taken from an HF model) and a local ``torch.Generator``: one seed, one set of
tensors. Scales keep activations O(1) through every layer so greedy choices depend on the input.

    python -m vlm_engine.testing.tiny_checkpoint OUT_DIR [--seed N] [--text-only] [--layout old]
"""

import argparse
import dataclasses
import json
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlm_engine.testing.tokenizer import TOKEN_IDS, write_tokenizer_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYER_TYPES = ("sliding_attention", "full_attention")
NORM_WEIGHT_STD = 0.3  # RMSNorm applies (1 + w): w ~ N(0, 0.3²) keeps every norm visibly active
BIAS_STD = 0.1
VISION_POSITION_STD = 0.2
PADDED_ROW_SCALE = 0.1  # vocab rows past the tokenizer: small, so greedy decoding rarely picks them
# Name prefixes of (text decoder, vision tower, projector) in each layout; text-only uses "model.".
WEIGHT_PREFIXES = {
    "new": (
        "model.language_model.",
        "model.vision_tower.vision_model.",
        "model.multi_modal_projector.",
    ),
    "old": ("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector."),
}


@dataclass(frozen=True)
class TinySpec:
    """Sizes and file options of a tiny Gemma3 checkpoint. Defaults: both layer kinds, GQA,
    query_pre_attn_scalar != head_dim, 8x8 patches pooled to 16 image tokens."""

    text_only: bool = False
    layout: str = "new"  # "new": model.language_model.*; "old": language_model.model.*
    dtype: str = "float32"
    max_shard_bytes: int | None = None  # None: one model.safetensors; else shards plus an index
    vocab_multiple: int = 64
    vocab_size: int | None = None  # pad the vocabulary to this size (e.g. 262208 for real shapes)
    write_weights: bool = True  # False: config, tokenizer and processor files only (for
    # Engine(load_format="dummy") benchmarks of real-size shapes)
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    query_pre_attn_scalar: int = 24
    sliding_window: int = 16
    sliding_window_pattern: int = 2  # every 2nd layer is full attention (written as legacy field)
    layer_types: tuple[str, ...] | None = None  # explicit layer kinds; overrides the pattern
    rope_theta: float = 1_000_000.0
    rope_scaling_factor: float | None = 8.0  # linear scaling on full-attention layers
    rope_local_base_freq: float = 10_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_num_hidden_layers: int = 2
    vision_num_attention_heads: int = 2
    image_size: int = 32
    patch_size: int = 4
    mm_tokens_per_image: int = 16
    vision_layer_norm_eps: float = 1e-6
    do_pan_and_scan: bool | None = None
    pan_and_scan_min_crop_size: int = 8
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) in (int, float) and value <= 0:
                raise ValueError(f"{field.name} must be positive, got {value}")
        side, layer_types = math.isqrt(self.mm_tokens_per_image), self.resolved_layer_types()
        problems = [
            (self.layout not in WEIGHT_PREFIXES, f"layout must be one of {tuple(WEIGHT_PREFIXES)}"),
            (self.dtype not in DTYPES, f"dtype must be one of {tuple(DTYPES)}"),
            (self.hidden_size % self.num_attention_heads, "heads must divide hidden_size"),
            (self.num_attention_heads % self.num_key_value_heads, "kv heads must divide heads"),
            (self.vision_hidden_size % self.vision_num_attention_heads, "vision heads must divide"),
            (self.image_size % self.patch_size, "patch_size must divide image_size"),
            (side**2 != self.mm_tokens_per_image, "mm_tokens_per_image must be a square"),
            (self.patches_per_side % side, "its root must divide image_size / patch_size"),
            (len(layer_types) != self.num_hidden_layers, "need one layer type per layer"),
            (not set(layer_types) <= set(LAYER_TYPES), f"layer types are {LAYER_TYPES}"),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(f"invalid TinySpec: {message}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def resolved_layer_types(self) -> tuple[str, ...]:
        if self.layer_types is not None:
            return self.layer_types
        pattern = self.sliding_window_pattern
        return tuple(LAYER_TYPES[(i + 1) % pattern == 0] for i in range(self.num_hidden_layers))


def make_tiny_checkpoint(
    path: str | Path, *, seed: int = 0, spec: TinySpec | None = None, **overrides: object
) -> Path:
    """Write a complete tiny checkpoint into ``path`` (created if missing) and return it.

    ``overrides`` replace fields of ``spec`` (default ``TinySpec()``); unknown names raise TypeError.
    """
    spec = dataclasses.replace(spec or TinySpec(), **overrides)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer_files(path, model_max_length=spec.max_position_embeddings)
    vocab_size = -(-tokenizer.get_vocab_size() // spec.vocab_multiple) * spec.vocab_multiple
    vocab_size = max(vocab_size, spec.vocab_size or 0)
    if spec.write_weights:
        tensors = dict(_named_weights(spec, vocab_size, tokenizer.get_vocab_size(), seed))
        _write_weights(path, tensors, spec.max_shard_bytes)
    _write_json(path / "config.json", _model_config(spec, vocab_size))
    eos_ids = [TOKEN_IDS.eos, TOKEN_IDS.end_of_turn]
    generation = dict(bos_token_id=TOKEN_IDS.bos, eos_token_id=eos_ids, pad_token_id=TOKEN_IDS.pad)
    _write_json(path / "generation_config.json", generation)
    if not spec.text_only:
        _write_json(path / "preprocessor_config.json", _preprocessor_config(spec))
        processor = dict(
            processor_class="Gemma3Processor", image_seq_length=spec.mm_tokens_per_image
        )
        _write_json(path / "processor_config.json", processor)
    return path


# (1 + w) ~ 4 on the residual branches and the final norm, and small embeddings: the layers'
# outputs outweigh the input embedding in the residual stream, so a random model does not just
# repeat its last token (tied embeddings favour it), while the logits keep an O(1) spread.
POST_NORM_MEAN = 3.0
EMBED_STD = 0.3


class _Sampler:
    """Draws every tensor from one local generator, in float32, then casts to the checkpoint dtype."""

    def __init__(self, seed: int, dtype: torch.dtype):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def normal(self, *shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        values = torch.randn(shape, generator=self.generator, dtype=torch.float32) * std + mean
        return values.to(self.dtype)

    def linear(self, out_features: int, in_features: int) -> torch.Tensor:
        # N(0, 1/fan_in): a layer keeps the scale of its input.
        return self.normal(out_features, in_features, std=in_features**-0.5)

    def norm(self, size: int, mean: float = 0.0) -> torch.Tensor:
        return self.normal(size, std=NORM_WEIGHT_STD, mean=mean)


def _named_weights(
    spec: TinySpec, vocab_size: int, num_tokens: int, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    sample = _Sampler(seed, DTYPES[spec.dtype])
    text, vision, projector = ("model.", "", "") if spec.text_only else WEIGHT_PREFIXES[spec.layout]
    # The model scales embeddings by sqrt(hidden): std EMBED_STD/sqrt(hidden) makes them O(0.3).
    embed = sample.normal(vocab_size, spec.hidden_size, std=EMBED_STD * spec.hidden_size**-0.5)
    embed[num_tokens:] *= PADDED_ROW_SCALE
    yield text + "embed_tokens.weight", embed
    for name, tensor in _decoder_layer_weights(spec, sample):
        yield text + name, tensor
    yield text + "norm.weight", sample.norm(spec.hidden_size, mean=POST_NORM_MEAN)
    if spec.text_only:
        return
    for name, tensor in _vision_weights(spec, sample):
        yield vision + name, tensor
    yield projector + "mm_soft_emb_norm.weight", sample.norm(spec.vision_hidden_size)
    # Stored [vision_hidden, text_hidden] and applied as x @ W: the fan-in is vision_hidden.
    weight = sample.linear(spec.hidden_size, spec.vision_hidden_size).T.contiguous()
    yield projector + "mm_input_projection_weight", weight


def _decoder_layer_weights(spec: TinySpec, sample: _Sampler) -> Iterator[tuple[str, torch.Tensor]]:
    hidden, head_dim, mlp = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q_size, kv_size = spec.num_attention_heads * head_dim, spec.num_key_value_heads * head_dim
    for i in range(spec.num_hidden_layers):
        layer = f"layers.{i}."
        yield layer + "self_attn.q_proj.weight", sample.linear(q_size, hidden)
        yield layer + "self_attn.k_proj.weight", sample.linear(kv_size, hidden)
        yield layer + "self_attn.v_proj.weight", sample.linear(kv_size, hidden)
        yield layer + "self_attn.o_proj.weight", sample.linear(hidden, q_size)
        yield layer + "self_attn.q_norm.weight", sample.norm(head_dim)
        yield layer + "self_attn.k_norm.weight", sample.norm(head_dim)
        yield layer + "mlp.gate_proj.weight", sample.linear(mlp, hidden)
        yield layer + "mlp.up_proj.weight", sample.linear(mlp, hidden)
        yield layer + "mlp.down_proj.weight", sample.linear(hidden, mlp)
        for norm in ("input", "pre_feedforward"):
            yield layer + f"{norm}_layernorm.weight", sample.norm(hidden)
        for norm in ("post_attention", "post_feedforward"):
            yield layer + f"{norm}_layernorm.weight", sample.norm(hidden, mean=POST_NORM_MEAN)


def _vision_weights(spec: TinySpec, sample: _Sampler) -> Iterator[tuple[str, torch.Tensor]]:
    width, patch, mlp = spec.vision_hidden_size, spec.patch_size, spec.vision_intermediate_size

    def layer_norm(prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        # LayerNorm applies w itself (not 1 + w): centre the random weights on one.
        yield prefix + ".weight", sample.normal(width, std=NORM_WEIGHT_STD, mean=1.0)
        yield prefix + ".bias", sample.normal(width, std=BIAS_STD)

    def dense(prefix: str, out_size: int, in_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield prefix + ".weight", sample.linear(out_size, in_size)
        yield prefix + ".bias", sample.normal(out_size, std=BIAS_STD)

    patch_weight = sample.linear(width, 3 * patch * patch).reshape(width, 3, patch, patch)
    yield "embeddings.patch_embedding.weight", patch_weight
    yield "embeddings.patch_embedding.bias", sample.normal(width, std=BIAS_STD)
    positions = sample.normal(spec.patches_per_side**2, width, std=VISION_POSITION_STD)
    yield "embeddings.position_embedding.weight", positions
    for i in range(spec.vision_num_hidden_layers):
        layer = f"encoder.layers.{i}."
        yield from layer_norm(layer + "layer_norm1")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from dense(layer + "self_attn." + proj, width, width)
        yield from layer_norm(layer + "layer_norm2")
        yield from dense(layer + "mlp.fc1", mlp, width)
        yield from dense(layer + "mlp.fc2", width, mlp)
    yield from layer_norm("post_layernorm")


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], max_shard: int | None) -> None:
    metadata = {"format": "pt"}
    if max_shard is None:
        save_file(tensors, str(path / "model.safetensors"), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    _write_json(path / "model.safetensors.index.json", index)


def _text_config(spec: TinySpec, vocab_size: int) -> dict:
    # Legacy Hub field names on purpose (rope_scaling, rope_theta, rope_local_base_freq,
    # sliding_window_pattern, torch_dtype): transformers converts them; our loader must too.
    config = {
        "model_type": "gemma3_text",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "query_pre_attn_scalar": spec.query_pre_attn_scalar,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": spec.max_position_embeddings,
        "sliding_window": spec.sliding_window,
        "rope_theta": spec.rope_theta,
        "rope_local_base_freq": spec.rope_local_base_freq,
        "rope_scaling": None,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "pad_token_id": TOKEN_IDS.pad,
        "bos_token_id": TOKEN_IDS.bos,
        "eos_token_id": TOKEN_IDS.eos,
        "torch_dtype": spec.dtype,
    }
    if spec.rope_scaling_factor is not None:
        config["rope_scaling"] = {"rope_type": "linear", "factor": spec.rope_scaling_factor}
    if spec.layer_types is not None:
        config["layer_types"] = list(spec.layer_types)
    else:
        config["sliding_window_pattern"] = spec.sliding_window_pattern
    return config


def _model_config(spec: TinySpec, vocab_size: int) -> dict:
    eos_ids = [TOKEN_IDS.eos, TOKEN_IDS.end_of_turn]
    if spec.text_only:
        config = _text_config(spec, vocab_size)
        return {"architectures": ["Gemma3ForCausalLM"], **config, "eos_token_id": eos_ids}
    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size,
        "num_hidden_layers": spec.vision_num_hidden_layers,
        "num_attention_heads": spec.vision_num_attention_heads,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "layer_norm_eps": spec.vision_layer_norm_eps,
        "hidden_act": "gelu_pytorch_tanh",
        "vision_use_head": False,
    }
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": _text_config(spec, vocab_size),
        "vision_config": vision_config,
        "boi_token_index": TOKEN_IDS.boi,
        "eoi_token_index": TOKEN_IDS.eoi,
        "image_token_index": TOKEN_IDS.image,
        "mm_tokens_per_image": spec.mm_tokens_per_image,
        "eos_token_id": eos_ids,
        "tie_word_embeddings": True,
        "torch_dtype": spec.dtype,
    }


def _preprocessor_config(spec: TinySpec) -> dict:
    return {
        "image_processor_type": "Gemma3ImageProcessor",
        "processor_class": "Gemma3Processor",
        "image_seq_length": spec.mm_tokens_per_image,
        "size": {"height": spec.image_size, "width": spec.image_size},
        "resample": 2,  # bilinear
        "rescale_factor": 1 / 255,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_pan_and_scan": spec.do_pan_and_scan,
        "pan_and_scan_min_crop_size": spec.pan_and_scan_min_crop_size,
        "pan_and_scan_max_num_crops": spec.pan_and_scan_max_num_crops,
        "pan_and_scan_min_ratio_to_activate": spec.pan_and_scan_min_ratio_to_activate,
    }


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _parse_cli_value(kind: object, text: str) -> object:
    if text.lower() == "none":
        return None
    for option in typing.get_args(kind) or (kind,):
        if option is bool:
            return text.lower() in ("1", "true", "yes")
        if typing.get_origin(option) is tuple:
            return tuple(part.strip() for part in text.split(","))
        if option in (int, float, str):
            return option(text)
    raise ValueError(f"cannot parse {text!r} as {kind}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight Gemma3 checkpoint.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    kinds = {field.name: field.type for field in dataclasses.fields(TinySpec)}
    for field in dataclasses.fields(TinySpec):
        flag, hint = "--" + field.name.replace("_", "-"), f"default: {field.default}"
        if field.type is bool:
            parser.add_argument(
                flag, action="store_const", const="true", dest=field.name, help=hint
            )
        else:
            parser.add_argument(flag, dest=field.name, metavar="VALUE", help=hint)
    args = vars(parser.parse_args(argv))
    out_dir, seed = args.pop("out_dir"), args.pop("seed")
    overrides = {k: _parse_cli_value(kinds[k], v) for k, v in args.items() if v is not None}
    path = make_tiny_checkpoint(out_dir, seed=seed, **overrides)
    print(f"wrote tiny Gemma3 checkpoint to {path}")


if __name__ == "__main__":
    main()
