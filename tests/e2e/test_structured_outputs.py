"""Structured outputs through the engine, on a tiny checkpoint with random weights: the constraint
alone has to make every output valid. About fifty requests over varied JSON schemas, greedy and
sampled, share batches with unconstrained requests (token for token what they are alone) and with
regex, choice and grammar requests; through the in-process core (one step at a time, and
overlapped) and the core in its own process. Then chunked prefill, preemption and prefix-cache
hits; the length limit; streaming, parallel samples and the async engine; bad constraints."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading

import pytest

from vlm_engine import AsyncEngine, Engine, SamplingParams
from vlm_engine.errors import InvalidSamplingParamsError
from vlm_engine.testing import make_tiny_checkpoint
from vlm_engine.testing.samples import random_image

jsonschema = pytest.importorskip("jsonschema", reason="validates the outputs against their schema")

pytestmark = pytest.mark.transformers  # xgrammar reads the vocabulary through transformers

# VLM_TEST_DEVICE=cuda runs them on a GPU (float32 there too): xgrammar's Triton kernel applies
# the bitmask there.
OPTIONS = dict(device=os.environ.get("VLM_TEST_DEVICE", "cpu"), dtype="float32", block_size=8)
MAX_TOKENS = 160

INT = {"type": "integer", "minimum": 0, "maximum": 99}


def short(n: int) -> dict:
    return {"type": "string", "maxLength": n}


def obj(properties: dict) -> dict:
    """An object whose properties are all required."""
    return {"type": "object", "properties": properties, "required": list(properties)}


SCHEMAS = [
    obj({"name": short(12), "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"ok": {"type": "boolean"}}),
    obj({"color": {"enum": ["red", "green", "blue"]}, "count": INT}),
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 4},
    obj({"tags": {"type": "array", "items": short(6), "minItems": 1, "maxItems": 3}}),
    obj({"point": obj({"x": INT, "y": INT}), "label": short(5)}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}),
    obj({"value": {"type": "number", "minimum": 0, "maximum": 1}}),
    obj({"kind": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1, "maximum": 50}}),
    obj({"shape": {"anyOf": [obj({"side": INT}), obj({"round": {"type": "boolean"}})]}}),
    {
        "type": "object",
        "properties": {"a": short(4), "b": short(4), "c": INT},
        "required": ["a"],  # b and c optional
    },
    obj(
        {
            "items": {
                "type": "array",
                "items": obj({"id": INT, "done": {"type": "boolean"}}),
                "minItems": 1,
                "maxItems": 2,
            }
        }
    ),  # fmt: skip
    obj({"maybe": {"type": ["string", "null"], "maxLength": 3}}),
    obj({"pair": {"type": "array", "prefixItems": [INT, {"enum": ["x", "y"]}], "items": False}}),
    obj({"day": {"type": "string", "format": "date"}}),
    obj(
        {
            "n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
            "s": {"type": "string", "minLength": 2, "maxLength": 4},
        }
    ),  # fmt: skip
    {
        "$defs": {"cell": obj({"v": INT})},
        "type": "object",
        "properties": {
            "cells": {
                "type": "array",
                "items": {"$ref": "#/$defs/cell"},
                "minItems": 1,
                "maxItems": 3,
            }
        },  # fmt: skip
        "required": ["cells"],
    },
    {"enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 100, "maximum": 999},
    obj({"flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2}}),
    obj({"m": obj({"n": obj({"o": {"enum": [1, 2, 3]}})})}),
    obj({"word": {"type": "string", "pattern": "^[a-z]{1,8}$"}}),
    {"type": "object", "properties": {"opt1": {"type": "boolean"}, "opt2": INT}},  # none required
    obj({"score": {"type": "number", "minimum": -1, "maximum": 1}, "name": {"enum": ["a", "b"]}}),
    obj({"id": {"type": "string", "format": "uuid"}}),
]
REGEX = r"[A-Z][a-z]{2,6} (is|was) [0-9]{1,3}"
CHOICES = ["red circle", 'the "blue" one', "gröen", "none"]
GRAMMAR = r"""root ::= "(" expr ")"
expr ::= term (("+" | "*") term){0,3}
term ::= [0-9] | "x"
"""
GRAMMAR_TEXT = re.compile(r"\((?:[0-9x])(?:[+*][0-9x]){0,3}\)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)


def constrained_requests() -> tuple[list, list[SamplingParams], list]:
    """Prompts, params and what each output must satisfy: a JSON schema, or a checker."""
    prompts, params, checks = [], [], []

    def add(prompt, image, constraint, check, greedy: bool, seed: int):
        prompts.append({"prompt": prompt, "images": [image]} if image is not None else prompt)
        params.append(
            SamplingParams(
                max_tokens=MAX_TOKENS,
                temperature=0 if greedy else 1.0,
                seed=None if greedy else seed,
                structured_outputs=constraint,
            )  # fmt: skip
        )
        checks.append(check)

    for i, schema in enumerate(SCHEMAS):
        image = random_image(32, 32, seed=i) if i % 3 == 0 else None
        for greedy in (True, False):
            add(f"answer {i} in json", image, {"json": schema}, schema, greedy, i)
    # ("any JSON object" leaves strings unbounded: random weights may never close one. The demo
    # model's tests hold a trained model to it.)
    for greedy in (True, False):
        add("a sentence", None, {"regex": REGEX}, re.compile(REGEX), greedy, 92)
        add("pick one", None, {"choice": CHOICES}, CHOICES, greedy, 93)
        add("an expression", None, {"grammar": GRAMMAR}, GRAMMAR_TEXT, greedy, 94)
    return prompts, params, checks


def unconstrained_requests() -> tuple[list, list[SamplingParams]]:
    prompts = [
        "free text about circles",
        {"prompt": "<start_of_image>what is this", "images": [random_image(40, 32, seed=7)]},
        "another free prompt",
        "a fourth one, sampled",
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=24, logprobs=2),
        SamplingParams(temperature=0, max_tokens=20),
        SamplingParams(temperature=0.8, seed=5, max_tokens=24),
        SamplingParams(temperature=1.0, seed=6, top_k=20, max_tokens=16),
    ]
    return prompts, params


def assert_valid(text: str, finish_reason: str, check) -> None:
    assert finish_reason == "stop", (finish_reason, text)
    if isinstance(check, dict):
        jsonschema.validate(json.loads(text), check)
    elif isinstance(check, list):
        assert text in check
    else:
        assert check.fullmatch(text), text


def interleave(a: list, b: list) -> list:
    """b's items spread through a (every len(a) // len(b) items)."""
    out, step = list(a), max(1, len(a) // len(b))
    for i, item in enumerate(b):
        out.insert(min(len(out), (i + 1) * step + i), item)
    return out


@pytest.mark.parametrize(
    "mode",
    [
        dict(async_scheduling=False),
        dict(async_scheduling=True),
        dict(async_scheduling=True, core_process=True),
    ],
    ids=["one-step-at-a-time", "overlapped", "core-process"],
)
def test_constrained_outputs_are_valid_and_leave_their_neighbours_untouched(checkpoint, mode):
    prompts, params, checks = constrained_requests()
    free_prompts, free_params = unconstrained_requests()
    assert len(prompts) >= 50
    with Engine(checkpoint, **OPTIONS, **mode) as engine:
        alone = engine.generate(free_prompts, free_params)
        tagged = interleave(
            [(p, s, c) for p, s, c in zip(prompts, params, checks, strict=True)],
            [(p, s, None) for p, s in zip(free_prompts, free_params, strict=True)],
        )
        outputs = engine.generate([t[0] for t in tagged], [t[1] for t in tagged])
        stats = engine.stats()["structured_outputs"]
        assert engine.core.all_blocks_free()
    together = []
    for (_, _, check), out in zip(tagged, outputs, strict=True):
        if check is None:
            together.append(out)
        else:
            assert_valid(out.text, out.finish_reason, check)
    for a, b in zip(alone, together, strict=True):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert [p.token_id for p in x] == [p.token_id for p in y]
    # Each distinct constraint compiled once, whatever the number of requests holding it.
    assert stats["grammars_compiled"] == len(SCHEMAS) + 3
    assert stats["active_matchers"] == 0 and stats["waiting_for_grammar"] == 0


def test_outputs_do_not_depend_on_the_batch_around_them(checkpoint):
    """Greedy constrained outputs alone equal those computed in a crowd."""
    prompts, params, _ = constrained_requests()
    with Engine(checkpoint, **OPTIONS) as engine:
        crowd = engine.generate(prompts, params)
        for i in range(0, len(prompts), 9):
            if params[i].temperature == 0:
                (alone,) = engine.generate([prompts[i]], params[i])
                assert alone.token_ids == crowd[i].token_ids, i


def test_chunked_prefill_preemption_and_prefix_hits(checkpoint):
    """Long prompts cut into chunks, a KV cache too small for all requests at once (some are
    preempted and recomputed), and prompts sharing a prefix: the matchers stay in step, and
    greedy outputs equal those of a roomy engine."""
    prefix = "a long shared preamble about shapes and colours " * 6
    prompts = [prefix + f"question {i}" for i in range(12)]
    prompts += [{"prompt": f"<start_of_image>image {i}", "images": [random_image(48, 40, i)]}
                for i in range(4)]  # fmt: skip
    params = [
        SamplingParams(
            temperature=0,
            max_tokens=MAX_TOKENS,
            structured_outputs={"json": SCHEMAS[i % len(SCHEMAS)]},
        )  # fmt: skip
        for i in range(len(prompts))
    ]
    with Engine(checkpoint, **OPTIONS) as roomy:
        expected = roomy.generate(prompts, params)
    tight = dict(OPTIONS, num_kv_blocks=40, max_num_batched_tokens=32, async_scheduling=True)
    with Engine(checkpoint, **tight) as engine:
        outputs = engine.generate(prompts, params)
        stats = engine.stats()
        assert engine.core.all_blocks_free()
    assert stats["scheduler"]["num_preemptions"] > 0
    assert stats["prefix_cache"]["hits"] > 0
    for i, (want, got) in enumerate(zip(expected, outputs, strict=True)):
        assert got.token_ids == want.token_ids, i
        assert_valid(got.text, got.finish_reason, SCHEMAS[i % len(SCHEMAS)])


def test_the_length_limit_ends_an_incomplete_output_with_length(checkpoint):
    schema = obj({"a": short(10), "b": short(10), "c": short(10)})
    with Engine(checkpoint, **OPTIONS) as engine:
        (out,) = engine.generate(
            "json", SamplingParams(temperature=0, max_tokens=5, structured_outputs={"json": schema})
        )
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert out.text.startswith('{"a":')
    with pytest.raises(ValueError):
        json.loads(out.text)  # documented: the text may be incomplete


def test_streaming_parallel_samples_and_logprobs(checkpoint):
    schema = SCHEMAS[2]
    with Engine(checkpoint, **OPTIONS) as engine:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=3,
                                structured_outputs={"json": schema})  # fmt: skip
        (whole,) = engine.generate("stream me", params)
        pieces = [out.text for out in engine.stream("stream me", params)]
        assert "".join(pieces) == whole.text
        jsonschema.validate(json.loads(whole.text), schema)
        for entry in whole.logprobs:
            assert entry[0].logprob > float("-inf")  # the sampled token was allowed
        samples = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=MAX_TOKENS,
                                 structured_outputs={"choice": CHOICES})  # fmt: skip
        (out,) = engine.generate("choose", samples)
        assert len(out.outputs) == 4 and all(c.text in CHOICES for c in out.outputs)


