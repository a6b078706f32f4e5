"""Processor files in every layout transformers writes or has written: which file wins, and that
transformers itself reads the same settings and chat template from each layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoProcessor
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from vlm_engine.errors import ConfigError
from vlm_engine.frontend import processor_files
from vlm_engine.frontend.image_processor import Gemma3ImageProcessor, ImageProcessorConfig
from vlm_engine.frontend.tokenizer import load_tokenizer
from vlm_engine.testing.tokenizer import write_tokenizer_files

pytestmark = pytest.mark.transformers

SETTINGS = {
    "image_processor_type": "Gemma3ImageProcessor",
    "size": {"height": 32, "width": 32},
    "resample": 2,
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_seq_length": 16,
}
TEMPLATES = {
    name: f"{{{{ bos_token }}}}{name}{{% for m in messages %}}{{{{ m['content'] }}}}{{% endfor %}}"
    for name in ("processor_config", "chat_template_json", "jinja", "tokenizer_config")
}


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload))


def legacy(root: Path, **settings) -> Path:
    """The Hub's Gemma3 layout: preprocessor_config.json, and processor_config.json holding
    only processor-level fields."""
    write_json(root / "preprocessor_config.json", {**SETTINGS, **settings})
    write_json(root / "processor_config.json", {"processor_class": "Gemma3Processor"})
    return root


def nested(root: Path, image_seq_length: int = 16, **settings) -> Path:
    """transformers 5's layout: the image processor nested in processor_config.json."""
    payload = {
        "image_processor": {**SETTINGS, **settings},
        "image_seq_length": image_seq_length,
        "processor_class": "Gemma3Processor",
    }
    write_json(root / "processor_config.json", payload)
    return root


@pytest.mark.parametrize("layout", [legacy, nested])
def test_settings_are_read_from_either_layout_as_transformers_reads_them(tmp_path, layout):
    layout(tmp_path, size={"height": 48, "width": 40}, pan_and_scan_min_crop_size=64)
    config = ImageProcessorConfig.from_pretrained(tmp_path)
    assert config.size == (48, 40) and config.pan_and_scan_min_crop_size == 64
    hf = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert (hf.size["height"], hf.size["width"]) == config.size
    assert hf.pan_and_scan_min_crop_size == config.pan_and_scan_min_crop_size


def test_nested_settings_win_over_preprocessor_config(tmp_path):
    legacy(tmp_path, size={"height": 64, "width": 64})
    nested(tmp_path, size={"height": 40, "width": 40})
    settings, source = processor_files.image_processor_settings(tmp_path)
    assert source.name == "processor_config.json" and settings["size"]["height"] == 40
    hf = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert hf.size["height"] == ImageProcessorConfig.from_pretrained(tmp_path).size[0] == 40


def test_processor_config_without_image_processor_falls_back(tmp_path):
    legacy(tmp_path, size={"height": 56, "width": 56})
    settings, source = processor_files.image_processor_settings(tmp_path)
    assert source.name == "preprocessor_config.json" and settings["size"]["height"] == 56


def test_no_image_processor_is_a_config_error_naming_the_directory(tmp_path):
    write_json(tmp_path / "processor_config.json", {"processor_class": "Gemma3Processor"})
    with pytest.raises(ConfigError, match="preprocessor_config.json not found") as info:
        ImageProcessorConfig.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value) and "image_processor" in str(info.value)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("processor_config.json", "{broken", "cannot read .*processor_config.json"),
        ("processor_config.json", "[1, 2]", "must hold a JSON object"),
        ("processor_config.json", '{"image_processor": 3}', "'image_processor' must be an object"),
        ("preprocessor_config.json", "{broken", "cannot read .*preprocessor_config.json"),
    ],
)
def test_malformed_files_are_config_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        ImageProcessorConfig.from_pretrained(tmp_path)


def test_malformed_chat_template_is_a_config_error(tmp_path):
    (tmp_path / "chat_template.json").write_text('{"chat_template": 5}')
    with pytest.raises(ConfigError, match="chat_template.json: 'chat_template' must be a string"):
        processor_files.chat_template(tmp_path)


