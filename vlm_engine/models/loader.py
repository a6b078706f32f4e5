"""Load an HF Gemma3 checkpoint (safetensors, single file or sharded) into a Gemma3Model.

The model is built on the meta device and each tensor is read from disk straight onto the
target device, converted to the target dtype, and put in place: the weights never exist twice.
Loading is strict: a tensor the model lacks, or a parameter the checkpoint lacks, is an error
that names them.

FP8 (models/fp8.py): a checkpoint whose config declares FP8 dynamic (compressed-tensors) gets
`Fp8Linear` layers where the config says, filled with its float8 weights and their scales as
stored; `quantization="fp8"` (or "fp8-all") quantizes a bf16 checkpoint's layers as each weight
is read, in the dtype it is stored in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlm_engine.config import ModelConfig
from vlm_engine.errors import CheckpointError, ConfigError
from vlm_engine.kernels.fp8 import quantize_weight
from vlm_engine.models.fp8 import Fp8Linear, fp8_layer_names, make_fp8_layers, quantize_layers
from vlm_engine.models.gemma3 import Gemma3Model
from vlm_engine.quant_config import online_fp8_config

logger = logging.getLogger("vlm_engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Checkpoint prefix -> our module prefix, for both Gemma3 name layouts (first match wins).
_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
)
_TEXT_ONLY_PREFIXES = (("model.", "language_model."), ("lm_head.", "lm_head."))


def resolve_dtype(dtype: str | torch.dtype | None, config: ModelConfig) -> torch.dtype:
    """`None`/"auto" takes the checkpoint's dtype (float32 if it names none)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use one of {list(DTYPES)}")
        return dtype
    name = (config.checkpoint_dtype or "float32") if dtype in (None, "auto") else dtype
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {list(DTYPES)} or 'auto'")
    return DTYPES[name]


def load_model(
    config: ModelConfig,
    checkpoint_dir: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    load_format: str = "safetensors",
    quantization: str | None = None,
) -> Gemma3Model:
    """`load_format="dummy"` fills the weights with seeded random values on the device instead
    of reading files: for benchmarks of real model shapes without their weights (an FP8
    checkpoint's layers are quantized from them). `quantization` quantizes at load time the
    decoder's projections ("fp8") or those and the vision tower's linear layers ("fp8-all");
    an FP8 checkpoint's layers are FP8 already."""
    checkpoint_dir = Path(checkpoint_dir or config.checkpoint_dir)
    device, dtype = torch.device(device), resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = Gemma3Model(config)
    fp8_config = config.quantization  # an FP8 checkpoint's layers are FP8 already
    online = quantization is not None and fp8_config is None
    if online:
        fp8_config = online_fp8_config(quantization, config.is_multimodal)
    if load_format == "dummy":
        _fill_random(model, dtype, device)
        if fp8_config is not None:
            quantize_layers(model, fp8_layer_names(model, fp8_config))
        model.language_model.init_rope(device)
        return model.eval()
    if load_format != "safetensors":
        raise ConfigError(f"load_format must be 'safetensors' or 'dummy', got {load_format!r}")
    quantize_on_load: set[str] = set()  # online FP8 layers: quantized as their weight is read
    if fp8_config is not None:
        names = fp8_layer_names(model, fp8_config, checkpoint_module_names(checkpoint_dir, config))
        make_fp8_layers(model, names)
        if online:
            quantize_on_load = {f"{n}.weight" for n in names}
    expected = dict(model.named_parameters())
    loaded, unexpected = set(), []
    for ckpt_name, tensor in iter_checkpoint(checkpoint_dir, device):
        name = checkpoint_to_model_name(ckpt_name, config)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(ckpt_name)
            continue
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{ckpt_name}: shape {tuple(tensor.shape)} in the checkpoint, "
                f"{tuple(expected[name].shape)} expected by the config"
            )
        if name in quantize_on_load:
            # In the dtype it is stored in, as compressed-tensors quantizes a checkpoint.
            weight, scale = quantize_weight(tensor)
            _set_parameter(model, name, weight)
            scale_name = name.removesuffix("weight") + "weight_scale"
            _set_parameter(model, scale_name, scale)
            loaded.add(scale_name)
        else:
            _set_parameter(model, name, _as_stored(model, name, ckpt_name, tensor, dtype))
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing or unexpected:
        raise CheckpointError(_mismatch_message(checkpoint_dir, missing, unexpected))
    model.language_model.init_rope(device)
    return model.eval()


def checkpoint_module_names(checkpoint_dir: Path, config: ModelConfig) -> dict[str, str]:
    """Our module name -> the checkpoint's, for every module with a stored `.weight` (read
    from the files' headers, no tensor data)."""
    names = {}
    for path in weight_files(checkpoint_dir):
        try:
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error type for bad files
            raise CheckpointError(f"cannot read {path}: {e}") from e
        for key in keys:
            ours = checkpoint_to_model_name(key, config)
            if ours is not None and key.endswith(".weight") and ours.endswith(".weight"):
                names[ours.removesuffix(".weight")] = key.removesuffix(".weight")
    return names


def _as_stored(
    model: nn.Module, name: str, ckpt_name: str, tensor: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The tensor in the dtype its parameter holds: an FP8 layer's weight stays float8 (and must
    be float8 in the file) and its scales become float32; everything else takes `dtype`."""
    module_name, _, attr = name.rpartition(".")
    if isinstance(model.get_submodule(module_name), Fp8Linear):
        if attr == "weight":
            if tensor.dtype != torch.float8_e4m3fn:
                raise CheckpointError(
                    f"{ckpt_name} is stored as {tensor.dtype}; the checkpoint's quantization "
                    "config makes it an FP8 layer, whose weight is float8_e4m3fn"
                )
            return tensor
        if attr == "weight_scale":
            return tensor.float()
    return tensor.to(dtype)


def checkpoint_to_model_name(name: str, config: ModelConfig) -> str | None:
    """Our parameter name for a checkpoint tensor; None for tensors Gemma3 never uses."""
    prefixes = _PREFIXES if config.is_multimodal else _TEXT_ONLY_PREFIXES
    for old, new in prefixes:
        if name.startswith(old):
            name = new + name[len(old) :]
            break
    if name.startswith("lm_head.") and config.text.tie_word_embeddings:
        return None  # tied to the embedding: a stored copy is redundant
    if name.startswith("vision_tower.head."):
        return None  # SigLIP's attention-pooling head: Gemma3 uses the patch states
    return name


def iter_checkpoint(
    checkpoint_dir: Path, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    for path in weight_files(checkpoint_dir):
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error type for bad files
            raise CheckpointError(f"cannot read {path}: {e}") from e


def weight_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = [checkpoint_dir / f for f in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names missing shard files: {', '.join(absent)}")
        return files
    single = checkpoint_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {checkpoint_dir}")
    return files


def _fill_random(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    generator = torch.Generator(device).manual_seed(0)
    for name, param in list(model.named_parameters()):
        tensor = torch.empty(param.shape, dtype=dtype, device=device)
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, nn.LayerNorm) and name.endswith("weight"):
            tensor.fill_(1.0)
        elif name.endswith("bias") or "norm" in name:
            tensor.zero_()  # Gemma norms scale by (1 + w): zero is the identity
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        _set_parameter(model, name, tensor)


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def _mismatch_message(checkpoint_dir: Path, missing: list[str], unexpected: list[str]) -> str:
    parts = [f"checkpoint {checkpoint_dir} does not match the model:"]
    if missing:
        parts.append(f"parameters with no tensor ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}")
    return " ".join(parts)