def test_the_async_engine_takes_constraints(checkpoint):
    async def run() -> list[str]:
        engine = AsyncEngine(checkpoint, **OPTIONS)
        try:

            async def one(i: int) -> str:
                params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                        structured_outputs={"json": SCHEMAS[i]})  # fmt: skip
                text = ""
                async for out in engine.generate(f"async {i}", params):
                    text += out.text
                return text

            return await asyncio.gather(*(one(i) for i in range(6)))
        finally:
            engine.shutdown()

    for i, text in enumerate(asyncio.run(run())):
        jsonschema.validate(json.loads(text), SCHEMAS[i])


BAD = {
    "unsupported-keyword": {"json": {"type": "array", "uniqueItems": True}},
    "bad-type": {"json": {"type": "objectx"}},
    "bad-regex": {"regex": "(unclosed"},
    "undefined-rule": {"grammar": "root ::= missing"},
}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_constraint_fails_its_request_alone(checkpoint, name):
    good = SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                          structured_outputs={"json": SCHEMAS[1]})  # fmt: skip
    with Engine(checkpoint, **OPTIONS) as engine:
        bad = SamplingParams(temperature=0, structured_outputs=BAD[name])  # well-formed
        with pytest.raises(InvalidSamplingParamsError, match="structured_outputs"):
            engine.generate(["before", "bad", "after"], [good, bad, good])
        outputs = engine.generate(["before", "bad", "after"], [good, bad, good], on_error="return")
        assert isinstance(outputs[1].error, InvalidSamplingParamsError)
        for out in (outputs[0], outputs[2]):
            assert_valid(out.text, out.finish_reason, SCHEMAS[1])
        assert engine.core.all_blocks_free()


