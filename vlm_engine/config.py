"""Model configuration: frozen dataclasses read once from an HF checkpoint's config.json.

Model code reads these, never HF config objects. Defaults for fields a config.json may omit are
the ones transformers applies to Gemma3 (real Gemma3 configs list only what differs from them);
the fields that define a model's size have no default and must be present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_engine.errors import ConfigError, UnsupportedModelError
from vlm_engine.quant_config import Fp8Config, read_quantization_config

SLIDING = "sliding_attention"
FULL = "full_attention"

MULTIMODAL_ARCH = "Gemma3ForConditionalGeneration"
TEXT_ARCH = "Gemma3ForCausalLM"

_TEXT_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers")
_VISION_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
)
_SUPPORTED_ROPE = ("default", "linear")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type: neox style, optional linear position scaling."""

    theta: float
    scaling_factor: float = 1.0  # linear scaling divides the inverse frequencies by this


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope: dict[str, RopeConfig]  # keyed by layer type
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    tie_word_embeddings: bool = True
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "sliding_window",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"text_config.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config.num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"text_config.layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            raise UnsupportedModelError(
                f"text_config.layer_types: unsupported layer types {unknown}"
            )
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise UnsupportedModelError(
                f"text_config.hidden_activation {self.hidden_activation!r} is not supported "
                "(Gemma3 uses 'gelu_pytorch_tanh')"
            )

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def attn_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    def window(self, layer_idx: int) -> int | None:
        """Sliding window of a layer (a token sees the last `window` positions), None for full."""
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING else None


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (no pooling head: Gemma3 uses the last hidden state)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config.hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision_config.image_size ({self.image_size}) is not a multiple of "
                f"patch_size ({self.patch_size})"
            )
        if self.hidden_act != "gelu_pytorch_tanh":
            raise UnsupportedModelError(
                f"vision_config.hidden_act {self.hidden_act!r} is not supported"
            )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ImageTokenConfig:
    """How images appear in the token stream: `\\n\\n <boi> <image>*mm_tokens_per_image <eoi> \\n\\n`."""

    mm_tokens_per_image: int
    boi_token_id: int
    eoi_token_id: int
    image_token_id: int

    @property
    def tokens_per_side(self) -> int:
        return round(self.mm_tokens_per_image**0.5)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    text: TextConfig
    vision: VisionConfig | None
    image_tokens: ImageTokenConfig | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int
    checkpoint_dtype: str | None = None
    quantization: Fp8Config | None = None  # what the checkpoint's weights are stored as
    checkpoint_dir: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if (self.vision is None) != (self.image_tokens is None):
            raise ConfigError("vision and image_tokens configs must both be present or both absent")
        if self.vision is not None:
            side = self.image_tokens.tokens_per_side
            if side * side != self.image_tokens.mm_tokens_per_image:
                raise ConfigError(
                    f"mm_tokens_per_image ({self.image_tokens.mm_tokens_per_image}) "
                    "is not a square number"
                )
            if self.vision.patches_per_side % side:
                raise ConfigError(
                    f"{self.vision.patches_per_side} patches per side cannot be "
                    f"average-pooled to {side} tokens per side"
                )

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @classmethod
    def from_hf(cls, checkpoint_dir: str | Path) -> ModelConfig:
        """Read `config.json` (and `generation_config.json` for EOS ids) of an HF checkpoint."""
        checkpoint_dir = Path(checkpoint_dir)
        raw = _read_json(checkpoint_dir / "config.json")
        config = cls.from_dict(raw)
        gen_path = checkpoint_dir / "generation_config.json"
        eos = config.eos_token_ids
        if gen_path.is_file():
            eos = _merge_ids(eos, _read_json(gen_path).get("eos_token_id"))
        return cls(**{**config.__dict__, "eos_token_ids": eos, "checkpoint_dir": checkpoint_dir})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        arch = _architecture(raw)
        if arch == TEXT_ARCH:
            text_raw, vision, image_tokens = raw, None, None
        else:
            text_raw = _sub_config(raw, "text_config")
            vision = _vision_config(_sub_config(raw, "vision_config"))
            image_tokens = ImageTokenConfig(
                mm_tokens_per_image=int(raw.get("mm_tokens_per_image", 256)),
                boi_token_id=int(raw.get("boi_token_index", 255_999)),
                eoi_token_id=int(raw.get("eoi_token_index", 256_000)),
                image_token_id=int(raw.get("image_token_index", 262_144)),
            )
        text = _text_config(text_raw)
        eos = _merge_ids((), raw.get("eos_token_id", text_raw.get("eos_token_id", 1)))
        return cls(
            architecture=arch,
            text=text,
            vision=vision,
            image_tokens=image_tokens,
            eos_token_ids=eos,
            bos_token_id=int(text_raw.get("bos_token_id", 2)),
            checkpoint_dtype=raw.get("dtype", raw.get("torch_dtype")),
            quantization=read_quantization_config(raw),
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} not found: not an HF checkpoint directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if MULTIMODAL_ARCH in archs or (not archs and model_type == "gemma3"):
        return MULTIMODAL_ARCH
    if TEXT_ARCH in archs or (not archs and model_type == "gemma3_text"):
        return TEXT_ARCH
    if not archs and model_type is None:
        raise ConfigError("config.json names neither 'architectures' nor 'model_type'")
    raise UnsupportedModelError(
        f"unsupported architecture {archs or model_type}: vlm_engine supports "
        f"{MULTIMODAL_ARCH} and {TEXT_ARCH}"
    )


