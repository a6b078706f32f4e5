"""OpenAI requests become engine prompts and `SamplingParams`; engine outputs become OpenAI
responses and stream chunks."""

from __future__ import annotations

from typing import Any

import httpx

from vlm_engine.errors import InvalidInputError, InvalidSamplingParamsError
from vlm_engine.outputs import CompletionOutput, Logprob, RequestOutput
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.server import protocol as p
from vlm_engine.server.media import MediaPolicy, resolve_image
from vlm_engine.structured_output import grammars

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "error": "error"}
# JSON has no infinity: a token a grammar rules out (logprob -inf) is reported with this
# (as vLLM's server does).
MIN_LOGPROB = -9999.0


def sampling_params(
    request: p.SamplingFields, max_tokens: int | None, logprobs: int | None, max_model_len: int
) -> SamplingParams:
    """The request's sampling fields; a bad value raises `InvalidSamplingParamsError` naming
    the field. Without a token limit the output may run to the end of the context."""
    optional = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty,
    }
    params = SamplingParams(
        n=request.n,
        max_tokens=max_model_len if max_tokens is None else max_tokens,
        min_tokens=request.min_tokens,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        seed=request.seed,
        stop=request.stop if request.stop is not None else (),
        ignore_eos=request.ignore_eos,
        skip_special_tokens=request.skip_special_tokens,
        logprobs=logprobs,
        structured_outputs=structured_outputs(request),
        **{name: value for name, value in optional.items() if value is not None},
    )
    if params.structured_outputs is not None:
        grammars.check(params.structured_outputs)  # here, so the error names the field alone
    return params


def structured_outputs(request: p.SamplingFields) -> dict[str, Any] | None:
    """The request's constraint: OpenAI's `response_format` (json_object, json_schema) or
    vLLM's `structured_outputs` (json, regex, choice, grammar, json_object), not both."""
    fmt, extra = request.response_format, request.structured_outputs
    if fmt is not None and fmt.type != "text" and extra is not None:
        raise InvalidSamplingParamsError(
            "give either response_format or structured_outputs, not both"
        )
    if extra is not None:
        values = extra.model_dump(by_alias=True, exclude_none=True)
        if "disable_any_whitespace" in values:
            values["any_whitespace"] = not values.pop("disable_any_whitespace")
        return values
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidSamplingParamsError(
            "response_format.json_schema.schema is required with type json_schema"
        )
    return {"json": fmt.json_schema.schema_}


def chat_logprobs_count(request: p.ChatCompletionRequest) -> int | None:
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidSamplingParamsError("top_logprobs needs logprobs to be true")
    return (request.top_logprobs or 0) if request.logprobs else None


async def chat_prompt(
    request: p.ChatCompletionRequest, policy: MediaPolicy, client: httpx.AsyncClient | None
) -> dict[str, Any]:
    """The engine's `{"messages": ...}` prompt: roles mapped, images resolved to bytes or paths."""
    messages = []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        content: str | list[dict[str, Any]]
        if message.content is None or isinstance(message.content, str):
            content = message.content or ""
        else:
            content = [
                await _content_item(part, policy, client, i, j)
                for j, part in enumerate(message.content)
            ]
        messages.append({"role": role, "content": content})
    return {"messages": messages}


async def _content_item(
    part: p.ContentPart, policy: MediaPolicy, client: httpx.AsyncClient | None, i: int, j: int
) -> dict[str, Any]:
    if isinstance(part, p.TextPart):
        return {"type": "text", "text": part.text}
    try:
        return {"type": "image", "image": await resolve_image(part.image_url.url, policy, client)}
    except InvalidInputError as e:
        e.add_context(f"messages[{i}].content[{j}]")
        raise


def usage(outputs: list[RequestOutput]) -> p.Usage:
    """Prompt tokens once per request, output tokens of every sample."""
    return usage_of(
        sum(out.num_prompt_tokens for out in outputs),
        sum(len(c.token_ids) for out in outputs for c in out.outputs),
        sum(max(out.num_cached_tokens, 0) for out in outputs),
    )


def usage_of(prompt: int, completion: int, cached: int) -> p.Usage:
    return p.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=p.UsageDetails(cached_tokens=cached),
    )


def finish_reason(completion: CompletionOutput) -> str | None:
    reason = completion.finish_reason
    return None if reason is None else FINISH_REASONS.get(reason, reason)


def chat_logprobs(entries: list[list[Logprob]] | None) -> p.ChatLogprobs | None:
    if entries is None:
        return None
    return p.ChatLogprobs(content=[_token_logprob(entry) for entry in entries])


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def _token_logprob(entry: list[Logprob]) -> p.TokenLogprob:
    sampled, *top = entry
    return p.TokenLogprob(
        token=sampled.text,
        logprob=_finite(sampled.logprob),
        bytes=list(sampled.text.encode()),
        top_logprobs=[
            p.TopLogprob(token=t.text, logprob=_finite(t.logprob), bytes=list(t.text.encode()))
            for t in top
        ],
    )


def completion_logprobs(completion: CompletionOutput) -> p.CompletionLogprobs | None:
    entries = completion.logprobs
    if entries is None:
        return None
    offsets, offset = [], 0
    for entry in entries:
        offsets.append(offset)
        offset += len(entry[0].text)
    return p.CompletionLogprobs(
        tokens=[entry[0].text for entry in entries],
        token_logprobs=[_finite(entry[0].logprob) for entry in entries],
        top_logprobs=[{t.text: _finite(t.logprob) for t in entry[1:]} for entry in entries],
        text_offset=offsets,
    )


def chat_choices(out: RequestOutput) -> list[p.ChatChoice]:
    return [
        p.ChatChoice(
            index=c.index,
            message=p.AssistantMessage(content=c.text),
            logprobs=chat_logprobs(c.logprobs),
            finish_reason=finish_reason(c),
        )
        for c in out.outputs
    ]


def completion_choices(out: RequestOutput, first_index: int) -> list[p.CompletionChoice]:
    return [
        p.CompletionChoice(
            index=first_index + c.index,
            text=c.text,
            logprobs=completion_logprobs(c),
            finish_reason=finish_reason(c),
        )
        for c in out.outputs
    ]
