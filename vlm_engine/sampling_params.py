"""How one request samples its output tokens: length, randomness, penalties, stops, logprobs."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from vlm_engine.errors import InvalidSamplingParamsError, SamplingParamsTypeError

MAX_NUM_LOGPROBS = 20
MAX_N = 128  # samples per request, as OpenAI's API allows
# The seed range torch.Generator.manual_seed accepts (negative seeds wrap to unsigned).
_SEED_RANGE = (-(2**63), 2**64)

CONSTRAINTS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    """One constraint on a request's output text, enforced token by token while decoding.

    Exactly one of:
    - ``json``: a JSON schema, as a dict or as JSON text; the output is one JSON value valid
      under it. Stored as compact JSON text, so the object is hashable and the properties keep
      their order (the order the output writes them in);
    - ``json_object=True``: any JSON object;
    - ``regex``: a regular expression the whole output matches;
    - ``choice``: a list of strings; the output is exactly one of them;
    - ``grammar``: an EBNF grammar (xgrammar's dialect, GBNF-like) whose ``root`` rule the
      output matches.

    ``any_whitespace`` lets JSON outputs put any whitespace between tokens; by default (False)
    they are written as ``json.dumps`` writes them (``", "`` and ``": "``), which keeps a model
    from spending its tokens on blank space. A constraint is checked for types here and compiled
    (and so checked for syntax and support) when its request is added to an engine.
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    any_whitespace: bool = False

    def __post_init__(self) -> None:
        name = "structured_outputs"
        if isinstance(self.json, Mapping):
            object.__setattr__(self, "json", _schema_text(self.json))
        elif self.json is not None:
            if not isinstance(self.json, str):
                raise SamplingParamsTypeError(
                    _expected(f"{name}.json", "a JSON schema (a dict or JSON text)", self.json)
                )
            try:
                schema = json.loads(self.json)
            except ValueError as e:
                raise InvalidSamplingParamsError(f"{name}.json is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise InvalidSamplingParamsError(
                    f"{name}.json must be a JSON schema (an object), got {self.json[:80]!r}"
                )
            object.__setattr__(self, "json", _schema_text(schema))
        for flag in ("json_object", "any_whitespace"):
            if not isinstance(getattr(self, flag), bool):
                raise SamplingParamsTypeError(
                    _expected(f"{name}.{flag}", "a bool", getattr(self, flag))
                )
        for text in ("regex", "grammar"):
            value = getattr(self, text)
            if value is not None and not isinstance(value, str):
                raise SamplingParamsTypeError(_expected(f"{name}.{text}", "a str", value))
            if value == "":
                raise InvalidSamplingParamsError(f"{name}.{text} must not be empty")
        if self.choice is not None:
            choice = _as_tuple(f"{name}.choice", self.choice)
            if not choice:
                raise InvalidSamplingParamsError(f"{name}.choice must hold at least one string")
            for c in choice:
                if not isinstance(c, str):
                    raise SamplingParamsTypeError(_expected(f"{name}.choice", "strings", c))
                if not c:
                    raise InvalidSamplingParamsError(
                        f"{name}.choice must hold non-empty strings, got {c!r}"
                    )
            object.__setattr__(self, "choice", choice)
        given = [c for c in CONSTRAINTS if getattr(self, c) not in (None, False)]
        if len(given) != 1:
            raise InvalidSamplingParamsError(
                f"{name} takes exactly one of {', '.join(CONSTRAINTS)}; got "
                f"{', '.join(given) if given else 'none'}"
            )

    @property
    def kind(self) -> str:
        """Which constraint is set: one of CONSTRAINTS."""
        return next(c for c in CONSTRAINTS if getattr(self, c) not in (None, False))

    @classmethod
    def from_mapping(cls, values: Mapping) -> StructuredOutputs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(values) - known))
        if unknown:
            raise InvalidSamplingParamsError(
                f"structured_outputs has no field {', '.join(unknown)}; "
                f"it takes {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_mapping(self) -> dict[str, object]:
        """The fields that are set, as plain values (what `from_mapping` takes back)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values = {k: v for k, v in values.items() if v not in (None, False)}
        if self.choice is not None:
            values["choice"] = list(self.choice)
        return values


def _schema_text(schema: object) -> str:
    try:
        return json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidSamplingParamsError(
            f"structured_outputs.json must be JSON-serializable: {e}"
        ) from None


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request, validated once at construction.

    Every invalid value raises ``InvalidSamplingParamsError`` (a ``ValueError``) whose message
    starts with the field name, a value of the wrong type its subclass
    ``SamplingParamsTypeError`` (also a ``TypeError``); unknown keyword arguments raise
    ``TypeError``. ``stop`` accepts a string or a list of
    strings and ``stop_token_ids`` a list of ints; both are stored as tuples, so the object is
    hashable. ``top_k`` of 0 or -1 disables top-k; ``temperature`` of 0 means greedy. ``n``
    samples of one prompt share its KV blocks and image encodings; with a ``seed``, sample 0
    uses it as given and each other sample a seed derived from it and its index.
    ``structured_outputs`` constrains the output to a JSON schema, a regular expression, a
    list of choices or a grammar (`StructuredOutputs`); it cannot be combined with
    ``ignore_eos`` or ``min_tokens``, since the grammar decides where the output ends.
    """

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top logprobs per output token; 0 = only the sampled token's
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None  # a mapping of its fields is taken too

    def __post_init__(self) -> None:
        self._normalize_stops()
        self._validate_lengths()
        self._validate_sampling()
        self._validate_penalties()
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsTypeError(_expected(name, "a bool", getattr(self, name)))
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_NUM_LOGPROBS)
        self._validate_structured_outputs()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """Penalties read the output tokens so far, so sampling waits for all of them."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def _normalize_stops(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else _as_tuple("stop", self.stop)
        for s in stop:
            if not isinstance(s, str):
                raise SamplingParamsTypeError(_expected("stop", "strings", s))
            if not s:
                raise InvalidSamplingParamsError(_expected("stop", "non-empty strings", s))
        stop_token_ids = _as_tuple("stop_token_ids", self.stop_token_ids)
        for token_id in stop_token_ids:
            _check_int("stop_token_ids", token_id, 0, None)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", stop_token_ids)

    def _validate_lengths(self) -> None:
        _check_int("n", self.n, 1, MAX_N)
        _check_int("max_tokens", self.max_tokens, 1, None)
        _check_int("min_tokens", self.min_tokens, 0, None)
        if self.min_tokens > self.max_tokens:
            raise InvalidSamplingParamsError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )

    def _validate_sampling(self) -> None:
        self._set_float("temperature")
        if self.temperature < 0:
            raise InvalidSamplingParamsError(f"temperature must be >= 0, got {self.temperature}")
        _check_int("top_k", self.top_k, -1, None)
        self._set_float("top_p")
        if not 0 < self.top_p <= 1:
            raise InvalidSamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")
        self._set_float("min_p")
        if not 0 <= self.min_p <= 1:
            raise InvalidSamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            low, high = _SEED_RANGE
            if not _is_int(self.seed):
                raise SamplingParamsTypeError(_expected("seed", "an int or None", self.seed))
            if not low <= self.seed < high:
                raise InvalidSamplingParamsError(
                    _expected("seed", "an int in [-2**63, 2**64) or None", self.seed)
                )

    def _validate_penalties(self) -> None:
        self._set_float("repetition_penalty")
        if self.repetition_penalty <= 0:
            raise InvalidSamplingParamsError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            self._set_float(name)
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidSamplingParamsError(
                    f"{name} must be in [-2, 2], got {getattr(self, name)}"
                )

    def _validate_structured_outputs(self) -> None:
        value = self.structured_outputs
        if value is None:
            return
        if isinstance(value, Mapping):
            value = StructuredOutputs.from_mapping(value)
        elif not isinstance(value, StructuredOutputs):
            raise SamplingParamsTypeError(
                _expected("structured_outputs", "a StructuredOutputs, a mapping or None", value)
            )
        object.__setattr__(self, "structured_outputs", value)
        # The grammar decides where the output may end: nothing may override it.
        if self.ignore_eos:
            raise InvalidSamplingParamsError(
                "ignore_eos cannot be combined with structured_outputs: the grammar decides "
                "where the output ends"
            )
        if self.min_tokens:
            raise InvalidSamplingParamsError(
                "min_tokens cannot be combined with structured_outputs: the grammar decides "
                f"where the output ends, got min_tokens={self.min_tokens}"
            )

    def _set_float(self, name: str) -> None:
        """Store a finite int or float field as a float (so `temperature=0` reads back as 0.0)."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SamplingParamsTypeError(_expected(name, "a number", value))
        if not math.isfinite(value):
            raise InvalidSamplingParamsError(_expected(name, "finite", value))
        object.__setattr__(self, name, float(value))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if not _is_int(value):
        raise SamplingParamsTypeError(_expected(name, "an int", value))
    if value < low:
        raise InvalidSamplingParamsError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InvalidSamplingParamsError(f"{name} must be <= {high}, got {value}")


def _as_tuple(name: str, values: object) -> tuple:
    """A list or tuple as a tuple; None as (). Anything else (a set, a bare int) is an error."""
    if values is None:
        return ()
    if not isinstance(values, list | tuple):
        raise SamplingParamsTypeError(_expected(name, "a list", values))
    return tuple(values)


def _expected(name: str, what: str, value: object) -> str:
    return f"{name} must be {what}, got {value!r} ({type(value).__name__})"
