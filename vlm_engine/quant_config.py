"""FP8 quantization: what a checkpoint's config.json declares (the compressed-tensors format), or
what the `quantization="fp8"` engine option asks for.

The one scheme the engine runs is "FP8 dynamic": float8_e4m3fn weights with one scale per output
channel (stored beside each weight as `weight_scale`, [out, 1]), and activations quantized per
token at run time, each token's scale its largest magnitude / 448. A checkpoint declaring any
other scheme (integer or 4-bit weights, groups or blocks, static activation scales, a quantized
KV cache, sparsity, transforms) is refused with a `ConfigError` that names what it declares.

Which layers are quantized follows compressed-tensors' matching: a layer is quantized when one of
the group's `targets` matches it and nothing in `ignore` does; an entry matches the layer's
checkpoint name exactly, its class name ("Linear"), or, written `re:PATTERN`, when the pattern
matches at the start of the name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vlm_engine.errors import ConfigError

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
# What Engine(quantization=...) takes: "fp8" quantizes the decoder's projections at load time (the
# layout of published Gemma3 FP8-dynamic checkpoints), "fp8-all" the vision tower's linear layers
# too (which saves the tower's memory but makes it slower: docs/performance.md).
QUANTIZATIONS = ("fp8", "fp8-all")


@dataclass(frozen=True)
class Fp8Config:
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()

    def quantizes(self, name: str, class_name: str = "Linear") -> bool:
        """Whether the layer of this checkpoint name (without `.weight`) is FP8."""
        return _matches(self.targets, name, class_name) and not _matches(
            self.ignore, name, class_name
        )


def _matches(patterns: tuple[str, ...], name: str, class_name: str) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern in (name, class_name):
            return True
    return False


def read_quantization_config(raw: dict[str, Any]) -> Fp8Config | None:
    """The checkpoint's quantization (`quantization_config` of config.json), None if it has
    none; a `ConfigError` naming the scheme for anything but FP8 dynamic."""
    config = raw.get("quantization_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ConfigError("config.json's quantization_config is not an object")
    method = config.get("quant_method")
    if method != "compressed-tensors":
        raise ConfigError(
            f"quantization method {method!r} is not supported: vlm_engine loads FP8 checkpoints "
            "in the compressed-tensors format (FP8 dynamic)"
        )
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if config.get(key):
            raise ConfigError(f"quantization_config declares a {key}, which is not supported")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError("quantization_config has no config_groups")
    targets: list[str] = []
    for name, group in groups.items():
        _check_fp8_dynamic(str(name), group)
        targets += [str(t) for t in group["targets"]]
    fmt = config.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ConfigError(
            f"quantization format {fmt!r} is not supported: FP8 weights are stored "
            "'float-quantized'"
        )
    ignore = config.get("ignore") or []
    if not isinstance(ignore, list):
        raise ConfigError("quantization_config's ignore is not a list")
    return Fp8Config(tuple(targets), tuple(str(i) for i in ignore))


def _check_fp8_dynamic(name: str, group: Any) -> None:
    if not isinstance(group, dict) or not isinstance(group.get("targets"), list):
        raise ConfigError(f"quantization group {name!r} has no list of targets")
    weights, inputs = group.get("weights"), group.get("input_activations")
    fp8_weights = isinstance(weights, dict) and _is_fp8(weights, "channel", dynamic=False)
    fp8_inputs = isinstance(inputs, dict) and _is_fp8(inputs, "token", dynamic=True)
    if fp8_weights and fp8_inputs and not group.get("output_activations"):
        return
    raise ConfigError(
        f"quantization scheme of group {name!r} is not supported: {describe_scheme(group)}; "
        "vlm_engine runs FP8 dynamic (float8 weights per channel, float8 activations per "
        "token, dynamic)"
    )


def _is_fp8(args: dict[str, Any], strategy: str, dynamic: bool) -> bool:
    return (
        args.get("num_bits") == 8
        and args.get("type") == "float"
        and args.get("strategy") == strategy
        and args.get("symmetric", True) is True
        and bool(args.get("dynamic")) == dynamic
        and args.get("group_size") is None
        and args.get("block_structure") is None
    )


def describe_scheme(group: dict[str, Any]) -> str:
    """'weights int4 per group (128), activations none' and the like."""

    def one(args: Any) -> str:
        if not isinstance(args, dict):
            return "none"
        kind = f"{args.get('type', '?')}{args.get('num_bits', '?')}"
        strategy = args.get("strategy", "?")
        if args.get("group_size"):
            strategy += f" ({args['group_size']})"
        if args.get("block_structure"):
            strategy += f" {args['block_structure']}"
        timing = "dynamic" if args.get("dynamic") else "static"
        return f"{kind} per {strategy}, {timing}"

    parts = [f"weights {one(group.get('weights'))}"]
    parts.append(f"input activations {one(group.get('input_activations'))}")
    if group.get("output_activations"):
        parts.append(f"output activations {one(group.get('output_activations'))}")
    return ", ".join(parts)


def online_fp8_config(quantization: str, model_is_multimodal: bool) -> Fp8Config:
    """An online quantization (QUANTIZATIONS) of a bf16 checkpoint: the decoder's projections
    and, with "fp8-all", the vision tower's linear layers. The LM head (tied to the embedding in
    Gemma3), the projector and the tower's patch embedding stay as they are."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}"
        )
    ignore = ("re:.*lm_head",)
    if model_is_multimodal:
        ignore += ("re:.*multi_modal_projector.*",)
        if quantization == "fp8":
            ignore += ("re:.*vision_tower.*",)
    return Fp8Config(("Linear",), ignore)
