"""Batch captioning: many images through one engine into a JSONL or CSV file, resumably.

    summary = caption_sources(["photos/"], "captions.jsonl")        # built-in demo model
    summary = caption_images(engine, find_images(["*.png"]), "captions.csv", batch_size=64)

Each image becomes one row, in input order: its path, its caption, and its error
("CorruptImageError: ...") when the engine rejected it; the run goes on past bad images. Under
a structured-outputs constraint (`SamplingParams.structured_outputs`: a JSON schema, a regex, a
list of choices) each row also holds `parsed`: the JSON value the caption states (or, for a
regex or choice, the caption itself); a caption that reached `max_tokens` before its constraint
was complete is kept, with an `IncompleteOutputError` and no `parsed`. The
engine is kept busy: the next batch is queued while the last one is still running. Rows are keyed by path: a run
skips the images whose rows are already in the output file, so an interrupted run resumes
where it stopped, and a last row cut off mid-write is dropped and redone.
"""

from __future__ import annotations

import glob
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm_engine.caption_file import FIELDS, STRUCTURED_FIELDS, CaptionFile
from vlm_engine.demo.model import DEMO_PROMPT, default_model_path, demo_request
from vlm_engine.outputs import RequestOutput
from vlm_engine.sampling_params import SamplingParams, StructuredOutputs
from vlm_engine.structured_output import grammars

if TYPE_CHECKING:  # the engine (torch, transformers) loads only when one is started
    from vlm_engine.engine import Engine

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
LIST_SUFFIXES = {".txt", ".lst"}
# Where the engine saw a bad request ("prompts[3]: request 'req-41': "): meaningless in a row
# keyed by path, and different from run to run, so left out of the row's error.
_BATCH_CONTEXT = re.compile(r"^(prompts\[\d+\]: )?request '[^']*': ")
DEFAULT_MAX_TOKENS = 64
DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class CaptionSummary:
    """What one run did; `elapsed_s` covers captioning, not starting the engine."""

    num_captioned: int
    num_skipped: int  # already in the output file
    num_errors: int  # rows written with an error instead of a caption
    elapsed_s: float
    num_duplicates: int = 0  # rows that took the caption of an identical image (distributed)
    num_engine_requests: int | None = None  # what the engines were asked (distributed)
    # Share of the engines' time, from their first request to their last answer, with no request
    # to work on (distributed): how well the replicas are fed, not the GPU's own stalls.
    engine_idle_share: float | None = None
    # Images the vision tower encoded (distributed; the rest came from a cache or connector).
    num_images_encoded: int | None = None
    # engine_idle_share of each replica that took a request (distributed)
    replica_idle_shares: tuple[float, ...] = ()

    @property
    def images_per_second(self) -> float:
        done = self.num_captioned + self.num_errors
        return done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        duplicates = f" ({self.num_duplicates} duplicates)" if self.num_duplicates else ""
        idle = self.engine_idle_share
        idle = f", engines idle {idle:.0%} of the time" if idle is not None else ""
        return (
            f"captioned {self.num_captioned} images{duplicates}, skipped {self.num_skipped} "
            f"already done, {self.num_errors} errors in {self.elapsed_s:.1f} s "
            f"({self.images_per_second:.1f} images/s{idle})"
        )


# ---- inputs ------------------------------------------------------------------------------------


def find_images(sources: Iterable[str | Path]) -> list[Path]:
    """The images each source names, in order, each once.

    A source is a folder (its image files, sorted, not recursive), a glob pattern (sorted
    matches; ``**`` recurses), a list file (.txt or .lst: one path per line, relative to the
    list's folder; blank lines and ``#`` comments skipped), or else the path of one image.
    A pattern that matches nothing raises FileNotFoundError.
    """
    paths: list[Path] = []
    for source in sources:
        paths += _expand(str(source))
    return list(dict.fromkeys(paths))


def _expand(source: str) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if glob.has_magic(source) and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(source, recursive=True))
        if not matches:
            raise FileNotFoundError(f"no file matches {source!r}")
        return [p for p in matches if p.is_file()]
    if path.suffix.lower() in LIST_SUFFIXES and path.is_file():
        lines = (line.strip() for line in path.read_text().splitlines())
        return [path.parent / line for line in lines if line and not line.startswith("#")]
    return [path]


# ---- captioning --------------------------------------------------------------------------------


