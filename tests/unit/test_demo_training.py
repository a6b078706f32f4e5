"""Training pieces of the demo model: batches, schedule, initialization."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from vlm_engine.demo import demo_request
from vlm_engine.demo.batches import IGNORE_INDEX, CaptionBatcher
from vlm_engine.demo.shapes import caption
from vlm_engine.demo.training import TrainingConfig, init_model, learning_rate_factor
from vlm_engine.pipeline import VisionLanguagePipeline
from vlm_engine.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


def test_batch_rows_are_the_engine_prompt_then_the_caption(checkpoint):
    batcher = CaptionBatcher(checkpoint)
    batch = batcher.sample(random.Random(3), 4)
    pipeline = VisionLanguagePipeline.load(checkpoint)
    picture = Image.new("RGB", (40, 40), "white")
    prompt = pipeline.prepare_chat(demo_request(picture)["messages"]).prompt
    start = len(prompt.token_ids)
    assert batcher.prompt_ids == prompt.token_ids
    end_of_turn = batcher.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    for row, scene in enumerate(batch.scenes):
        ids, labels = batch.input_ids[row].tolist(), batch.labels[row].tolist()
        assert ids[:start] == prompt.token_ids
        target = [t for t in labels if t != IGNORE_INDEX]
        assert labels[:start] == [IGNORE_INDEX] * start  # no loss on the prompt
        assert target == ids[start : start + len(target)] and target[-1] == end_of_turn
        assert batcher.tokenizer.decode(target[:-1]) == caption(scene)
        assert set(ids[start + len(target) :]) <= {batcher.pad_id}
    image_rows = batch.token_type_ids.bool()
    assert (batch.input_ids[image_rows] == batcher.image_token_id).all()
    assert image_rows.sum(1).tolist() == [16] * 4
    assert batch.pixel_values.shape == (4, 3, 32, 32)


def test_learning_rate_warms_up_then_decays():
    config = TrainingConfig(num_steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    factors = [learning_rate_factor(step, config) for step in range(1001)]
    assert factors[0] == pytest.approx(0.01) and factors[99] == pytest.approx(1.0)
    assert max(factors) == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[100:], factors[101:], strict=False))
    assert factors[-1] == pytest.approx(0.1)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_steps"):
        TrainingConfig(num_steps=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainingConfig(min_lr_ratio=2.0)


def test_init_is_seeded_and_leaves_the_global_rng_alone(checkpoint):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b = init_model(checkpoint, seed=5), init_model(checkpoint, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    projection = a.model.multi_modal_projector.mm_input_projection_weight
    assert projection.abs().sum() > 0  # not transformers' zero init (see init_model)
