"""The quantization a checkpoint's config.json declares: FP8 dynamic is read, with compressed-tensors'
rules for which layers it covers; any other scheme is refused with an error naming it. The FP8
arithmetic equals the compressed-tensors library's own."""

from __future__ import annotations

import copy

import pytest
import torch

from vlm_engine import Engine
from vlm_engine.errors import ConfigError
from vlm_engine.kernels.fp8 import fp8_linear, fp8_linear_ref, quantize_tokens, quantize_weight
from vlm_engine.quant_config import Fp8Config, online_fp8_config, read_quantization_config

FP8_ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
FP8_DYNAMIC = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {**FP8_ARGS, "strategy": "channel", "dynamic": False},
            "input_activations": {**FP8_ARGS, "strategy": "token", "dynamic": True},
            "output_activations": None,
        }
    },
    "ignore": ["lm_head", "re:.*vision_tower.*"],
    "kv_cache_scheme": None,
    "sparsity_config": {},
    "transform_config": {},
}


def with_group(**changes) -> dict:
    config = copy.deepcopy(FP8_DYNAMIC)
    group = config["config_groups"]["group_0"]
    for key, value in changes.items():
        if value is None:
            group[key] = None
        else:
            group[key] = {**(group.get(key) or {}), **value}
    return config


def test_fp8_dynamic_is_read_with_its_targets_and_ignore():
    config = read_quantization_config({"quantization_config": FP8_DYNAMIC})
    assert config == Fp8Config(("Linear",), ("lm_head", "re:.*vision_tower.*"))
    assert read_quantization_config({}) is None


@pytest.mark.parametrize(
    "name, quantized",
    [
        ("model.language_model.layers.0.self_attn.q_proj", True),
        ("language_model.model.layers.3.mlp.down_proj", True),
        ("lm_head", False),  # named exactly
        ("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1", False),  # by pattern
        ("vision_tower.vision_model.encoder.layers.0.mlp.fc1", False),
    ],
)
def test_layers_are_matched_as_compressed_tensors_matches_them(name, quantized):
    assert (
        read_quantization_config({"quantization_config": FP8_DYNAMIC}).quantizes(name) is quantized
    )


def test_patterns_match_at_the_start_of_the_name():
    config = Fp8Config(("Linear",), ("re:vision_tower.*",))
    assert not config.quantizes("vision_tower.encoder.fc1")
    assert config.quantizes("model.vision_tower.encoder.fc1")  # re.match: anchored at the start


@pytest.mark.parametrize(
    "config, named",
    [
        (with_group(weights={"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
                    input_activations=None), "weights int4 per group (128), static"),
        (with_group(input_activations=None), "input activations none"),
        (with_group(input_activations={"dynamic": False, "strategy": "tensor"}),
         "input activations float8 per tensor, static"),
        (with_group(weights={"strategy": "block", "block_structure": [128, 128]}),
         "weights float8 per block [128, 128], static"),
        (with_group(weights={"num_bits": 8, "type": "int"},
                    input_activations={"type": "int"}), "weights int8 per channel"),
    ],
)  # fmt: skip
def test_other_schemes_are_refused_by_name(config, named):
    with pytest.raises(ConfigError, match="not supported") as error:
        read_quantization_config({"quantization_config": config})
    assert named in str(error.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"quant_method": "gptq"}, "quantization method 'gptq'"),
        ({"quant_method": "fp8"}, "quantization method 'fp8'"),
        ({"kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "kv_cache_scheme"),
        ({"sparsity_config": {"format": "sparse-24"}}, "sparsity_config"),
        ({"format": "pack-quantized"}, "format 'pack-quantized'"),
        ({"config_groups": {}}, "no config_groups"),
    ],
)
def test_other_quantization_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        read_quantization_config({"quantization_config": {**FP8_DYNAMIC, **change}})


def test_online_fp8_decoder_leaves_the_vision_tower_and_head_alone():
    config = online_fp8_config("fp8", model_is_multimodal=True)
    assert config.quantizes("language_model.layers.0.mlp.gate_proj")
    assert not config.quantizes("vision_tower.encoder.layers.0.mlp.fc1")
    assert not config.quantizes("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1")
    assert not config.quantizes("lm_head")
    assert not config.quantizes("model.multi_modal_projector.mm_input_projection")


def test_online_fp8_takes_the_vision_towers_linear_layers_too():
    config = online_fp8_config("fp8-all", model_is_multimodal=True)
    assert config.quantizes("language_model.layers.0.self_attn.q_proj")
    assert config.quantizes("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1")
    assert config.quantizes("model.vision_tower.vision_model.encoder.layers.3.self_attn.out_proj")
    assert not config.quantizes("lm_head")
    assert not config.quantizes("model.multi_modal_projector.mm_input_projection")
    with pytest.raises(ConfigError, match="quantization must be one of"):
        online_fp8_config("int8", model_is_multimodal=True)


def test_the_engine_option_is_checked():
    with pytest.raises(ValueError, match="quantization must be one of"):
        Engine("unused", quantization="int4")


def test_weight_and_token_quantization_equal_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.quantization", reason="compared with the library")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = ct.preset_name_to_scheme("FP8_DYNAMIC", targets=["Linear"])
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        weight = (torch.randn(48, 64, generator=generator) * 0.05).to(dtype)
        weight[3] = 0  # a channel of zeros
        scale, zero = calculate_qparams(
            weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True), scheme.weights
        )
        theirs = quantize(weight, scale, zero, scheme.weights, dtype=torch.float8_e4m3fn)
        ours, our_scale = quantize_weight(weight)
        assert torch.equal(our_scale, scale.float())
        assert torch.equal(ours.float(), theirs.float())
        # Activations: per token on [batch, tokens, hidden] (transformers' shape), per row here.
        x = torch.randn(2, 5, 64, generator=generator).to(dtype)
        x_scale = x.abs().amax(-1, keepdim=True) / 448
        reference = fake_quantize(x, x_scale, None, scheme.input_activations)
        xq, row_scale = quantize_tokens(x.reshape(10, 64))
        assert torch.equal((xq.to(dtype) * row_scale).reshape(2, 5, 64), reference)


def test_the_fp8_linear_off_the_gpu_is_the_dequantized_reference():
    generator = torch.Generator().manual_seed(1)
    weight, scale = quantize_weight(torch.randn(32, 16, generator=generator))
    x = torch.randn(7, 16, generator=generator)
    expected = fp8_linear_ref(x, weight, scale)
    assert torch.equal(fp8_linear(x, weight, scale), expected)
    xq, x_scale = quantize_tokens(x)
    manual = (xq.float() * x_scale) @ (weight.float() * scale).T
    torch.testing.assert_close(expected, manual, rtol=1e-6, atol=1e-6)