def caption_images(
    engine: Engine,
    images: Sequence[str | Path],
    output: str | Path,
    prompt: str = DEMO_PROMPT,
    params: SamplingParams | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    format: str | None = None,
    use_tqdm: bool = False,
) -> CaptionSummary:
    """Caption each image not yet in `output`, one row per image, in input order. Greedy,
    `DEFAULT_MAX_TOKENS`, by default.

    Images go to the engine `batch_size` at a time, and the next batch is queued as soon as half
    of the running ones have finished, so the engine never drains between batches. Rows are
    appended as soon as every image before them is done; an interrupted run keeps them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    params = params or SamplingParams(temperature=0, max_tokens=DEFAULT_MAX_TOKENS)
    spec = params.structured_outputs
    if spec is not None:
        grammars.check(spec)  # a bad constraint fails the run, not each of its rows
    file = CaptionFile(output, format, row_fields(params))
    paths = list(dict.fromkeys(str(image) for image in images))
    todo = [path for path in paths if path not in file.done]
    start = time.perf_counter()
    rows = _RowsInOrder(file)
    running: dict[str, int] = {}  # request id -> index in todo
    queued = 0
    progress = _progress_bar(len(todo)) if use_tqdm else None
    try:
        while queued < len(todo) or running:
            if queued < len(todo) and len(running) <= batch_size // 2:
                batch = todo[queued : queued + batch_size]
                requests = [demo_request(path, prompt) for path in batch]
                entries = engine.add_requests(requests, params, on_error="return")
                for index, entry in enumerate(entries, queued):
                    if isinstance(entry, str):
                        running[entry] = index
                    else:  # rejected: its row carries the error
                        rows.add(index, _row(todo[index], entry, spec))
                queued += len(batch)
                continue
            for out in engine.step():
                if out.finished and out.request_id in running:
                    index = running.pop(out.request_id)
                    rows.add(index, _row(todo[index], out, spec))
                    if progress is not None:
                        progress.update(1)
            rows.flush(batch_size)
    finally:
        if running:  # interrupted: nothing stays queued in the engine
            engine.abort_request(list(running))
        rows.flush(1)
        if progress is not None:
            progress.close()
    elapsed = time.perf_counter() - start
    num_errors = rows.num_errors
    return CaptionSummary(len(todo) - num_errors, len(paths) - len(todo), num_errors, elapsed)


class _RowsInOrder:
    """Rows by their image's index, written to the file in index order once all before are."""

    def __init__(self, file: CaptionFile):
        self.file = file
        self.done: dict[int, dict[str, Any]] = {}
        self.next = 0  # index of the first row not yet written
        self.num_errors = 0

    def add(self, index: int, row: dict[str, Any]) -> None:
        self.done[index] = row
        self.num_errors += row["error"] is not None

    def flush(self, at_least: int) -> None:
        """Write the rows ready in order, if there are `at_least` (and at least one) of them."""
        count = 0
        while self.next + count in self.done:
            count += 1
        if count and count >= at_least:
            self.file.append([self.done.pop(self.next + i) for i in range(count)])
            self.next += count


def caption_sources(
    sources: Iterable[str | Path],
    output: str | Path,
    model: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    format: str | None = None,
    ec_connector: str | None = None,
    quantization: str | None = None,
    **options: Any,
) -> CaptionSummary:
    """`caption_images` over `find_images(sources)` with an engine on `model` (default: the
    built-in demo model), started only when some image is left to caption. `options` go to
    `caption_images`. Raises FileNotFoundError when the sources name no image."""
    sources = list(sources)
    images = find_images(sources)
    if not images:
        raise FileNotFoundError("no images found in " + ", ".join(map(str, sources)))
    params = options.get("params")
    if params is not None and params.structured_outputs is not None:
        grammars.check(params.structured_outputs)  # before any engine starts
    done = CaptionFile(output, format, row_fields(params)).done
    if all(str(image) in done for image in images):
        return CaptionSummary(0, len(images), 0, 0.0)
    from vlm_engine.engine import Engine

    engine_options: dict[str, Any] = {"ec_connector": ec_connector} if ec_connector else {}
    if quantization:
        engine_options["quantization"] = quantization
    with Engine(
        model or default_model_path(), device=device, dtype=dtype, **engine_options
    ) as engine:
        return caption_images(engine, images, output, format=format, **options)


def row_fields(params: SamplingParams | None) -> tuple[str, ...]:
    """The fields of each row of a run with `params`."""
    constrained = params is not None and params.structured_outputs is not None
    return STRUCTURED_FIELDS if constrained else FIELDS


class IncompleteOutputError(ValueError):
    """A constrained caption stopped (at `max_tokens`) before its constraint was complete."""


INCOMPLETE = (
    "IncompleteOutputError: the caption reached max_tokens before its structured-outputs "
    "constraint was complete; raise --max-tokens"
)  # a row's error


def structured_row(
    row: dict[str, Any], spec: StructuredOutputs | None, finish_reason: str | None
) -> dict[str, Any]:
    """`row` with its `parsed` value under `spec` (unchanged without a constraint). A caption
    cut off by the length limit keeps its text and gets an `IncompleteOutputError`."""
    if spec is None:
        return row
    row = {**row, "parsed": None}
    if row["error"] is not None or row["caption"] is None:
        return row
    if finish_reason == "length":
        return {**row, "error": INCOMPLETE}
    text = row["caption"]
    row["parsed"] = json.loads(text) if spec.json is not None or spec.json_object else text
    return row


def _row(path: str, out: RequestOutput, spec: StructuredOutputs | None = None) -> dict[str, Any]:
    if out.error is None:
        row = {"path": path, "caption": out.text, "error": None}
    else:
        row = error_row(path, out.error)
    return structured_row(row, spec, out.finish_reason)


def error_row(path: str, error: Exception) -> dict[str, Any]:
    """The row of an image the engine rejected: its error's type and message, without where in
    a batch the engine saw it."""
    message = _BATCH_CONTEXT.sub("", str(error))
    return {"path": path, "caption": None, "error": f"{type(error).__name__}: {message}"}


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="captioning", unit="img", dynamic_ncols=True)


__all__ = [
    "CaptionSummary",
    "IncompleteOutputError",
    "caption_images",
    "caption_sources",
    "error_row",
    "find_images",
    "row_fields",
    "structured_row",
]
