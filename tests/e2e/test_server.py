"""`vlm-engine serve` in its own process on a free port, driven by the official `openai` client
and plain HTTP: answers, streaming, samples, logprobs and usage; 64 concurrent streams with
clients that disconnect; the API key; bad input answered with OpenAI error bodies while the server
goes on serving; metrics; and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import re
import signal
from typing import Literal

import pytest
from bad_inputs import png_header

openai = pytest.importorskip("openai", reason="the server tests drive the official openai client")
pytest.importorskip("fastapi", reason="the server needs the serve extra")

import httpx  # noqa: E402  (the openai client's own HTTP library)
import pydantic  # noqa: E402
from server_helpers import MODEL, chat, metric, picture, wait_for_idle  # noqa: E402

from vlm_engine import Engine, SamplingParams  # noqa: E402
from vlm_engine.demo.model import DEMO_JSON_PROMPT, default_model_path  # noqa: E402
from vlm_engine.demo.shapes import make_example, scene_json  # noqa: E402
from vlm_engine.testing.server_process import ServerProcess  # noqa: E402

API_KEY = "sk-test-key"


def json_picture(seed: int) -> tuple[str, dict]:
    """A demo picture as a data: URL, and the JSON object the demo model answers for it."""
    image, scene = make_example(random.Random(seed))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return url, json.loads(scene_json(scene))


MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def server(tmp_path_factory, media):
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(
        [
            "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
            "--allowed-local-media-path", str(media), "--max-request-bytes", str(2**20),
            "--max-image-pixels", str(4_000_000),
        ],
        log,
        env={"VLM_ENGINE_API_KEY": API_KEY},
    )  # fmt: skip
    yield process
    assert process.stop() == 0, log.read_text()[-3000:]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


# --- answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [3, 8])
def test_a_picture_gets_the_demo_models_caption(client, seed):
    url, expected = picture(seed)
    answer = client.chat.completions.create(
        model=MODEL, messages=chat(url), temperature=0, max_tokens=24
    )
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == MODEL and answer.object == "chat.completion"


def test_streamed_deltas_join_to_the_whole_answer(client):
    url, _ = picture(5)
    whole = client.chat.completions.create(
        model=MODEL, messages=chat(url), temperature=0, max_tokens=24
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=chat(url), temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["stop"]
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_gives_that_many_choices(client):
    url, _ = picture(6)
    answer = client.chat.completions.create(
        model=MODEL, messages=chat(url), n=3, temperature=1.0, seed=4, max_tokens=24
    )
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.message.content for c in answer.choices)
    lengths = [len(c.message.content) for c in answer.choices]
    assert answer.usage.completion_tokens >= 3 and len(lengths) == 3


def test_logprobs_and_usage_equal_the_engines(client):
    """The server's numbers are the engine's: the same request on an engine in this process
    gives the same prompt and output token counts, cached tokens and logprobs."""
    url, _ = picture(7)
    answer = client.chat.completions.create(
        model=MODEL, messages=chat(url), temperature=0, max_tokens=24, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    raw = base64.b64decode(url.split(",", 1)[1])
    messages = chat(url)
    messages[0]["content"][0] = {"type": "image", "image": raw}
    with Engine(default_model_path(), max_model_len=MAX_MODEL_LEN) as engine:
        (out,) = engine.generate(
            {"messages": messages}, SamplingParams(temperature=0, max_tokens=24, logprobs=3)
        )
    usage = answer.usage
    assert usage.prompt_tokens == out.num_prompt_tokens
    assert usage.completion_tokens == len(out.token_ids) == len(answer.choices[0].logprobs.content)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    for theirs, ours in zip(answer.choices[0].logprobs.content, out.logprobs, strict=True):
        assert theirs.token == ours[0].text
        assert theirs.logprob == pytest.approx(ours[0].logprob, abs=1e-5)
        assert [t.token for t in theirs.top_logprobs] == [t.text for t in ours[1:]]
        assert theirs.logprob == pytest.approx(theirs.top_logprobs[0].logprob)  # greedy: the top


# --- structured outputs ---------------------------------------------------------------------


class Scene(pydantic.BaseModel):
    """The demo model's JSON answer, as a client application would declare it."""

    model_config = pydantic.ConfigDict(extra="forbid")
    shape: Literal["circle", "square", "triangle", "star"]
    color: Literal["red", "green", "blue", "yellow", "purple"]
    count: int = pydantic.Field(ge=1, le=3)
    position: Literal["left", "center", "right"]
    background: Literal["white", "gray", "pink"]