def test_bad_settings_name_the_file_they_came_from(tmp_path):
    nested(tmp_path, rescale_factor=-1)
    with pytest.raises(ConfigError, match="processor_config.json: rescale_factor"):
        ImageProcessorConfig.from_pretrained(tmp_path)


def test_image_seq_length_prefers_the_processor_level_field(tmp_path):
    nested(tmp_path, image_seq_length=64)
    assert processor_files.image_seq_length(tmp_path) == 64  # over the nested 16
    (tmp_path / "processor_config.json").unlink()
    legacy(tmp_path, image_seq_length=36)
    assert processor_files.image_seq_length(tmp_path) == 36
    write_json(tmp_path / "preprocessor_config.json", {"size": {"height": 8, "width": 8}})
    assert processor_files.image_seq_length(tmp_path) is None


@pytest.mark.parametrize("layout", [legacy, nested])
def test_image_seq_length_must_match_the_model(tmp_path, layout):
    layout(tmp_path)
    assert Gemma3ImageProcessor.from_pretrained(tmp_path, 16).config.size == (32, 32)
    with pytest.raises(ConfigError, match=r"image_seq_length \(16\) differs .*\(256\)"):
        Gemma3ImageProcessor.from_pretrained(tmp_path, 256)


def test_overrides_replace_the_checkpoint_settings(tmp_path):
    nested(tmp_path)
    processor = Gemma3ImageProcessor.from_pretrained(tmp_path, 16, {"do_pan_and_scan": True})
    assert processor.config.do_pan_and_scan is True
    with pytest.raises(TypeError, match="unknown image processor option"):
        Gemma3ImageProcessor.from_pretrained(tmp_path, 16, {"pan_and_scan": True})


# --- chat templates ----------------------------------------------------------------------------


def write_templates(root: Path, sources: set[str]) -> None:
    """A tokenizer plus the chat template in each of ``sources`` (and nowhere else)."""
    write_tokenizer_files(root, model_max_length=512)
    (root / "chat_template.jinja").unlink()
    config = json.loads((root / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if "tokenizer_config" in sources:
        config["chat_template"] = TEMPLATES["tokenizer_config"]
    write_json(root / "tokenizer_config.json", config)
    if "jinja" in sources:
        (root / "chat_template.jinja").write_text(TEMPLATES["jinja"])
    if "chat_template_json" in sources:
        write_json(root / "chat_template.json", {"chat_template": TEMPLATES["chat_template_json"]})
    processor = {"processor_class": "Gemma3Processor", "image_seq_length": 16}
    if "processor_config" in sources:
        processor["chat_template"] = TEMPLATES["processor_config"]
    write_json(root / "processor_config.json", {"image_processor": SETTINGS, **processor})


ORDER = ["processor_config", "chat_template_json", "jinja", "tokenizer_config"]


@pytest.mark.parametrize(
    "sources",
    [{name} for name in ORDER] + [set(ORDER[i:]) for i in range(3)] + [set(ORDER[2:4])],
    ids=lambda s: "+".join(sorted(s)),
)
def test_chat_template_precedence(tmp_path, sources):
    write_templates(tmp_path, sources)
    winner = next(name for name in ORDER if name in sources)
    assert processor_files.chat_template(tmp_path) == TEMPLATES[winner]
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.chat_template == TEMPLATES[winner]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == f"<bos>{winner}hi"


@pytest.mark.parametrize(
    "sources", [{"chat_template_json"}, {"jinja"}, {"jinja", "chat_template_json"}]
)
def test_chat_template_is_the_one_transformers_processor_uses(tmp_path, sources):
    write_templates(tmp_path, sources)
    hf = AutoProcessor.from_pretrained(tmp_path, backend="pil")
    assert processor_files.chat_template(tmp_path) == hf.chat_template


def test_named_templates_give_the_default(tmp_path):
    write_templates(tmp_path, set())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": TEMPLATES["tokenizer_config"]},
    ]
    write_json(tmp_path / "tokenizer_config.json", config)
    assert processor_files.chat_template(tmp_path) == TEMPLATES["tokenizer_config"]


def test_no_template_anywhere_is_none(tmp_path):
    write_templates(tmp_path, set())
    assert processor_files.chat_template(tmp_path) is None
    assert not load_tokenizer(tmp_path).chat_template