def test_a_new_grammar_compiles_off_the_scheduling_path(checkpoint):
    """While a constraint compiles, its request waits outside the scheduler and the other
    requests keep stepping; an abort reaches a request still waiting; once compiled, the request
    runs. (The compile is held back on purpose, with the real xgrammar compile behind it.)"""
    with Engine(checkpoint, **OPTIONS, core_process=False) as engine:  # its internals
        core = engine.core.engine_core
        release = threading.Event()
        compile_for_real = core.structured._compile

        def held_compile(spec):
            assert release.wait(60)
            return compile_for_real(spec)

        core.structured._compile = held_compile
        free = SamplingParams(temperature=0, max_tokens=12, min_tokens=12, ignore_eos=True)
        held = SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                              structured_outputs={"json": SCHEMAS[2]})  # fmt: skip
        engine.add_request("free running", free, request_id="free")
        engine.add_request("held back", held, request_id="held")
        engine.add_request("aborted while waiting", held, request_id="gone")
        finished = {}
        for _ in range(12):
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
        assert set(finished) == {"free"} and len(finished["free"].token_ids) == 12
        stats = engine.stats()
        assert stats["structured_outputs"]["waiting_for_grammar"] == 2
        assert stats["scheduler"]["num_waiting"] == 0  # not in the scheduler's queue
        engine.abort_request("gone")
        release.set()
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
        assert set(finished) == {"free", "held"}
        assert_valid(finished["held"].text, finished["held"].finish_reason, SCHEMAS[2])
        assert engine.stats()["structured_outputs"]["grammars_compiled"] == 1
        assert engine.core.all_blocks_free()


def test_warm_up_builds_the_vocabulary_tables_before_any_request(checkpoint):
    """What a GPU engine does at start (here called by hand): the first constrained request then
    waits for its own grammar only."""
    with Engine(checkpoint, **OPTIONS, core_process=False) as engine:  # its internals
        manager = engine.core.engine_core.structured
        manager.warm_up().result(60)
        assert manager._compiler is not None and set(manager._json_masks) == {False, True}
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                structured_outputs={"json": SCHEMAS[0]})  # fmt: skip
        (out,) = engine.generate("after the warm-up", params)
        assert_valid(out.text, out.finish_reason, SCHEMAS[0])