@pytest.mark.parametrize("seed", [3, 8])
def test_the_clients_parse_gets_the_scene_as_an_object(client, seed):
    """The official client's `parse` sends the pydantic model as a strict JSON schema and reads
    the answer back into it."""
    url, scene = json_picture(seed)
    answer = client.chat.completions.parse(
        model=MODEL, messages=chat(url, DEMO_JSON_PROMPT), temperature=0, max_tokens=80,
        response_format=Scene,
    )  # fmt: skip
    parsed = answer.choices[0].message.parsed
    assert isinstance(parsed, Scene) and answer.choices[0].finish_reason == "stop"
    assert parsed.model_dump() == scene


def test_response_format_json_object_and_schema_stream(client):
    url, _ = json_picture(4)
    answer = client.chat.completions.create(
        model=MODEL, messages=chat(url, DEMO_JSON_PROMPT), temperature=0, max_tokens=80,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"shape": {"enum": ["circle", "star"]}},
              "required": ["shape"]}  # fmt: skip
    stream = client.chat.completions.create(
        model=MODEL, messages=chat(url, DEMO_JSON_PROMPT), temperature=1.0, seed=2,
        max_tokens=80, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert json.loads(text)["shape"] in ("circle", "star")


def test_choice_regex_and_grammar_through_structured_outputs(client):
    url, _ = picture(2)
    choices = ["a circle", "a square", "something else"]
    answer = client.chat.completions.create(
        model=MODEL, messages=chat(url), temperature=0, max_tokens=20, logprobs=True,
        top_logprobs=5, extra_body={"structured_outputs": {"choice": choices}},
    )  # fmt: skip
    assert answer.choices[0].message.content in choices
    for token in answer.choices[0].logprobs.content:  # ruled-out tokens: finite, very unlikely
        assert all(-9999.0 <= t.logprob <= 0 for t in token.top_logprobs)
    completion = client.completions.create(
        model=MODEL, prompt="The code is", max_tokens=20, temperature=1.0, seed=1,
        extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}},
    )  # fmt: skip
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", completion.choices[0].text)
    grammar = 'root ::= "(" [0-9] (("+" | "-") [0-9]){0,2} ")"'
    completion = client.completions.create(
        model=MODEL, prompt="A sum:", max_tokens=20, temperature=0,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )  # fmt: skip
    assert re.fullmatch(r"\([0-9]([+-][0-9]){0,2}\)", completion.choices[0].text)


def test_completions_take_text_prompts(client):
    answer = client.completions.create(
        model=MODEL, prompt=["a red", "two blue"], max_tokens=4, n=2, temperature=0,
        logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.choices[0].text == answer.choices[1].text  # greedy samples agree
    assert answer.usage.completion_tokens == 4 * 4
    logprobs = answer.choices[2].logprobs
    assert len(logprobs.tokens) == 4 and "".join(logprobs.tokens) == answer.choices[2].text
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_models_lists_the_served_model(client):
    (card,) = client.models.list().data
    assert card.id == MODEL


def test_local_files_inside_the_allowed_folder(client, media):
    url, expected = picture(3)
    path = media / "picture.png"
    path.write_bytes(base64.b64decode(url.split(",", 1)[1]))
    answer = client.chat.completions.create(
        model=MODEL, messages=chat(path.as_uri()), temperature=0, max_tokens=24
    )
    assert answer.choices[0].message.content == expected


# --- many clients, some gone ----------------------------------------------------------------


def test_64_streams_of_which_16_disconnect(server):
    """Every stream that stays gets exactly the tokens its request gets alone; the others are
    aborted at once; then nothing runs or waits and every KV block is free."""
    params = dict(temperature=0, max_tokens=40, extra_body={"ignore_eos": True, "min_tokens": 40})
    prompts = [f"Describe picture number {i} of the set." for i in range(64)]
    sync = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    alone = [
        sync.completions.create(model=MODEL, prompt=p, **params).choices[0].text for p in prompts
    ]

    async def run() -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)

        async def one(i: int) -> str | None:
            stream = await client.completions.create(
                model=MODEL, prompt=prompts[i], stream=True, **params
            )
            text, chunks = "", 0
            async for chunk in stream:
                text += "".join(c.text for c in chunk.choices)
                chunks += 1
                if i % 4 == 0 and chunks == 3:  # a quarter of the clients leave midway
                    await stream.close()
                    return None
            return text

        return await asyncio.gather(*(one(i) for i in range(64)))

    texts = asyncio.run(run())
    assert sum(t is None for t in texts) == 16
    assert [t for t in texts if t is not None] == [
        a for a, t in zip(alone, texts, strict=True) if t is not None
    ]
    metrics = wait_for_idle(server)
    assert metric(metrics, "vlm_kv_cache_free_blocks") == metric(metrics, "vlm_kv_cache_blocks")
    assert metric(metrics, 'vlm_requests_total{endpoint="completions",outcome="aborted"}') >= 16


