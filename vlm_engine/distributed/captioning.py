"""The captioning job on a Ray cluster, with Ray Data, as one streaming pipeline.

    caption_dataset(["photos/"], "captions.jsonl")              # a local Ray instance
    caption_dataset(["/shared/**/*.jpg"], "out.csv", address="auto", replicas=8)

1. The inputs are listed as the local command lists them (folders, globs, list files), or come
   as a Ray Dataset with a `path` column and, optionally, the images' `bytes`. Paths already in
   the output file are skipped: a rerun resumes.
2. Ray tasks read each file and hash its bytes (blake3), spread over the cluster (the files must
   be readable from every node: a shared file system). A file that cannot be read gets its
   error row.
3. The replicas (one engine each in a Ray actor, `num_gpus=1` on a cluster with GPUs) take the
   hashed images in batches from `map_batches`, several batches at once (`in_flight`) so that an
   engine never drains between them. Before captioning a batch a replica claims its digests
   from one shared `ClaimBook` actor: only the first claim of an image is captioned; the others
   come back marked as duplicates. Hashing, starting the engines and captioning overlap.
4. The driver writes every path's row (`path`, `caption`, `error`, as the local command writes
   them) as results arrive: a duplicate takes its image's caption as soon as that is known. A
   replica that dies is started again and its batches retried (Ray Data does both); the images
   it had claimed come back as duplicates of nothing, and a second, small pass captions them.
   Every path gets exactly one row. An interrupted job keeps its rows; its rerun captions the
   rest.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from blake3 import blake3

from vlm_engine.caption_file import CaptionFile
from vlm_engine.captioning import (
    DEFAULT_MAX_TOKENS,
    INCOMPLETE,
    CaptionSummary,
    error_row,
    find_images,
    row_fields,
    structured_row,
)
from vlm_engine.demo.model import DEMO_PROMPT, default_model_path, demo_request
from vlm_engine.errors import InvalidInputError
from vlm_engine.frontend.image_io import read_image_file
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.structured_output import grammars

DEFAULT_BATCH_SIZE = 16
DEFAULT_IN_FLIGHT = 4  # batches each replica works on at once

Row = dict[str, Any]
# Columns of strings hold "" for nothing: Ray's batches turn an all-None column into NaNs.
# What a replica answers for one image.
CAPTIONED, DUPLICATE, UNREADABLE = "captioned", "duplicate", "unreadable"


@dataclass(frozen=True)
class Job:
    """What the replicas are asked to do, the same for each."""

    model: str
    prompt: str
    params: SamplingParams
    engine_options: dict[str, Any] = field(default_factory=dict)


def caption_dataset(
    inputs: Iterable[str | Path] | Any,
    output: str | Path | None = None,
    *,
    model: str | Path | None = None,
    prompt: str = DEMO_PROMPT,
    params: SamplingParams | None = None,
    replicas: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    in_flight: int = DEFAULT_IN_FLIGHT,
    format: str | None = None,
    address: str | None = None,
    engine_options: dict[str, Any] | None = None,
    on_rows: Callable[[list[Row]], None] | None = None,
) -> CaptionSummary | list[Row]:
    """Caption `inputs` (sources, or a Ray Dataset of `path` and maybe `bytes`) on a Ray cluster.

    With `output`, rows are appended to that JSONL or CSV file (resuming it) and the summary is
    returned; without, the rows are returned. `replicas` defaults to one per GPU of the
    cluster, or one where it has none. `address` is Ray's (None: the cluster `RAY_ADDRESS`
    names, else a new local instance). `on_rows` sees each group of rows once it is written.
    """
    import ray

    if batch_size < 1 or in_flight < 1:
        raise ValueError(f"batch_size and in_flight must be >= 1, got {batch_size}, {in_flight}")
    params = params or SamplingParams(temperature=0, max_tokens=DEFAULT_MAX_TOKENS)
    if params.structured_outputs is not None:
        grammars.check(params.structured_outputs)  # before Ray or any replica starts
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    file = CaptionFile(output, format, row_fields(params)) if output is not None else None
    skipped = len(file.done) if file is not None else 0
    dataset = _todo(inputs, file.done if file is not None else set())
    job = Job(str(model or default_model_path()), prompt, params, dict(engine_options or {}))
    pipeline = _Pipeline(job, replicas or _default_replicas(), batch_size, in_flight)
    writer = _Writer(file, on_rows, params)
    orphans = writer.take(pipeline.run(dataset))
    if orphans:  # images claimed by a replica that died: caption them now
        items = [{"path": paths[0], "bytes": data} for paths, data in orphans.values()]
        again = writer.take(pipeline.run(ray.data.from_items(items)), orphans)
        assert not again, "a second pass has no claims to lose"
    span = sum(e["span_s"] for e in pipeline.engines.values())
    summary = CaptionSummary(
        num_captioned=writer.num_rows - writer.num_errors,
        num_skipped=skipped,
        num_errors=writer.num_errors,
        elapsed_s=pipeline.elapsed_s,
        num_duplicates=writer.num_duplicates,
        num_engine_requests=int(sum(e["requests"] for e in pipeline.engines.values())),
        engine_idle_share=sum(e["idle_s"] for e in pipeline.engines.values()) / span
        if span
        else None,
        num_images_encoded=int(sum(e["encoded"] for e in pipeline.engines.values())),
        replica_idle_shares=tuple(
            e["idle_s"] / e["span_s"] for e in pipeline.engines.values() if e["span_s"]
        ),
    )
    return summary if file is not None else writer.rows


def _todo(inputs: Any, done: set[str]) -> Any:
    """The images to caption as a Ray Dataset with `path` (and `bytes` where given)."""
    import ray.data

    if isinstance(inputs, ray.data.Dataset):
        return inputs.filter(lambda row: str(row["path"]) not in done)
    inputs = list(inputs)
    paths = [str(p) for p in find_images(inputs)]
    if not paths:
        raise FileNotFoundError("no images found in " + ", ".join(map(str, inputs)))
    return ray.data.from_items([{"path": p} for p in paths if p not in done])


def _hash_batch(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """Each image's blake3 digest, or the error of reading its file (a Ray task)."""
    given = batch.get("bytes")
    digests, errors, data = [], [], []
    for i, path in enumerate(batch["path"]):
        try:
            if given is not None and len(given[i]):
                image = bytes(given[i])
            else:
                image = read_image_file(str(path))
        except InvalidInputError as e:
            digests.append("")
            errors.append(error_row(str(path), e)["error"])
            data.append(b"")
            continue
        digests.append(blake3(image).hexdigest())
        errors.append("")
        # Bytes the inputs gave travel on; a file is read again where it is captioned.
        data.append(image if given is not None and len(given[i]) else b"")
    paths = [str(p) for p in batch["path"]]
    return {"path": paths, "digest": digests, "error": errors, "bytes": data}


