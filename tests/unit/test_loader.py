"""Checkpoint loading: layouts, shards, dtypes, strictness, and config errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_engine.config import FULL, SLIDING, ModelConfig
from vlm_engine.errors import CheckpointError, ConfigError, UnsupportedModelError
from vlm_engine.models.loader import load_model
from vlm_engine.testing import make_tiny_checkpoint


def state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ref"), seed=5)
    return path, state(load_model(ModelConfig.from_hf(path)))


@pytest.mark.parametrize(
    "options",
    [{"layout": "old"}, {"max_shard_bytes": 40_000}, {"layout": "old", "max_shard_bytes": 40_000}],
)
def test_layouts_and_shards_load_the_same_weights(options, reference, tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, **options)
    if "max_shard_bytes" in options:
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("model-*.safetensors"))) > 1
    loaded = state(load_model(ModelConfig.from_hf(path)))
    assert loaded.keys() == reference[1].keys()
    assert all(torch.equal(loaded[k], reference[1][k]) for k in loaded)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", torch.float32])
def test_dtype_choice(dtype, reference):
    model = load_model(ModelConfig.from_hf(reference[0]), dtype=dtype)
    expected = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert {p.dtype for p in model.parameters()} == {expected}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_auto_dtype_takes_the_checkpoint_dtype(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "bf16", seed=5, dtype="bfloat16")
    model = load_model(ModelConfig.from_hf(path), dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bad_dtype_is_a_config_error(reference):
    with pytest.raises(ConfigError, match="int8"):
        load_model(ModelConfig.from_hf(reference[0]), dtype="int8")


def rewrite_weights(path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_missing_tensor_is_named(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ckpt", seed=5)
    name = "model.language_model.layers.1.self_attn.k_norm.weight"
    rewrite_weights(path, lambda t: t.pop(name))
    with pytest.raises(
        CheckpointError, match=r"language_model\.layers\.1\.self_attn\.k_norm\.weight"
    ):
        load_model(ModelConfig.from_hf(path))


def test_unexpected_tensor_is_named(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ckpt", seed=5)
    rewrite_weights(path, lambda t: t.update({"model.language_model.extra.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"model\.language_model\.extra\.weight"):
        load_model(ModelConfig.from_hf(path))


def test_wrong_shape_is_named(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ckpt", seed=5)
    name = "model.multi_modal_projector.mm_input_projection_weight"
    rewrite_weights(path, lambda t: t.update({name: torch.ones(2, 2)}))
    with pytest.raises(CheckpointError, match="mm_input_projection_weight"):
        load_model(ModelConfig.from_hf(path))


def test_stored_lm_head_is_ignored_when_tied(reference, tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ckpt", seed=5)
    emb = "model.language_model.embed_tokens.weight"
    rewrite_weights(path, lambda t: t.update({"lm_head.weight": t[emb].clone()}))
    loaded = state(load_model(ModelConfig.from_hf(path)))
    assert loaded.keys() == reference[1].keys()


def test_missing_shard_is_an_error(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ckpt", seed=5, max_shard_bytes=40_000)
    next(path.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        load_model(ModelConfig.from_hf(path))


def test_corrupt_weights_file_is_an_error(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ckpt", seed=5)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(ModelConfig.from_hf(path))


def edit_config(path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_config_reads_the_tiny_checkpoint(reference):
    config = ModelConfig.from_hf(reference[0])
    assert (
        config.is_multimodal and config.text.num_key_value_heads < config.text.num_attention_heads
    )
    assert {SLIDING, FULL} == set(config.text.layer_types)
    assert config.text.rope[FULL].scaling_factor == 8.0
    assert config.text.rope[SLIDING].scaling_factor == 1.0
    assert len(config.eos_token_ids) == 2


@pytest.mark.parametrize(
    "edit,error,match",
    [
        (
            lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"),
            UnsupportedModelError,
            "LlamaForCausalLM",
        ),
        (lambda c: c["text_config"].pop("hidden_size"), ConfigError, "hidden_size"),
        (lambda c: c["vision_config"].pop("patch_size"), ConfigError, "patch_size"),
        (lambda c: c.pop("text_config"), ConfigError, "text_config"),
        (
            lambda c: c["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
            UnsupportedModelError,
            "yarn",
        ),
        (
            lambda c: c["text_config"].update(num_key_value_heads=3),
            ConfigError,
            "num_key_value_heads",
        ),
        (
            lambda c: c["text_config"].update(final_logit_softcapping=30.0),
            UnsupportedModelError,
            "final_logit_softcapping",
        ),
    ],
)
def test_config_errors_name_the_problem(edit, error, match, tmp_path):
    path = make_tiny_checkpoint(tmp_path / "ckpt", seed=5)
    edit_config(path, edit)
    with pytest.raises(error, match=match):
        ModelConfig.from_hf(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_hf(tmp_path)


def test_rope_parameters_format_equals_legacy_fields(reference):
    raw = json.loads((reference[0] / "config.json").read_text())
    legacy = ModelConfig.from_dict(raw).text.rope
    text = raw["text_config"]
    text["rope_parameters"] = {
        FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": text.pop("rope_theta", 1e6)},
        SLIDING: {"rope_type": "default", "rope_theta": text.pop("rope_local_base_freq", 1e4)},
    }
    text.pop("rope_scaling", None)
    assert ModelConfig.from_dict(raw).text.rope == legacy


def test_dummy_load_format_needs_no_weight_files(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "shape-only", seed=5, write_weights=False)
    assert not list(path.glob("*.safetensors"))
    model = load_model(ModelConfig.from_hf(path), load_format="dummy")
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" for p in params.values())
    assert torch.all(params["language_model.norm.weight"] == 0)  # Gemma (1 + w): identity
    assert torch.all(params["vision_tower.post_layernorm.weight"] == 1)
    assert params["language_model.layers.0.mlp.up_proj.weight"].std() > 0.01
    with pytest.raises(CheckpointError):
        load_model(ModelConfig.from_hf(path))  # the real loader wants the files
    with pytest.raises(ConfigError, match="load_format"):
        load_model(ModelConfig.from_hf(path), load_format="pickle")
