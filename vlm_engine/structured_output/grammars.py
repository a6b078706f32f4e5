"""A request's constraint (`StructuredOutputs`) as an xgrammar grammar, checked before it runs.

`check` is what the frontend calls for every constrained request: it builds the grammar without
a tokenizer (so with no vocabulary work), which finds syntax errors in a schema, a regex or an
EBNF grammar, and it rejects the JSON-schema keywords xgrammar would silently ignore, so that an
output never looks valid to the engine while a validator rejects it. `compile_constraint` is
what the core calls, off its scheduling thread, to compile a checked constraint against the
tokenizer's vocabulary.

xgrammar is imported on first use: its import costs seconds and loads torch and transformers.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from typing import Any

from vlm_engine.errors import InvalidSamplingParamsError
from vlm_engine.sampling_params import StructuredOutputs

# Keywords that constrain a value but that xgrammar does not enforce. A schema using one is
# rejected: the output could break it while every token was allowed.
UNSUPPORTED_KEYWORDS = frozenset(
    {
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
# String formats xgrammar enforces; any other "format" is rejected, not ignored.
SUPPORTED_FORMATS = frozenset(
    {
        "email", "date", "time", "date-time", "duration", "uuid", "uri", "uri-reference",
        "ipv4", "ipv6", "hostname", "json-pointer", "relative-json-pointer",
    }
)  # fmt: skip
# Where a schema holds subschemas: keyword -> how (one schema, a list, or a map of them).
_ONE = ("additionalProperties", "items", "propertyNames", "additionalItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions")
_BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_LENGTHS = frozenset({"minLength", "maxLength"})
_LOCATION = re.compile(r"^\[[\d:.]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: " prefix


def check(spec: StructuredOutputs) -> None:
    """Raise `InvalidSamplingParamsError` if the constraint cannot be enforced as written."""
    _checked(spec)


@functools.lru_cache(maxsize=512)
def _checked(spec: StructuredOutputs) -> bool:
    if spec.json is not None:
        _check_schema_keywords(json.loads(spec.json))
    grammar(spec)
    return True


def grammar(spec: StructuredOutputs) -> Any:
    """The constraint as an `xgrammar.Grammar` (no vocabulary needed)."""
    import xgrammar

    with _as_invalid_params(spec):
        if spec.json is not None:
            return xgrammar.Grammar.from_json_schema(
                spec.json, any_whitespace=spec.any_whitespace, strict_mode=True
            )
        if spec.json_object:
            return xgrammar.Grammar.from_json_schema(
                '{"type":"object"}', any_whitespace=spec.any_whitespace, strict_mode=False
            )
        if spec.regex is not None:
            return xgrammar.Grammar.from_regex(spec.regex)
        if spec.choice is not None:
            return xgrammar.Grammar.from_ebnf(choice_ebnf(spec.choice))
        return xgrammar.Grammar.from_ebnf(spec.grammar)


def compile_constraint(compiler: Any, spec: StructuredOutputs) -> Any:
    """The constraint compiled against the vocabulary `compiler` was built with."""
    with _as_invalid_params(spec):
        if spec.json is not None:
            return compiler.compile_json_schema(
                spec.json, any_whitespace=spec.any_whitespace, strict_mode=True
            )
        return compiler.compile_grammar(grammar(spec))


def choice_ebnf(choices: tuple[str, ...]) -> str:
    """A grammar whose root is exactly one of `choices` (EBNF string literals are JSON's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class _as_invalid_params:
    """xgrammar's RuntimeError about a constraint, as the request's typed error."""

    def __init__(self, spec: StructuredOutputs):
        self.kind = spec.kind

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None and isinstance(error, RuntimeError | ValueError):
            message = _LOCATION.sub("", str(error).strip())
            raise InvalidSamplingParamsError(
                f"structured_outputs.{self.kind} cannot be enforced: {message}"
            ) from None
        return False


def _check_schema_keywords(schema: Any) -> None:
    for where, node in _subschemas(schema, "#"):
        used = sorted(UNSUPPORTED_KEYWORDS.intersection(node))
        if used:
            raise InvalidSamplingParamsError(
                f"structured_outputs.json: keyword {used[0]!r} at {where} is not supported "
                "(the output could not be held to it)"
            )
        fmt = node.get("format")
        if fmt is not None and fmt not in SUPPORTED_FORMATS:
            raise InvalidSamplingParamsError(
                f"structured_outputs.json: format {fmt!r} at {where} is not supported; "
                f"supported formats: {', '.join(sorted(SUPPORTED_FORMATS))}"
            )
        if "multipleOf" in node and (_types(node) != {"integer"} or _BOUNDS.intersection(node)):
            raise InvalidSamplingParamsError(
                f"structured_outputs.json: multipleOf at {where} is supported for integers "
                "without bounds only"
            )
        lengths = _LENGTHS.intersection(node)
        for other in ("pattern", "format"):
            if lengths and other in node:
                raise InvalidSamplingParamsError(
                    f"structured_outputs.json: {other} with {min(lengths)} at {where} is not "
                    f"supported (put the length into the pattern)"
                )


def _types(node: dict[str, Any]) -> set[str]:
    kind = node.get("type")
    return {kind} if isinstance(kind, str) else set(kind) if isinstance(kind, list) else set()


def _subschemas(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object inside `node` (itself first), with its JSON pointer. Keys of
    `properties` are property names, never keywords, so only schema positions are walked."""
    if not isinstance(node, dict):
        return
    yield where, node
    for key in _ONE:
        if key in node:
            yield from _subschemas(node[key], f"{where}/{key}")
    for key in _LIST:
        if isinstance(node.get(key), list):
            for i, item in enumerate(node[key]):
                yield from _subschemas(item, f"{where}/{key}/{i}")
    if isinstance(node.get("items"), list):  # the older tuple form of prefixItems
        for i, item in enumerate(node["items"]):
            yield from _subschemas(item, f"{where}/items/{i}")
    for key in _MAP:
        if isinstance(node.get(key), dict):
            for name, item in node[key].items():
                yield from _subschemas(item, f"{where}/{key}/{_escape(name)}")


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")
