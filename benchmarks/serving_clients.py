"""What the serving benchmark sends and how: its jobs (Poisson arrivals, 0-2 JPEG images, fixed
output lengths), the clients that send them (the official openai client, the same requests
through httpx, or straight into an in-process `AsyncEngine`), and each request's timing."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np
import openai
from PIL import Image

from vlm_engine import AsyncEngine, SamplingParams
from vlm_engine.testing.samples import WORDS

MODEL = "bench"


@dataclass(frozen=True)
class Job:
    arrival: float  # seconds after the start
    text: str
    images: list[bytes]
    output_len: int


@dataclass
class Timing:
    start: float
    first: float | None = None
    stamps: list[float] = field(default_factory=list)  # when each token's chunk came
    tokens: int = 0
    end: float = 0.0
    images: int = 0


def make_jobs(n: int, rate: float, seed: int, max_output: int) -> list[Job]:
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    jobs, clock = [], 0.0
    for _ in range(n):
        clock += rng.expovariate(rate)
        images = []
        for _ in range(rng.choice((0, 1, 1, 2))):
            size = rng.randint(320, 1600), rng.randint(240, 1200)
            images.append(make_picture(size, pixels))
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 160)))
        jobs.append(Job(clock, words, images, rng.randint(16, max_output)))
    return jobs


def make_picture(size: tuple[int, int], pixels: np.random.Generator) -> bytes:
    """Smooth content (coarse noise, upscaled) in JPEG: photo-like file sizes."""
    width, height = size
    coarse = pixels.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    picture = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def chat_messages(job: Job) -> list[dict]:
    parts = [
        {
            "type": "image_url",
            "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(i).decode()},
        }
        for i in job.images
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": job.text}]}]


def engine_messages(job: Job) -> dict:
    parts = [{"type": "image", "image": image} for image in job.images]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": job.text}]}]}


class OpenAIClient:
    """The official client: what applications use, its own parsing included."""

    def __init__(self, url: str):
        self.client = openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600
        )

    async def stream(self, job: Job, timing: Timing) -> None:
        stream = await self.client.chat.completions.create(
            model=MODEL, messages=chat_messages(job), max_tokens=job.output_len, temperature=0,
            stream=True, extra_body={"ignore_eos": True, "min_tokens": job.output_len},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.role is None:  # a token's chunk
                stamp(timing)


class HttpxClient:
    """The same request body on the wire, read with httpx and json alone: the server's share
    without the official client's own cost."""

    def __init__(self, url: str):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.http = httpx.AsyncClient(base_url=url, timeout=600, limits=limits)

    async def stream(self, job: Job, timing: Timing) -> None:
        body = {
            "model": MODEL, "messages": chat_messages(job), "max_tokens": job.output_len,
            "temperature": 0, "stream": True, "ignore_eos": True, "min_tokens": job.output_len,
        }  # fmt: skip
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("role") is None:
                        stamp(timing)


class EngineClient:
    """The same jobs straight into an in-process `AsyncEngine`: the path without the server."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    async def stream(self, job: Job, timing: Timing) -> None:
        params = SamplingParams(
            temperature=0, max_tokens=job.output_len, min_tokens=job.output_len, ignore_eos=True
        )
        async for delta in self.engine.generate(engine_messages(job), params):
            if delta.token_ids:
                stamp(timing)


CLIENTS = {"openai": OpenAIClient, "httpx": HttpxClient}
Client = OpenAIClient | HttpxClient | EngineClient


def make_client(url: str, kind: str = "openai") -> OpenAIClient | HttpxClient:
    return CLIENTS[kind](url)


async def send_jobs(client: Client, jobs: list[Job], t0: float) -> list[Timing]:
    """Each job sent at its arrival time after `t0`, all at once; their timings."""

    async def one(job: Job) -> Timing:
        await asyncio.sleep(max(0.0, t0 + job.arrival - time.perf_counter()))
        timing = Timing(time.perf_counter(), images=len(job.images))
        await client.stream(job, timing)
        timing.end = time.perf_counter()
        return timing

    return list(await asyncio.gather(*(one(job) for job in jobs)))


def make_probes(n: int) -> list[Job]:
    """Requests sent one at a time, alternately without an image and with one 1024x768 picture:
    the fixed cost of a request on an idle engine, apart from any load."""
    jobs = make_jobs(n, 1.0, seed=777, max_output=16)
    return [
        Job(
            0.0, job.text, [make_picture((1024, 768), np.random.default_rng(k))] if k % 2 else [], 8
        )
        for k, job in enumerate(jobs)
    ]


async def probe(client_of: Callable[[], Client], jobs: list[Job]) -> list[Timing]:
    """The jobs one after another (the client is made here, on the running event loop)."""
    client, timings = client_of(), []
    for job in jobs:
        timings += await send_jobs(client, [job], time.perf_counter())
    return timings


def stamp(timing: Timing) -> None:
    now = time.perf_counter()
    timing.first = timing.first or now
    timing.stamps.append(now)
    timing.tokens += 1
