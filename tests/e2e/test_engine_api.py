"""The public Engine API as an application uses it, on a tiny checkpoint (CPU, float32)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from vlm_engine import Engine, InvalidInputError, InvalidPromptError, SamplingParams
from vlm_engine.testing import make_tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=10, min_tokens=10)
TEXT = "the red circle sits left of a blue square while two green triangles wait"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(checkpoint, request):
    """Each test runs with steps one at a time, and with each step scheduled while the
    previous one runs (async scheduling, the default on a GPU)."""
    return Engine(
        checkpoint, device="cpu", dtype="float32", block_size=8, async_scheduling=request.param
    )


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))


def tokens(outputs):
    return [o.token_ids for o in outputs]


def test_prompt_forms_and_image_sources(engine, image, tmp_path):
    path = tmp_path / "image.png"
    image.save(path)
    marked = {"prompt": "<start_of_image>What is it?", "images": [image]}
    outs = engine.generate(
        [
            marked,
            {"prompt": "What is it?", "images": [image]},  # no marker: image goes first
            {"prompt": "<start_of_image>What is it?", "images": [str(path)]},
            {"prompt": "<start_of_image>What is it?", "images": [path.read_bytes()]},
            {"prompt": "<start_of_image>What is it?", "images": image},  # a single image
        ],
        GREEDY,
    )
    assert all(o.token_ids == outs[0].token_ids for o in outs)
    assert all(len(o.token_ids) == 10 and o.finish_reason == "length" for o in outs)
    chat = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image},
                    {"type": "text", "text": "What is it?"},
                ],
            }
        ]
    }
    (out,) = engine.generate([chat], GREEDY)
    assert "<start_of_turn>user" in out.prompt and out.num_prompt_tokens > outs[0].num_prompt_tokens
    single = engine.generate(TEXT, GREEDY)  # one prompt, not a list
    assert len(single) == 1 and single[0].text


def test_outputs_in_input_order_with_per_request_params(engine):
    prompts = [TEXT, "short", TEXT + " again"]
    params = [SamplingParams(temperature=0, max_tokens=n, min_tokens=n) for n in (7, 2, 4)]
    outs = engine.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [7, 2, 4]
    assert outs[0].token_ids == engine.generate(prompts[0], params[0])[0].token_ids
    with pytest.raises(ValueError, match="2 sampling_params for 3 prompts"):
        engine.generate(prompts, params[:2])


def test_stream_yields_increments_that_add_up(engine, image):
    prompts = [TEXT, {"prompt": "<start_of_image>Describe.", "images": [image]}]
    final = engine.generate(prompts, GREEDY)
    text, ids, finished = {}, {}, set()
    count = 0
    for delta in engine.stream(prompts, GREEDY):
        count += 1
        assert delta.request_id not in finished
        text[delta.request_id] = text.get(delta.request_id, "") + delta.text
        ids[delta.request_id] = ids.get(delta.request_id, []) + delta.token_ids
        if delta.finished:
            finished.add(delta.request_id)
    assert len(finished) == 2 and count >= 2 * 10
    assert sorted(ids.values()) == sorted(tokens(final))
    assert sorted(text.values()) == sorted(o.text for o in final)


def test_closing_a_stream_aborts_its_requests(engine):
    stream = engine.stream([TEXT, TEXT], SamplingParams(temperature=0, max_tokens=50))
    next(stream)
    stream.close()
    assert not engine.has_unfinished() and engine.core.all_blocks_free()


def test_low_level_loop_and_abort(engine):
    keep = engine.add_request(TEXT, SamplingParams(temperature=0, max_tokens=6))
    drop = engine.add_request(
        TEXT, SamplingParams(temperature=0, max_tokens=200), request_id="to-abort"
    )
    assert drop == "to-abort"
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(TEXT, request_id="to-abort")
    done = {}
    for _ in range(3):
        for out in engine.step():
            done[out.request_id] = out
    (aborted,) = engine.abort_request(drop)
    assert aborted.finished and aborted.finish_reason == "abort"
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id] = out
    assert done[keep].finished and len(done[keep].token_ids) == 6
    assert not done[drop].finished  # its last step output came before the abort
    assert engine.core.all_blocks_free()


def test_stop_strings_and_stop_tokens(engine):
    (base,) = engine.generate(TEXT, SamplingParams(temperature=0, max_tokens=12, min_tokens=12))
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    cut = base.text.index(stop)
    params = SamplingParams(temperature=0, max_tokens=12, stop=[stop])
    (out,) = engine.generate(TEXT, params)
    assert out.text == base.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    with_stop = SamplingParams(
        temperature=0, max_tokens=12, stop=stop, include_stop_str_in_output=True
    )
    assert engine.generate(TEXT, with_stop)[0].text == base.text[: cut + len(stop)]
    streamed = "".join(d.text for d in engine.stream(TEXT, params))
    assert streamed == out.text
    token = base.token_ids[4]
    first = base.token_ids.index(token)
    (out,) = engine.generate(
        TEXT, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[token])
    )
    assert out.token_ids == base.token_ids[: first + 1] and out.stop_reason == token
    assert out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_in_any_batch(engine, image):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, min_tokens=12, seed=123)
    (alone,) = engine.generate(TEXT, params)
    others = [SamplingParams(temperature=0.8, max_tokens=5), GREEDY, SamplingParams(seed=9)]
    batch = engine.generate(
        ["x y z", TEXT, {"prompt": "hi", "images": [image]}, TEXT],
        [others[0], params, others[1], others[2]],
    )
    assert batch[1].token_ids == alone.token_ids
    (other_seed,) = engine.generate(
        TEXT, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, min_tokens=12, seed=124)
    )
    assert other_seed.token_ids != alone.token_ids


def test_logprobs(engine):
    (out,) = engine.generate(TEXT, SamplingParams(temperature=0, max_tokens=5, logprobs=3))
    assert len(out.logprobs) == 5
    for token, entries in zip(out.token_ids, out.logprobs, strict=True):
        assert len(entries) == 4
        sampled, *top = entries
        assert sampled.token_id == token and sampled.rank == 1  # greedy takes the top token
        assert top[0].token_id == token and [e.rank for e in top] == [1, 2, 3]
        assert all(a.logprob >= b.logprob for a, b in zip(top, top[1:], strict=False))
        assert all(e.logprob <= 0 for e in entries)
    (plain,) = engine.generate(TEXT, GREEDY)
    assert plain.logprobs is None


def test_request_output_fields_and_stats(engine):
    (first,) = engine.generate(TEXT, GREEDY)
    (second,) = engine.generate(TEXT, GREEDY)
    assert first.num_prompt_tokens == second.num_prompt_tokens > 8
    assert second.num_cached_tokens >= 8 and second.num_cached_tokens < second.num_prompt_tokens
    assert second.time_to_first_token > 0 and second.time_per_output_token > 0
    stats = engine.stats()
    assert set(stats) >= {"kv_cache", "prefix_cache", "encoder_cache", "scheduler", "requests"}
    assert stats["kv_cache"]["usage"] == 0.0 and stats["prefix_cache"]["hits"] > 0
    assert 0 < stats["prefix_cache"]["hit_rate"] < 1
    assert stats["requests"]["finished"] >= 2


def test_max_model_len(checkpoint):
    engine = Engine(checkpoint, device="cpu", dtype="float32", max_model_len=24)
    prompt = "a b c d e f g h i j k"
    (out,) = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=50))
    assert out.finish_reason == "length"
    assert out.num_prompt_tokens + len(out.token_ids) == 24
    with pytest.raises(InvalidInputError, match="max_model_len"):
        engine.generate(" ".join(["word"] * 40), GREEDY)
    with pytest.raises(InvalidPromptError):  # the whole batch is rejected, nothing stays queued
        engine.generate([prompt, {"prompt": "<start_of_image>", "images": []}], GREEDY)
    assert not engine.has_unfinished()


def test_options_are_checked(checkpoint):
    with pytest.raises(TypeError, match="max_num_seqz"):
        Engine(checkpoint, max_num_seqz=4)
    with pytest.raises(ValueError, match="block_size"):
        Engine(checkpoint, block_size=0)
    with pytest.raises(ValueError, match="scheduling_policy"):
        Engine(checkpoint, scheduling_policy="random")


def test_two_engines_in_one_process(checkpoint, tmp_path, image):
    # VLM_TEST_DEVICE=cuda runs it on a GPU, where the engines also share kernel state (arrival
    # counters) and the second one's memory plan must not count the first's allocations twice.
    device = os.environ.get("VLM_TEST_DEVICE", "cpu")
    other = make_tiny_checkpoint(tmp_path / "other", seed=7)
    a = Engine(checkpoint, device=device, dtype="float32", gpu_memory_utilization=0.3)
    b = Engine(other, device=device, dtype="float32", gpu_memory_utilization=0.6)
    prompt = {"prompt": "<start_of_image>" + TEXT, "images": [image]}
    alone_a, alone_b = a.generate(prompt, GREEDY)[0], b.generate(prompt, GREEDY)[0]
    a.add_request(prompt, GREEDY, request_id="x")
    b.add_request(prompt, GREEDY, request_id="x")  # the same id in another engine is fine
    results = {}
    while a.has_unfinished() or b.has_unfinished():
        for name, engine in (("a", a), ("b", b)):
            for out in engine.step():
                results[name] = out
    assert results["a"].token_ids == alone_a.token_ids
    assert results["b"].token_ids == alone_b.token_ids
    assert alone_a.token_ids != alone_b.token_ids
    a.close()  # the other keeps serving
    assert b.generate(prompt, GREEDY)[0].token_ids == alone_b.token_ids
    b.close()


def test_png_bytes_and_pil_share_the_image_hash(engine):
    image = Image.fromarray(np.random.default_rng(77).integers(0, 256, (30, 30, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    before = engine.stats()["vision_encoder"]["items_encoded"]
    engine.generate(
        [
            {"prompt": "<start_of_image>", "images": [image]},
            {"prompt": "<start_of_image>", "images": [buffer.getvalue()]},
        ],
        GREEDY,
    )
    assert engine.stats()["vision_encoder"]["items_encoded"] - before == 1


def test_a_generated_image_token_is_plain_text(engine):
    """The image soft-token id is in the vocabulary: when the model samples it, the next step
    embeds it as text (as transformers does), it is not mistaken for an image placeholder."""
    image_token = engine.model_config.image_tokens.image_token_id
    params = [
        SamplingParams(
            temperature=50.0, seed=10 + i, max_tokens=200, min_tokens=200, ignore_eos=True
        )
        for i in range(4)
    ]
    outs = engine.generate(["a b c"] * 4, params)
    assert any(image_token in o.token_ids for o in outs)  # the seeds make it happen
    assert all(len(o.token_ids) == 200 for o in outs)
    assert not engine.has_unfinished() and engine.core.all_blocks_free()


def test_preempted_seeded_requests_sample_what_they_would_have(checkpoint, image):
    prompts = [TEXT, {"prompt": "<start_of_image>" + TEXT, "images": [image]}, TEXT + " now"] * 4
    params = [
        SamplingParams(temperature=1.0, top_k=50, seed=i, max_tokens=24, min_tokens=24)
        for i in range(len(prompts))
    ]
    roomy = Engine(checkpoint, device="cpu", dtype="float32").generate(prompts, params)
    tight = Engine(checkpoint, device="cpu", dtype="float32", num_kv_blocks=12, block_size=8)
    outs = tight.generate(prompts, params)
    assert tight.stats()["scheduler"]["num_preemptions"] > 0
    assert tokens(outs) == tokens(roomy)
