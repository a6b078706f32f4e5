"""FP8 layers of the model: `Fp8Linear`, and which of a model's Linear layers become one.

A checkpoint in the compressed-tensors FP8-dynamic format stores each quantized layer's weight
as float8_e4m3fn with a `weight_scale` ([out, 1]) beside it; `quantization="fp8"` makes the same
from a bf16 checkpoint at load time (per-channel scales, kernels/fp8.py). Either way the layer
is an `Fp8Linear`, whose projection `kernels.linear.linear` runs as an FP8 GEMM on a GPU that has
FP8 tensor cores and as its dequantized reference elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_engine.errors import ConfigError
from vlm_engine.kernels.fp8 import FP8, quantize_weight
from vlm_engine.kernels.linear import linear
from vlm_engine.quant_config import Fp8Config


class Fp8Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.empty(out_features, 1, dtype=torch.float32, device=device), requires_grad=False
        )
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)

    @classmethod
    def quantized(cls, layer: nn.Linear) -> Fp8Linear:
        """`layer` with its weight quantized per output channel (the bias kept as it is)."""
        weight, scale = quantize_weight(layer.weight.detach())
        return cls.from_tensors(weight, scale, layer.bias)

    @classmethod
    def from_tensors(
        cls, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Fp8Linear:
        out = cls(weight.shape[1], weight.shape[0], bias is not None, device="meta")
        out.weight = nn.Parameter(weight, requires_grad=False)
        out.weight_scale = nn.Parameter(scale.float().reshape(-1, 1), requires_grad=False)
        if bias is not None:
            out.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8"


def fp8_layer_names(
    model: nn.Module, config: Fp8Config, checkpoint_names: dict[str, str] | None = None
) -> list[str]:
    """The model's Linear layers (by module name) that `config` quantizes. Patterns match the
    checkpoint's names of the layers (`checkpoint_names`: our module name -> the checkpoint's),
    or ours where the checkpoint has none (random weights)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | Fp8Linear):
            stored = (checkpoint_names or {}).get(name, name)
            if config.quantizes(stored, "Linear"):
                names.append(name)
    other = [n for n in names if not n.startswith(("language_model.", "vision_tower."))]
    if other:
        raise ConfigError(
            f"FP8 layers outside the decoder and the vision tower ({', '.join(other[:4])}) are "
            "not supported"
        )
    return names


def make_fp8_layers(model: nn.Module, names: list[str]) -> None:
    """Swap the named Linear layers of a model built on the meta device for empty FP8 layers,
    which loading then fills from the checkpoint."""
    for name in names:
        layer = model.get_submodule(name)
        _replace(
            model,
            name,
            Fp8Linear(layer.in_features, layer.out_features, layer.bias is not None, "meta"),
        )


def quantize_layers(model: nn.Module, names: list[str]) -> None:
    """Quantize the named Linear layers of a loaded model in place (online FP8)."""
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear):
            _replace(model, name, Fp8Linear.quantized(layer))


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, layer)
