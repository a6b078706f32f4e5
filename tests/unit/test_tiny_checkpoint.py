"""The tiny checkpoint maker: files that transformers loads offline, deterministic random weights."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
)

from vlm_engine.testing import TOKEN_IDS, TinySpec, make_tiny_checkpoint
from vlm_engine.testing.tiny_checkpoint import main

pytestmark = pytest.mark.transformers

SYSTEM_AND_IMAGE_CHAT = [
    {"role": "system", "content": "You are terse."},
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}],
    },
]
SYSTEM_AND_IMAGE_PROMPT = (
    "<bos><start_of_turn>user\nYou are terse.\n\n<start_of_image>What shape is this?"
    "<end_of_turn>\n<start_of_turn>model\n"
)
ROUND_TRIP_TEXTS = [
    "A red circle in the top left corner.",
    "héllo wörld, café é",
    "日本語のテキスト",
    "emoji 🙂🚀 mixed 🙂",
    "a\nb\n\nc\n\n\nd\n\n\n\ne\n\n\n\n\n\n\n\nf",
    "  leading and  double  spaces ",
    "tabs\tand\r\nwindows",
    "digits 12345 and 3.14",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def processor(checkpoint):
    return AutoProcessor.from_pretrained(checkpoint)


def _load_tensors(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _noise_image(seed, height=40, width=50):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _transformers_name(checkpoint_name):
    """Where transformers 5 keeps a checkpoint tensor of either layout."""
    renames = [
        ("language_model.model.", "model.language_model."),
        ("vision_tower.vision_model.", "model.vision_tower."),
        ("model.vision_tower.vision_model.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ]
    for old, new in renames:
        if checkpoint_name.startswith(old):
            return new + checkpoint_name.removeprefix(old)
    return checkpoint_name


def _assert_clean_load(info):
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"layout": "old"}, {"max_shard_bytes": 40_000}, {"layout": "old", "dtype": "bfloat16"}],
    ids=["new", "old", "sharded", "old-bf16"],
)
def test_transformers_loads_every_tensor(tmp_path, overrides):
    path = make_tiny_checkpoint(tmp_path, **overrides)
    model, info = Gemma3ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    _assert_clean_load(info)
    loaded = model.state_dict()
    stored = _load_tensors(path)
    assert "lm_head.weight" not in stored
    dtype = getattr(torch, overrides.get("dtype", "float32"))
    assert {tensor.dtype for tensor in stored.values()} == {dtype}
    for name, tensor in stored.items():
        assert torch.equal(loaded[_transformers_name(name)], tensor.float()), name
    embed = loaded["model.language_model.embed_tokens.weight"]
    assert torch.equal(loaded["lm_head.weight"], embed), "the LM head must be tied to the embedding"


def test_sharded_checkpoint_has_a_consistent_index(tmp_path):
    path = make_tiny_checkpoint(tmp_path, max_shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (path / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    tensors = _load_tensors(path)
    assert set(index["weight_map"]) == set(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total


def test_text_only_checkpoint_loads_as_causal_lm(tmp_path):
    path = make_tiny_checkpoint(tmp_path, text_only=True)
    model, info = Gemma3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    _assert_clean_load(info)
    assert AutoConfig.from_pretrained(path).model_type == "gemma3_text"
    assert all(name.startswith("model.") for name in _load_tensors(path))
    assert not (path / "preprocessor_config.json").exists()


def test_same_seed_same_tensors_other_seed_other_tensors(tmp_path):
    first = _load_tensors(make_tiny_checkpoint(tmp_path / "a", seed=7))
    again = _load_tensors(make_tiny_checkpoint(tmp_path / "b", seed=7))
    other = _load_tensors(make_tiny_checkpoint(tmp_path / "c", seed=8))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not any(torch.equal(first[name], other[name]) for name in first)


def test_global_rng_is_left_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_checkpoint(tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_every_tensor_is_random_including_norms_and_projector(checkpoint):
    tensors = _load_tensors(checkpoint)
    for name, tensor in tensors.items():
        assert tensor.float().std() > 0.01, f"{name} looks constant"
    norm_weights = [name for name in tensors if "norm" in name and name.endswith("weight")]
    assert len(norm_weights) > 10
    for name in norm_weights + ["model.multi_modal_projector.mm_input_projection_weight"]:
        assert tensors[name].count_nonzero() == tensors[name].numel(), name


def test_config_uses_legacy_fields_that_transformers_converts(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())["text_config"]
    assert raw["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert "rope_parameters" not in raw and "sliding_window_pattern" in raw
    config = AutoConfig.from_pretrained(checkpoint)
    text = config.text_config
    spec = TinySpec()
    assert text.layer_types == list(spec.resolved_layer_types())
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}
    full, sliding = (
        text.rope_parameters["full_attention"],
        text.rope_parameters["sliding_attention"],
    )
    assert (full["rope_type"], full["factor"], full["rope_theta"]) == ("linear", 8.0, 1e6)
    assert (sliding["rope_type"], sliding["rope_theta"]) == ("default", 1e4)
    assert text.query_pre_attn_scalar != text.head_dim
    assert text.num_key_value_heads < text.num_attention_heads
    tokenizer_size = len(AutoTokenizer.from_pretrained(checkpoint))
    assert text.vocab_size % 64 == 0 and tokenizer_size < text.vocab_size < tokenizer_size + 64
    ids = (config.boi_token_index, config.eoi_token_index, config.image_token_index)
    assert ids == (TOKEN_IDS.boi, TOKEN_IDS.eoi, TOKEN_IDS.image)
    assert config.eos_token_id == [TOKEN_IDS.eos, TOKEN_IDS.end_of_turn]


def test_special_tokens_have_fixed_low_ids(checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    names = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    names += ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    assert tokenizer.convert_tokens_to_ids(names) == list(range(10))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)
    assert (tokenizer.boi_token_id, tokenizer.eoi_token_id) == (TOKEN_IDS.boi, TOKEN_IDS.eoi)
    assert tokenizer.image_token_id == TOKEN_IDS.image


def test_tokenizer_round_trips_between_transformers_and_tokenizers(checkpoint):
    hf_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    raw_tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    for text in ROUND_TRIP_TEXTS + [SYSTEM_AND_IMAGE_PROMPT]:
        ids = hf_tokenizer(text)["input_ids"]
        assert ids == raw_tokenizer.encode(text).ids, text
        assert ids[0] == TOKEN_IDS.bos
    for text in ROUND_TRIP_TEXTS:
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert hf_tokenizer.decode(ids) == text
        assert raw_tokenizer.decode(ids) == text


def test_newline_runs_are_single_tokens(checkpoint):
    raw_tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    run_ids = [raw_tokenizer.encode("\n" * n, add_special_tokens=False).ids for n in range(1, 9)]
    assert all(len(ids) == 1 for ids in run_ids)
    assert len({ids[0] for ids in run_ids}) == 8


def test_chat_template_renders_gemma3_instruct_format(checkpoint, processor):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    for renderer in (tokenizer, processor):
        prompt = renderer.apply_chat_template(
            SYSTEM_AND_IMAGE_CHAT, add_generation_prompt=True, tokenize=False
        )
        assert prompt == SYSTEM_AND_IMAGE_PROMPT
    turns = [
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
    ]
    expected = (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
    )
    assert tokenizer.apply_chat_template(turns, tokenize=False) == expected
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template(turns[:1] + turns[2:], tokenize=False)


def test_processor_expands_each_image_into_soft_tokens(processor):
    inputs = processor(
        text=SYSTEM_AND_IMAGE_PROMPT,
        images=_noise_image(0),
        return_tensors="pt",
        add_special_tokens=False,
    )
    spec = TinySpec()
    assert inputs["pixel_values"].shape == (1, 3, spec.image_size, spec.image_size)
    ids = inputs["input_ids"][0]
    is_image = ids == TOKEN_IDS.image
    assert int(is_image.sum()) == spec.mm_tokens_per_image
    assert torch.equal(inputs["token_type_ids"][0].bool(), is_image)
    assert int((ids == TOKEN_IDS.boi).sum()) == int((ids == TOKEN_IDS.eoi).sum()) == 1
    assert ids[0] == TOKEN_IDS.bos and int((ids == TOKEN_IDS.bos).sum()) == 1


def test_image_processor_pan_and_scan_settings_come_from_the_spec(tmp_path):
    path = make_tiny_checkpoint(tmp_path, do_pan_and_scan=True)
    image_processor = AutoProcessor.from_pretrained(path).image_processor
    wide = image_processor(_noise_image(1, height=20, width=60), return_tensors="pt")
    assert wide["num_crops"].tolist() == [3]
    assert wide["pixel_values"].shape == (4, 3, 32, 32)


def test_processor_pan_and_scan_needs_call_kwargs(processor):
    # Gemma3Processor's own defaults (off, min crop 256) override preprocessor_config.json, so a
    # test image only gets crops when the settings are passed to the call.
    inputs = processor(
        text="<start_of_image>",
        images=_noise_image(1, height=20, width=60),
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=TinySpec().pan_and_scan_min_crop_size,
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape[0] == 4
    assert int((inputs["input_ids"] == TOKEN_IDS.image).sum()) == 4 * TinySpec().mm_tokens_per_image


def test_forward_pass_gives_finite_input_dependent_logits(checkpoint, processor):
    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    last_tokens = []
    for seed in range(3):
        inputs = processor(
            text=SYSTEM_AND_IMAGE_PROMPT,
            images=_noise_image(seed),
            return_tensors="pt",
            add_special_tokens=False,
        )
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        assert torch.isfinite(logits).all()
        assert 0.3 < logits.std() < 3.0, "weight scales should keep logits O(1)"
        assert len(set(logits.argmax(-1).tolist())) > logits.shape[0] // 4
        last_tokens.append(logits[-1])
    assert not torch.allclose(last_tokens[0], last_tokens[1]), "the image must change the output"


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="layout"):
        TinySpec(layout="newest")
    with pytest.raises(ValueError, match="square"):
        TinySpec(mm_tokens_per_image=15)
    with pytest.raises(ValueError, match="layer type"):
        TinySpec(layer_types=("full_attention",))
    with pytest.raises(ValueError, match="positive"):
        TinySpec(hidden_size=0)
    with pytest.raises(TypeError):
        make_tiny_checkpoint("/nonexistent", not_a_field=1)


def test_command_line_writes_a_checkpoint(tmp_path):
    layer_types = "full_attention,sliding_attention,sliding_attention,full_attention"
    main([str(tmp_path), "--seed", "3", "--text-only", "--layer-types", layer_types])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["layer_types"] == layer_types.split(",")
    model, info = Gemma3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    _assert_clean_load(info)
