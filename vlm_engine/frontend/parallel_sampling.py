"""Several samples of one prompt (`SamplingParams.n > 1`): one request in the engine core per
sample, and their outputs gathered into the one output the caller asked for.

The prompt is tokenized and its images preprocessed once; the samples share the `Request`'s
token ids and image features. Sample 0 computes the prompt; the others wait in the scheduler
until it has (`Request.prefill_after`), then take its KV blocks from the prefix cache and its
image encodings from the encoder cache, so only the last partial block is computed again. Each
sample samples on its own generator: with a seed, sample 0 uses it as given and sample i a seed
derived from it and i.
"""

from __future__ import annotations

import dataclasses
import hashlib

from vlm_engine.outputs import CompletionOutput, RequestOutput
from vlm_engine.vocab.request import Request


def sample_id(request_id: str, index: int) -> str:
    """The engine-core id of a sample (the caller never sees it)."""
    return f"{request_id}\x00{index}"


def sample_seed(seed: int | None, index: int) -> int | None:
    """Sample `index`'s seed: the request's own for sample 0, else one derived from both."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # within torch's seed range


class ParentRequest:
    """The samples of one request and what each has produced so far."""

    def __init__(self, request: Request, stream: bool):
        self.request_id = request.request_id
        self.stream = stream
        params = request.sampling_params
        self.samples = [
            Request(  # a fresh request: its progress and outputs are its own
                request_id=sample_id(request.request_id, i),
                prompt_token_ids=request.prompt_token_ids,
                sampling_params=dataclasses.replace(params, n=1, seed=sample_seed(params.seed, i)),
                eos_token_ids=request.eos_token_ids,
                mm_features=request.mm_features,
                priority=request.priority,
                cache_salt=request.cache_salt,
                arrival_time=request.arrival_time,
                prefill_after=None if i == 0 else sample_id(request.request_id, 0),
            )
            for i in range(params.n)
        ]
        self.index_of = {s.request_id: i for i, s in enumerate(self.samples)}
        self.latest: dict[int, CompletionOutput] = {}  # the newest output of each sample
        self.last: RequestOutput | None = None  # sample 0's newest output (metrics, counts)
        self.finished: set[int] = set()

    @property
    def sample_ids(self) -> list[str]:
        return [s.request_id for s in self.samples]

    def gather(self, outputs: list[RequestOutput]) -> RequestOutput:
        """One output for the caller from this step's outputs of some of the samples."""
        news = []
        for out in outputs:
            index = self.index_of[out.request_id]
            completion = dataclasses.replace(out.outputs[0], index=index)
            self.latest[index] = completion
            news.append(completion)
            if out.finished:
                self.finished.add(index)
            if index == 0 or self.last is None:
                self.last = out
        shown = sorted(news, key=lambda c: c.index) if self.stream else self._all_samples()
        return self._output(shown)

    def _all_samples(self) -> list[CompletionOutput]:
        return [
            self.latest.get(i) or CompletionOutput(i, "", [], None)
            for i in range(len(self.samples))
        ]

    def _output(self, shown: list[CompletionOutput]) -> RequestOutput:
        # Sample 0's fields; in a streamed delta where it has nothing new, empty ones.
        first = next((c for c in shown if c.index == 0), None) or CompletionOutput(0, "", [], None)
        last = self.last
        return RequestOutput(
            request_id=self.request_id,
            text=first.text,
            token_ids=first.token_ids,
            finished=len(self.finished) == len(self.samples),
            finish_reason=first.finish_reason,
            num_prompt_tokens=last.num_prompt_tokens,
            num_cached_tokens=last.num_cached_tokens,
            metrics=last.metrics,
            logprobs=first.logprobs,
            stop_reason=first.stop_reason,
            error=last.error,
            prompt=last.prompt,
            outputs=shown,
        )