def _sub_config(raw: dict[str, Any], key: str) -> dict[str, Any]:
    sub = raw.get(key)
    if not isinstance(sub, dict):
        raise ConfigError(f"config.json has no '{key}' object")
    return sub


def _require(raw: dict[str, Any], names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if raw.get(n) is None]
    if missing:
        raise ConfigError(f"{where} is missing required fields: {', '.join(missing)}")


def _text_config(raw: dict[str, Any]) -> TextConfig:
    _require(raw, _TEXT_REQUIRED, "text config")
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if raw.get(name) is not None:
            raise UnsupportedModelError(
                f"text config sets {name}={raw[name]}: logit soft-capping "
                "is not supported (Gemma3 checkpoints leave it null)"
            )
    if raw.get("use_bidirectional_attention"):
        raise UnsupportedModelError("text config sets use_bidirectional_attention: not supported")
    num_layers = int(raw["num_hidden_layers"])
    num_heads = int(raw.get("num_attention_heads", 8))
    return TextConfig(
        vocab_size=int(raw.get("vocab_size", 262_208)),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=int(raw.get("num_key_value_heads", 4)),
        head_dim=int(raw.get("head_dim") or 256),
        query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar", 256)),
        sliding_window=int(raw.get("sliding_window") or 4096),
        layer_types=_layer_types(raw, num_layers),
        rope=_rope(raw),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        hidden_activation=raw.get("hidden_activation") or "gelu_pytorch_tanh",
        max_position_embeddings=int(raw.get("max_position_embeddings", 131_072)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        pad_token_id=int(raw.get("pad_token_id") or 0),
    )


def _layer_types(raw: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    if raw.get("layer_types"):
        return tuple(raw["layer_types"])
    pattern = int(raw.get("sliding_window_pattern", 6))
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))


def _rope(raw: dict[str, Any]) -> dict[str, RopeConfig]:
    """Per-layer-type RoPE from either the legacy fields or transformers 5's `rope_parameters`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        full, sliding = params.get(FULL) or {}, params.get(SLIDING) or {}
    else:
        full, sliding = dict(raw.get("rope_scaling") or {}), {}
    full_theta = full.get("rope_theta", raw.get("rope_theta", 1_000_000.0))
    sliding_theta = sliding.get("rope_theta", raw.get("rope_local_base_freq", 10_000.0))
    return {
        FULL: _rope_one(full, full_theta, FULL),
        SLIDING: _rope_one(sliding, sliding_theta, SLIDING),
    }


def _rope_one(params: dict[str, Any], theta: float, layer_type: str) -> RopeConfig:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} for {layer_type} layers is not supported ({_SUPPORTED_ROPE})"
        )
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return RopeConfig(theta=float(theta), scaling_factor=factor)


def _vision_config(raw: dict[str, Any]) -> VisionConfig:
    _require(raw, _VISION_REQUIRED, "vision_config")
    model_type = raw.get("model_type", "siglip_vision_model")
    if model_type != "siglip_vision_model":
        raise UnsupportedModelError(f"vision tower {model_type!r} is not supported (SigLIP only)")
    return VisionConfig(
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=int(raw["num_attention_heads"]),
        image_size=int(raw["image_size"]),
        patch_size=int(raw["patch_size"]),
        num_channels=int(raw.get("num_channels", 3)),
        layer_norm_eps=float(raw.get("layer_norm_eps", 1e-6)),
        hidden_act=raw.get("hidden_act", "gelu_pytorch_tanh"),
    )


def _merge_ids(base: tuple[int, ...], extra: int | list[int] | None) -> tuple[int, ...]:
    if extra is None:
        return base
    extra = [extra] if isinstance(extra, int) else list(extra)
    return tuple(dict.fromkeys([*base, *map(int, extra)]))