def test_metrics_cover_latency_tokens_and_caches(client, server):
    url, _ = picture(3)
    client.chat.completions.create(model=MODEL, messages=chat(url), temperature=0, max_tokens=8)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "vlm_time_to_first_token_seconds_bucket", "vlm_inter_token_latency_seconds_bucket",
        "vlm_e2e_request_latency_seconds_count", "vlm_prompt_tokens_total",
        "vlm_generation_tokens_total", "vlm_kv_cache_usage_ratio",
        'vlm_cache_hits_total{cache="prefix_cache"}', 'vlm_cache_queries_total{cache="processor_cache"}',
        'vlm_cache_hits_total{cache="encoder_cache"}', 'vlm_cache_queries_total{cache="ec_connector"}',
    ):  # fmt: skip
        assert name in text, name
    assert metric(text, 'vlm_requests_total{endpoint="chat",outcome="finished"}') >= 1


# --- keys and bad input ---------------------------------------------------------------------


def test_the_api_key_is_required(server):
    url, _ = picture(3)
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": chat(url)}
    )
    assert (
        response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    )


def post(server, body: bytes | dict, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60)


def image_message(url: str) -> dict:
    return {"model": MODEL, "messages": chat(url), "max_tokens": 4}


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


BAD_REQUESTS = {
    "malformed-json": (b'{"model": "demo", "messages": [', 400, None),
    "wrong-type": ({"model": MODEL, "messages": "hello"}, 400, "messages"),
    "wrong-sampling-type": (
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        400,
        "temperature",
    ),
    "bad-base64": (image_message("data:image/png;base64,@@not base64@@"), 400, None),
    "not-an-image": (image_message(data_url(b"a caption, not a picture")), 400, None),
    "decompression-bomb": (image_message(data_url(png_header(20_000, 20_000))), 400, None),
    "file-outside-the-folder": (image_message("file:///etc/hostname"), 400, None),
    "file-escaping-by-dots": (image_message("file:///tmp/../etc/hostname"), 400, None),
    "remote-url-not-allowed": (image_message("http://127.0.0.1:9/picture.png"), 400, None),
    "over-long-prompt": (
        {"model": MODEL, "prompt": " ".join(["word"] * 2 * MAX_MODEL_LEN)},
        400,
        None,
    ),
    "max-tokens-zero": (
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    "unknown-model": (
        {"model": "other", "messages": [{"role": "user", "content": "hi"}]},
        404,
        None,
    ),
    "schema-the-engine-cannot-hold": (
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            },
        },
        400,
        "structured_outputs.json",
    ),
    "json-schema-without-a-schema": (
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
        },
        400,
        "response_format",
    ),
    "unknown-response-format": (
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "yaml"},
        },
        400,
        "response_format",
    ),
    "two-constraints": (
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"},
            "structured_outputs": {"regex": "a+"},
        },
        400,
        None,
    ),
    "misspelt-constraint": (
        {"model": MODEL, "prompt": "hi", "structured_outputs": {"choices": ["a", "b"]}},
        400,
        "structured_outputs",
    ),
    "bad-regex": (
        {"model": MODEL, "prompt": "hi", "structured_outputs": {"regex": "(unclosed"}},
        400,
        "structured_outputs.regex",
    ),
    "too-many-samples": (
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 1000},
        400,
        "n",
    ),
    "body-too-large": (b"{" + b" " * (2**20 + 10) + b"}", 413, None),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_server_goes_on(server, client, name):
    body, status, param = BAD_REQUESTS[name]
    path = (
        "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    )
    response = post(server, body, path)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] is not None and param in error["param"]
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert answer.choices[0].message.content is not None


def test_unknown_paths_are_404_with_an_error_body(server):
    response = httpx.get(f"{server.url}/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


# --- stopping -------------------------------------------------------------------------------


def test_sigterm_lets_running_requests_finish(tmp_path):
    """After SIGTERM the server takes no new connection, finishes the stream in flight, and
    exits with status 0."""
    server = ServerProcess(
        ["--served-model-name", MODEL, "--shutdown-grace", "60"], tmp_path / "log"
    )
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=300, stream=True,
        extra_body={"ignore_eos": True, "min_tokens": 300},
    )  # fmt: skip
    chunks = iter(stream)
    first = next(chunks)
    server.process.send_signal(signal.SIGTERM)
    rest = list(chunks)
    tokens_text = first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
    assert rest[-1].choices[0].finish_reason == "length" and tokens_text
    assert server.process.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")
