"""Prompt expansion, chat message validation and the per-token attention bounds."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from vlm_engine.config import ModelConfig
from vlm_engine.errors import InvalidPromptError
from vlm_engine.frontend.chat import render_chat, split_messages
from vlm_engine.frontend.prompt import PromptBuilder
from vlm_engine.kernels.attention.metadata import ForwardContext
from vlm_engine.testing import make_tiny_checkpoint
from vlm_engine.vocab.inputs import ImageGroup

pytestmark = pytest.mark.transformers


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return PromptBuilder(tokenizer, ModelConfig.from_hf(path).image_tokens)


def test_groups_sit_on_soft_tokens(builder):
    image = builder.image_tokens
    prompt = builder.build("A <start_of_image> B <start_of_image>", [0, 2])
    first, second = prompt.placeholders
    assert len(first.groups) == 1 and len(second.groups) == 3
    for group in prompt.image_groups:
        ids = prompt.token_ids[group.offset - 1 : group.end + 1]
        assert ids == [image.boi_token_id] + [image.image_token_id] * group.length + [
            image.eoi_token_id
        ]
    assert second.num_embeds == 3 * image.mm_tokens_per_image
    assert second.length > second.num_embeds  # the text between crops lies inside the span
    assert prompt.token_ids.count(image.image_token_id) == first.num_embeds + second.num_embeds


def test_bos_added_once(builder):
    bos = builder.tokenizer.bos_token_id
    assert builder.build("hello").token_ids[0] == bos
    assert builder.build("<bos>hello").token_ids.count(bos) == 1
    assert builder.build("hello", add_bos=False).token_ids[0] != bos


@pytest.mark.parametrize(
    "text,crops,match",
    [
        ("no marker", [0], "0 '<start_of_image>' placeholders for 1 images"),
        ("<start_of_image><start_of_image>", [0], "2 '<start_of_image>'"),
        ("sneaky <image_soft_token>", [], "reserved token"),
        ("sneaky <end_of_image>", [], "reserved token"),
    ],
)
def test_placeholder_mismatch_is_rejected(builder, text, crops, match):
    with pytest.raises(InvalidPromptError, match=match):
        builder.build(text, crops)


def test_prompt_must_be_text(builder):
    with pytest.raises(InvalidPromptError, match="must be a str"):
        builder.build(b"bytes")


def test_text_only_builder_rejects_images(builder):
    text_only = PromptBuilder(builder.tokenizer, None)
    assert text_only.build("<start_of_image>").token_ids  # a plain string without images
    with pytest.raises(InvalidPromptError, match="text-only"):
        text_only.build("x", [0])


def test_split_messages_extracts_images_in_order():
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a.png"},
                {"type": "text", "text": "and"},
                {"type": "image", "path": "b.png"},
            ],
        },
    ]
    rendered, images, uuids = split_messages(messages)
    assert images == ["a.png", "b.png"] and uuids == [None, None]
    assert rendered[1]["content"][0] == {"type": "image"}


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"content": "x"}], "'role' and 'content'"),
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ([{"role": "user", "content": 5}], "string or a list"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported item type"),
        ([{"role": "user", "content": [{"type": "image"}]}], "image item needs"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "string 'text'"),
    ],
)
def test_bad_messages_are_rejected(messages, match):
    with pytest.raises(InvalidPromptError, match=match):
        split_messages(messages)


def test_template_errors_become_prompt_errors(builder):
    rendered, _, _ = split_messages(
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    )
    with pytest.raises(InvalidPromptError, match="alternate"):
        render_chat(builder.tokenizer, rendered)


def test_kv_limits_extend_to_the_image_group_end():
    # one sequence of 10 tokens whose positions 3..6 are an image group; the step covers 2..9
    ctx = ForwardContext.build([8], [10], [[ImageGroup(3, 4)]], device="cpu")
    assert ctx.positions.tolist() == list(range(2, 10))
    assert ctx.kv_limits.tolist() == [3, 7, 7, 7, 7, 8, 9, 10]
