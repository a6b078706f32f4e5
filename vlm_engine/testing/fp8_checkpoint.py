"""FP8-dynamic checkpoints written by the compressed-tensors library, from a bf16/float32 one.

The library does what a quantization tool does for this scheme (it needs no calibration data):
it attaches the FP8_DYNAMIC scheme to the Linear layers, each weight's scale comes from the
library's own `calculate_qparams` over the weight's per-channel minimum and maximum (what a
min-max observer records), the compressor turns the weights into float8, and the config it
writes is the `quantization_config` a published checkpoint carries. transformers loads the
result as such checkpoints load.

    python -m vlm_engine.testing.fp8_checkpoint SRC DST [--vision]

`ignore` is written as patterns: the compressor's own list names the layers the way the files
name them, which transformers does not match against its module names for Gemma3's vision tower.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

# The decoder only (the LM head, tied to the embedding, the vision tower and the projector stay
# as they are), as Gemma3 FP8-dynamic checkpoints are published.
IGNORE = ("re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*")
IGNORE_WITH_VISION = ("re:.*lm_head", "re:.*multi_modal_projector.*")
_COPIED = (
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
    "special_tokens_map.json", "preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)  # fmt: skip


def write_fp8_checkpoint(
    source: str | Path, target: str | Path, quantize_vision: bool = False
) -> Path:
    """Quantize the Gemma3 checkpoint at `source` to FP8 dynamic and write it to `target`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized
    from transformers import AutoConfig, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    source, target = Path(source), Path(target)
    text_only = AutoConfig.from_pretrained(source).model_type == "gemma3_text"
    model_class = Gemma3ForCausalLM if text_only else Gemma3ForConditionalGeneration
    model = model_class.from_pretrained(source, dtype="auto").eval()
    ignore = list(IGNORE_WITH_VISION if quantize_vision else IGNORE)
    config = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", targets=["Linear"])},
        ignore=ignore,
    )
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            if not is_module_quantized(module) or module.quantization_scheme.weights is None:
                continue
            weight = module.weight
            scale, zero_point = calculate_qparams(
                weight.amin(dim=-1, keepdim=True),
                weight.amax(dim=-1, keepdim=True),
                module.quantization_scheme.weights,
            )
            module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero_point.to(module.weight_zero_point.dtype))
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.quantization_config.ignore = ignore
    compressor.compress_model(model)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    compressor.update_config(target)
    for name in _COPIED:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copy2(source / name, target / name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--vision", action="store_true", help="quantize the vision tower too")
    args = parser.parse_args()
    print(write_fp8_checkpoint(args.source, args.target, args.vision))


if __name__ == "__main__":
    main()
