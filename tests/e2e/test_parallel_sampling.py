"""Several samples of one prompt (`SamplingParams.n`): each sample as it would be alone, the
prompt's KV blocks and image encodings computed once, streaming, aborting, and the core in its
own process."""

from __future__ import annotations

import pytest

from vlm_engine import Engine, SamplingParams
from vlm_engine.errors import InvalidSamplingParamsError
from vlm_engine.testing import make_tiny_checkpoint
from vlm_engine.testing.samples import random_image, random_words

OPTIONS = dict(device="cpu", dtype="float32", block_size=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=2)


def image_prompt(words: int = 30) -> dict:
    import numpy as np

    text = "<start_of_image>" + random_words(np.random.default_rng(words), words)
    return {"prompt": text, "images": [random_image(40, 30, 3)]}


def sampled(seed: int | None, n: int = 1, **kwargs) -> SamplingParams:
    return SamplingParams(n=n, max_tokens=6, min_tokens=6, temperature=1.0, seed=seed, **kwargs)


@pytest.mark.parametrize("core_process", [False, True], ids=["in-process", "core-process"])
def test_samples_are_what_each_gives_alone(checkpoint, core_process):
    """Greedy: n identical samples equal to n=1. Seeded: sample 0 is the n=1 output with that
    seed, the others differ from it and from each other, and a rerun repeats them all."""
    with Engine(checkpoint, **OPTIONS, core_process=core_process) as engine:
        prompt = image_prompt()
        greedy = SamplingParams(max_tokens=6, min_tokens=6, temperature=0)
        (alone,) = engine.generate(prompt, greedy)
        (three,) = engine.generate(
            prompt, SamplingParams(n=3, max_tokens=6, min_tokens=6, temperature=0)
        )
        assert [c.token_ids for c in three.outputs] == [alone.token_ids] * 3
        assert [c.index for c in three.outputs] == [0, 1, 2]
        assert three.token_ids == alone.token_ids and three.text == alone.text
        (one,) = engine.generate(prompt, sampled(11))
        (many,) = engine.generate(prompt, sampled(11, n=4))
        (again,) = engine.generate(prompt, sampled(11, n=4))
        tokens = [c.token_ids for c in many.outputs]
        assert tokens[0] == one.token_ids
        assert len({tuple(t) for t in tokens}) == 4
        assert [c.token_ids for c in again.outputs] == tokens
        assert all(c.finish_reason == "length" and len(c.token_ids) == 6 for c in many.outputs)
        assert many.finished and many.num_prompt_tokens == one.num_prompt_tokens
        assert engine.core.all_blocks_free()


def test_the_prompt_and_its_image_are_computed_once(checkpoint):
    """With the prompt in chunks over several steps, samples 1.. wait for sample 0's prompt and
    then find its blocks cached: each of them computes at most its last partial block. (The
    first chunk stops before the image, leaving budget that the other samples would otherwise
    spend on the prompt themselves.)"""
    import numpy as np

    engine = Engine(checkpoint, **OPTIONS, max_num_batched_tokens=24)
    words = random_words(np.random.default_rng(1), 8)
    prompt = {
        "prompt": f"{words}<start_of_image>{random_words(np.random.default_rng(2), 50)}",
        "images": [random_image(40, 30, 3)],
    }
    (out,) = engine.generate(prompt, sampled(5, n=4))
    stats = engine.stats()
    assert stats["vision_encoder"]["items_encoded"] == 1
    num_prompt = out.num_prompt_tokens
    assert num_prompt > 3 * 24  # several steps of prompt
    full_blocks = (num_prompt - 1) // 4 * 4
    assert stats["prefix_cache"]["hits"] == 3 * full_blocks  # every sample but the first
    assert engine.core.all_blocks_free()


def test_streamed_samples_join_to_the_whole(checkpoint):
    engine = Engine(checkpoint, **OPTIONS)
    prompt = image_prompt()
    (whole,) = engine.generate(prompt, sampled(9, n=3))
    texts, tokens, finished = ["", "", ""], [[], [], []], []
    for delta in engine.stream(prompt, sampled(9, n=3)):
        for c in delta.outputs:
            texts[c.index] += c.text
            tokens[c.index] += c.token_ids
            if c.finished:
                finished.append(c.index)
    assert tokens == [c.token_ids for c in whole.outputs]
    assert texts == [c.text for c in whole.outputs]
    assert sorted(finished) == [0, 1, 2] and delta.finished


def test_aborting_a_request_aborts_every_sample(checkpoint):
    engine = Engine(checkpoint, **OPTIONS)
    params = SamplingParams(n=3, max_tokens=50, ignore_eos=True)
    engine.add_request(image_prompt(), params, request_id="many")
    engine.step()
    (aborted,) = engine.abort_request("many")
    assert aborted.finished and {c.finish_reason for c in aborted.outputs} == {"abort"}
    assert not engine.has_unfinished() and engine.core.all_blocks_free()
    engine.add_request("a b c", params, request_id="many")  # the id is free again
    while engine.has_unfinished():
        engine.step()


def test_n_is_validated():
    with pytest.raises(InvalidSamplingParamsError, match="n must be >= 1"):
        SamplingParams(n=0)
    with pytest.raises(InvalidSamplingParamsError, match="n must be <= 128"):
        SamplingParams(n=129)