def _default_replicas() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("GPU", 0)))


class ClaimBook:
    """The digests some replica has taken on (a Ray actor shared by all replicas of a pass)."""

    def __init__(self) -> None:
        self.claimed: set[str] = set()

    def claim(self, digests: list[str]) -> list[bool]:
        """For each digest, whether this is its first claim."""
        first = []
        for digest in digests:
            first.append(digest not in self.claimed)
            self.claimed.add(digest)
        return first


class _Pipeline:
    """Hashing and captioning as one Ray Data pipeline; keeps the replicas' latest counts."""

    def __init__(self, job: Job, replicas: int, batch_size: int, in_flight: int):
        self.job = job
        self.replicas = replicas
        self.batch_size = batch_size
        self.in_flight = in_flight
        self.engines: dict[str, dict[str, float]] = {}  # replica -> its latest counts
        self.elapsed_s = 0.0  # captioning time, from the first engine ready to the last row

    def run(self, dataset: Any) -> Iterator[Row]:
        import ray
        import ray.data

        claims = ray.remote(ClaimBook).remote()
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0) > 0
        # A replica on a GPU takes that GPU; replicas on CPUs leave at least one CPU to the
        # hashing tasks (they would otherwise wait for a free CPU forever).
        cpus = 1.0 if gpus else max(0.1, min(1.0, (resources.get("CPU", 1) - 1) / self.replicas))
        # Hashing yields blocks of one caption batch each: a replica's calls run concurrently
        # per block (the batches of one block would run one after another).
        hashed = dataset.map_batches(_hash_batch, batch_size=self.batch_size)
        captioned = hashed.map_batches(
            CaptionReplica,
            batch_size=self.batch_size,
            compute=ray.data.ActorPoolStrategy(
                size=self.replicas,
                max_tasks_in_flight_per_actor=self.in_flight,
                max_concurrent_calls_per_actor=self.in_flight,
            ),
            fn_constructor_kwargs={"job": asdict(self.job), "claims": claims},
            num_gpus=1 if gpus else 0,
            num_cpus=cpus,
        )  # Ray Data starts a replica that dies again and retries the batches it held
        ready = None
        try:
            for row in captioned.iter_rows():
                if row["replica"]:
                    keys = ("requests", "encoded", "idle_s", "span_s", "ready_at")
                    counts = {k: row[k] for k in keys}
                    self.engines[row["replica"]] = counts
                    ready = min(ready or row["ready_at"], row["ready_at"])
                yield row
        finally:
            if ready is not None:
                self.elapsed_s += time.time() - ready
            ray.kill(claims)


