"""SamplingParams: defaults, normalization, and a ValueError naming the field for each bad value."""

from __future__ import annotations

import dataclasses
import math

import pytest

from vlm_engine.sampling_params import SamplingParams

INVALID = [
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 2.0),
    ("max_tokens", True),
    ("max_tokens", "16"),
    ("max_tokens", None),
    ("min_tokens", -1),
    ("min_tokens", 1.5),
    ("min_tokens", False),
    ("temperature", -1),
    ("temperature", -1e-9),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", True),
    ("temperature", "0.7"),
    ("temperature", None),
    ("top_k", -2),
    ("top_k", 1.0),
    ("top_k", True),
    ("top_p", 0),
    ("top_p", -0.1),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_p", False),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("min_p", math.inf),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("repetition_penalty", math.nan),
    ("presence_penalty", 2.01),
    ("presence_penalty", -2.5),
    ("presence_penalty", math.nan),
    ("frequency_penalty", 3),
    ("frequency_penalty", -2.01),
    ("frequency_penalty", "1"),
    ("seed", 1.0),
    ("seed", True),
    ("seed", "7"),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("stop", ""),
    ("stop", [""]),
    ("stop", ["ok", 3]),
    ("stop", 3),
    ("stop", {"a"}),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", 5),
    ("stop_token_ids", "12"),
    ("ignore_eos", 1),
    ("ignore_eos", None),
    ("include_stop_str_in_output", "yes"),
    ("skip_special_tokens", 0),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 1.0),
    ("logprobs", True),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_names_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"^min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_message_shows_bound_and_value():
    with pytest.raises(ValueError, match=r"^temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1)


def test_defaults():
    params = SamplingParams()
    assert (params.max_tokens, params.min_tokens, params.temperature) == (16, 0, 1.0)
    assert (params.top_k, params.top_p, params.min_p) == (0, 1.0, 0.0)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (
        1.0,
        0.0,
        0.0,
    )
    assert params.seed is None and params.logprobs is None
    assert params.stop == () and params.stop_token_ids == ()
    assert not params.ignore_eos and not params.include_stop_str_in_output
    assert params.skip_special_tokens
    assert not params.is_greedy


VALID_EDGES = [
    {"max_tokens": 1, "min_tokens": 1},
    {"temperature": 0},
    {"top_k": -1},
    {"top_k": 1},
    {"top_p": 1},
    {"top_p": 1e-6},
    {"min_p": 0},
    {"min_p": 1},
    {"repetition_penalty": 1e-3},
    {"presence_penalty": -2, "frequency_penalty": 2},
    {"seed": 0},
    {"seed": -(2**63)},
    {"seed": 2**64 - 1},
    {"logprobs": 0},
    {"logprobs": 20},
    {"stop": None, "stop_token_ids": None},
]


@pytest.mark.parametrize("kwargs", VALID_EDGES, ids=[repr(k) for k in VALID_EDGES])
def test_edge_values_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        if value is not None:
            assert getattr(params, name) == value


def test_numbers_stored_as_float():
    params = SamplingParams(temperature=0, top_p=1, repetition_penalty=2, presence_penalty=-1)
    assert params.is_greedy
    for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty"):
        assert type(getattr(params, name)) is float


def test_stop_string_becomes_tuple():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)


def test_stop_list_becomes_tuple():
    params = SamplingParams(stop=["a", "bc"], stop_token_ids=[7, 0, 7])
    assert params.stop == ("a", "bc")
    assert params.stop_token_ids == (7, 0, 7)


def test_stop_none_becomes_empty():
    params = SamplingParams(stop=None, stop_token_ids=None)
    assert params.stop == () and params.stop_token_ids == ()


def test_equal_params_hash_equal():
    a = SamplingParams(stop=["x"], stop_token_ids=[1, 2], seed=3)
    b = SamplingParams(stop=("x",), stop_token_ids=(1, 2), seed=3)
    assert a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1


def test_frozen():
    params = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.5


def test_unknown_keyword_is_type_error():
    with pytest.raises(TypeError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=8)


def test_greedy_only_at_zero_temperature():
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy
