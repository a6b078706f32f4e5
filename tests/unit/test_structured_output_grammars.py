"""Structured-outputs constraints: what `StructuredOutputs` accepts, which constraints the frontend
rejects before a request runs (and why), the grammars they become, and the sampler's bitmask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlm_engine.core.messages import _params_from_map, _params_to_map, pack, unpack
from vlm_engine.errors import InvalidSamplingParamsError, SamplingParamsTypeError
from vlm_engine.runtime.sampler import Sampler, SamplingBatch, SamplingRow
from vlm_engine.sampling_params import SamplingParams, StructuredOutputs
from vlm_engine.structured_output import grammars

xgrammar = pytest.importorskip("xgrammar", reason="structured outputs run on xgrammar")
from xgrammar.testing import _is_grammar_accept_string as accepts  # noqa: E402

OBJECT = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}


# --- the parameters -----------------------------------------------------------------------


def test_a_schema_dict_and_its_text_are_the_same_constraint_in_property_order():
    as_dict = StructuredOutputs(json=OBJECT)
    as_text = StructuredOutputs(json=json.dumps(OBJECT, indent=2))
    assert as_dict == as_text and hash(as_dict) == hash(as_text)
    assert list(json.loads(as_dict.json)["properties"]) == ["b", "a"]
    assert as_dict.kind == "json"


def test_sampling_params_take_a_mapping_and_the_wire_keeps_it():
    params = SamplingParams(structured_outputs={"choice": ["yes", "no"], "any_whitespace": True})
    assert params.structured_outputs == StructuredOutputs(choice=("yes", "no"), any_whitespace=True)
    for spec in (
        StructuredOutputs(json=OBJECT),
        StructuredOutputs(json_object=True),
        StructuredOutputs(regex=r"\d+"),
        StructuredOutputs(choice=["a", 'b"c']),
        StructuredOutputs(grammar='root ::= "x"'),
    ):
        params = SamplingParams(structured_outputs=spec, temperature=0)
        assert _params_from_map(unpack(pack(_params_to_map(params)))) == params


@pytest.mark.parametrize(
    "values, error, words",
    [
        ({}, InvalidSamplingParamsError, "exactly one of"),
        ({"regex": "a", "choice": ["a"]}, InvalidSamplingParamsError, "got regex, choice"),
        ({"json": "{not json"}, InvalidSamplingParamsError, "not valid JSON"),
        ({"json": "[1, 2]"}, InvalidSamplingParamsError, "must be a JSON schema"),
        ({"json": 3}, SamplingParamsTypeError, "structured_outputs.json"),
        ({"choice": []}, InvalidSamplingParamsError, "at least one"),
        ({"choice": ["a", ""]}, InvalidSamplingParamsError, "non-empty"),
        ({"choice": "ab"}, SamplingParamsTypeError, "a list"),
        ({"regex": ""}, InvalidSamplingParamsError, "must not be empty"),
        ({"json_object": 1}, SamplingParamsTypeError, "a bool"),
        ({"schema": {}}, InvalidSamplingParamsError, "no field schema"),
    ],
)
def test_malformed_constraints_are_typed_errors(values, error, words):
    with pytest.raises(error, match=words):
        SamplingParams(structured_outputs=values)


def test_the_grammar_decides_where_the_output_ends():
    with pytest.raises(InvalidSamplingParamsError, match="ignore_eos"):
        SamplingParams(structured_outputs={"json_object": True}, ignore_eos=True)
    with pytest.raises(InvalidSamplingParamsError, match="min_tokens"):
        SamplingParams(structured_outputs={"json_object": True}, min_tokens=3)
    with pytest.raises(SamplingParamsTypeError, match="structured_outputs"):
        SamplingParams(structured_outputs="{}")


# --- what the frontend rejects ------------------------------------------------------------


@pytest.mark.parametrize(
    "schema, words",
    [
        (
            {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
            "'uniqueItems' at #",
        ),
        (
            {"type": "object", "properties": {"tags": {"type": "array", "contains": {}}}},
            "'contains' at #/properties/tags",
        ),
        ({"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}, "'not' at #/anyOf/1"),
        ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "'if' at #"),
        ({"$defs": {"x": {"type": "string", "format": "regex"}}}, "format 'regex' at #/.defs/x"),
        ({"type": "number", "multipleOf": 0.5}, "multipleOf at #"),
        ({"type": "integer", "multipleOf": 3, "maximum": 30}, "multipleOf at #"),
        ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 8}, "pattern with maxLength"),
        ({"type": "string", "format": "date", "minLength": 8}, "format with minLength"),
        ({"type": "objectx"}, "Unsupported type"),
        ({"type": "string", "pattern": "(("}, "cannot be enforced"),
        ({"$ref": "#/$defs/missing"}, "cannot be enforced"),
    ],
)
def test_schemas_the_engine_cannot_hold_an_output_to_are_rejected(schema, words):
    with pytest.raises(InvalidSamplingParamsError, match=words) as caught:
        grammars.check(StructuredOutputs(json=schema))
    assert ".cc:" not in str(caught.value)  # xgrammar's source location is not the user's


def test_keywords_are_looked_for_in_schema_positions_only():
    """A property may be named like a keyword the engine rejects."""
    schema = {
        "type": "object",
        "properties": {"not": {"type": "boolean"}, "if": {"type": "string", "format": "email"}},
        "required": ["not"],
    }
    grammars.check(StructuredOutputs(json=schema))


@pytest.mark.parametrize(
    "values, words",
    [
        ({"regex": "(a)\\1"}, "Backreference"),
        ({"regex": "(?=a)a"}, "Lookahead"),
        ({"regex": "a{3,1}"}, "structured_outputs.regex cannot be enforced"),
        ({"grammar": "root ::= other"}, 'Rule "other" is not defined'),
        ({"grammar": 'start ::= "a"'}, "root rule"),
    ],
)
def test_bad_regexes_and_grammars_are_rejected(values, words):
    with pytest.raises(InvalidSamplingParamsError, match=words):
        grammars.check(StructuredOutputs(**values))


# --- the grammars -------------------------------------------------------------------------


def test_choices_are_exact_strings_even_with_quotes_backslashes_and_non_ascii():
    choices = ('say "hi"', "back\\slash", "café", "two\nlines")
    grammar = grammars.grammar(StructuredOutputs(choice=choices))
    for choice in choices:
        assert accepts(grammar, choice)
    assert not accepts(grammar, "say hi") and not accepts(grammar, "café!")


def test_json_object_is_any_object_and_nothing_else():
    grammar = grammars.grammar(StructuredOutputs(json_object=True))
    assert accepts(grammar, '{"a": {"b": [1, 2.5, null]}, "c": "d"}')
    assert accepts(grammar, "{}")
    for not_an_object in ("[1]", "1", '"text"', "{"):
        assert not accepts(grammar, not_an_object)


def test_a_schema_holds_required_fields_enums_and_bounds():
    schema = {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "blue"]},
            "count": {"type": "integer", "minimum": 1, "maximum": 3},
        },
        "required": ["color", "count"],
    }
    grammar = grammars.grammar(StructuredOutputs(json=schema))
    assert accepts(grammar, '{"color": "red", "count": 2}')
    assert not accepts(grammar, '{"color": "green", "count": 2}')
    assert not accepts(grammar, '{"color": "red", "count": 4}')
    assert not accepts(grammar, '{"color": "red"}')
    assert not accepts(grammar, '{"color": "red", "count": 2, "extra": 1}')  # strict
    assert not accepts(grammar, '{"color":"red","count":2}')  # spacing as json.dumps writes
    loose = grammars.grammar(StructuredOutputs(json=schema, any_whitespace=True))
    assert accepts(loose, '{"color":"red",\n  "count":2}')


# --- the sampler ----------------------------------------------------------------------------


def _bitmask(allowed: list[set[int] | None], vocab_size: int) -> torch.Tensor:
    """xgrammar's layout: token t is bit t % 32 of word t // 32; None allows every token."""
    words = -(-vocab_size // 32)
    bitmask = torch.full((len(allowed), words), -1, dtype=torch.int32)
    for row, tokens in enumerate(allowed):
        if tokens is not None:
            bits = np.zeros(words * 32, dtype=bool)
            bits[list(tokens)] = True
            packed = np.packbits(bits, bitorder="little").view("<i4")
            bitmask[row] = torch.from_numpy(packed.copy())
    return bitmask


def test_the_bitmask_masks_constrained_rows_before_sampling_and_logprobs():
    vocab, rows = 70, 4
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    allowed = [{3, 40}, None, {69}, None]
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=1.0, seed=1, logprobs=3),
        SamplingParams(temperature=1.0, seed=2, logprobs=3),
    ]

    def batch(mask):
        sampling_rows = [
            SamplingRow(p, [1, 2], [], torch.Generator().manual_seed(p.seed or 0), frozenset({1}))
            for p in params
        ]
        return SamplingBatch.from_rows(sampling_rows, vocab, torch.device("cpu"), mask)

    masked = Sampler(seed=0)(logits, batch(_bitmask(allowed, vocab)))
    free = Sampler(seed=0)(logits, batch(None))
    sampled = masked.sampled_token_ids.tolist()
    assert sampled[0] == max((3, 40), key=lambda t: logits[0, t]) and sampled[2] == 69
    # Unconstrained rows: the same tokens and logprobs as with no bitmask at all.
    for row in (1, 3):
        assert sampled[row] == free.sampled_token_ids[row]
        assert torch.equal(masked.logprobs[row], free.logprobs[row])
    # Logprobs describe the masked distribution: the allowed tokens hold all of it.
    assert masked.logprobs[2, 0] == 0.0 and masked.logprob_token_ids[0, 1:3].tolist() == sorted(
        (3, 40), key=lambda t: -logits[0, t]
    )
    assert masked.logprobs[0, 3] == float("-inf")  # a third token was ruled out