class CaptionReplica:
    """One engine in a Ray actor, captioning the batches it is given, several at once."""

    def __init__(self, job: dict[str, Any], claims: Any):
        from vlm_engine.async_engine import AsyncEngine

        self.engine = AsyncEngine(job["model"], **job["engine_options"])
        self.claims = claims
        self.prompt = job["prompt"]
        self.params = SamplingParams(**job["params"])
        self.name = f"{os.uname().nodename}:{os.getpid()}:{time.time_ns()}"
        self.ready_at = time.time()  # wall clock: the driver compares it with its own
        # The engine's idle time between its first request and now: time with nothing to do.
        self.active = 0
        self.first: float | None = None
        self.idle_since: float | None = None
        self.idle_s = 0.0

    async def __call__(self, batch: dict[str, np.ndarray]) -> AsyncIterator[dict[str, list]]:
        readable = [i for i, error in enumerate(batch["error"]) if not error]
        firsts = await self.claims.claim.remote([batch["digest"][i] for i in readable])
        kinds = [UNREADABLE] * len(batch["path"])
        for i, first in zip(readable, firsts, strict=True):
            kinds[i] = CAPTIONED if first else DUPLICATE
        jobs = [
            self._caption(bytes(data) if len(data) else str(path))
            for path, data, kind in zip(batch["path"], batch["bytes"], kinds, strict=True)
            if kind == CAPTIONED
        ]
        results = iter(await asyncio.gather(*jobs))
        captions, errors = [], []
        for kind, error in zip(kinds, batch["error"], strict=True):
            caption, error = next(results) if kind == CAPTIONED else ("", error)
            captions.append(caption or "")
            errors.append(error or "")
        yield self._rows(batch, kinds, captions, errors, await self.engine.stats())

    def _rows(self, batch, kinds, captions, errors, stats) -> dict[str, list]:
        count = len(kinds)
        return {
            "path": list(batch["path"]),
            "digest": list(batch["digest"]),
            # a duplicate's bytes, for a second pass should its image's claimant have died
            "bytes": [
                d if k == DUPLICATE else b"" for d, k in zip(batch["bytes"], kinds, strict=True)
            ],
            "kind": kinds,
            "caption": captions,
            "error": errors,
            "replica": [self.name] * count,
            "requests": [stats["requests"]["requests"]] * count,
            "encoded": [stats["vision_encoder"]["items_encoded"]] * count,
            "idle_s": [self.idle_s] * count,
            "span_s": [time.perf_counter() - self.first if self.first else 0.0] * count,
            "ready_at": [self.ready_at] * count,
        }

    async def _caption(self, source: str | bytes) -> tuple[str | None, str | None]:
        self._start()
        text = finish = None
        try:
            async for out in self.engine.generate(demo_request(source, self.prompt), self.params):
                text = out.text if text is None else text + out.text
                finish = out.finish_reason
        except InvalidInputError as e:
            return None, error_row("", e)["error"]
        finally:
            self._end()
        if finish == "length" and self.params.structured_outputs is not None:
            return text, INCOMPLETE  # the text is kept in its row
        return text, None

    def _start(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        if self.active == 0 and self.idle_since is not None:
            self.idle_s += now - self.idle_since
        self.active += 1

    def _end(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle_since = time.perf_counter()


class _Writer:
    """Rows to the output file (or kept, without one), and what they were."""

    def __init__(
        self,
        file: CaptionFile | None,
        on_rows: Callable[[list[Row]], None] | None,
        params: SamplingParams,
    ):
        self.file = file
        self.on_rows = on_rows
        self.spec = params.structured_outputs
        self.rows: list[Row] = []
        self.written: set[str] = set()
        self.num_rows = self.num_errors = self.num_duplicates = 0

    def take(
        self, results: Iterator[Row], known: dict[str, tuple[list[str], bytes]] | None = None
    ) -> dict[str, tuple[list[str], bytes]]:
        """Write the rows of a pass's results; the duplicates whose image no result captioned
        (by digest: their paths and bytes). `known`: a second pass's digests and the paths each
        stands for."""
        captions: dict[str, tuple[str | None, str | None]] = {}
        waiting: dict[str, list[str]] = defaultdict(list)
        data: dict[str, bytes] = {}
        for row in results:
            path, digest = row["path"], row["digest"]
            caption, error = row["caption"] or None, row["error"] or None
            if row["kind"] == UNREADABLE:
                self._write([path], None, error)
            elif row["kind"] == CAPTIONED:
                captions[digest] = (caption or None, error) if error else (caption or "", None)
                paths = known[digest][0] if known else [path]
                self._write(paths + waiting.pop(digest, []), *captions[digest])
            elif digest in captions:
                self._write([path], *captions[digest], duplicates=1)
            else:
                waiting[digest].append(path)
                data.setdefault(digest, bytes(row["bytes"]))
        return {digest: (paths, data[digest]) for digest, paths in waiting.items()}

    def _write(
        self, paths: list[str], caption: str | None, error: str | None, duplicates: int = -1
    ) -> None:
        """Rows for `paths`, all but the first duplicates unless `duplicates` says how many."""
        fresh = [p for p in paths if p not in self.written]  # a retried batch's second answer
        if not fresh:
            return
        rows = [
            structured_row({"path": path, "caption": caption, "error": error}, self.spec, None)
            for path in fresh
        ]
        if self.file is not None:
            self.file.append(rows)
        else:
            self.rows += rows
        self.written.update(fresh)
        self.num_rows += len(rows)
        self.num_duplicates += len(rows) - 1 if duplicates < 0 else duplicates
        self.num_errors += len(rows) if error is not None else 0
        if self.on_rows is not None:
            self.on_rows(rows)
