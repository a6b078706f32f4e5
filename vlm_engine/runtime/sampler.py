"""Batched token sampling: one token per row of logits, each row with its own SamplingParams.

Order of operations (as vLLM v1), all in float32:
0. structured outputs: tokens a constrained row's grammar does not allow get -inf (xgrammar's
   bitmask kernel: Triton on a GPU, its C++ loop on a CPU); unconstrained rows are untouched.
1. logprobs, if any row asks: log_softmax of the model logits (after the grammar's mask),
   before min_tokens, penalties, temperature and truncation. They describe the model's
   distribution, not the processed one the token was drawn from (vLLM's default
   "raw_logprobs" mode); a sampled token may thus have rank > top_k.
2. min_tokens: a row's stop tokens get -inf until it has min_tokens output tokens.
3. penalties: repetition over prompt + output tokens, presence and frequency over output tokens.
4. greedy rows: argmax of the penalized logits.
5. other rows: / temperature, then min-p, top-k, top-p, then an exponential race
   (argmax of probs / Exponential(1) noise), which samples from probs exactly.

Steps no row needs are skipped: a field of `SamplingBatch` is None when every row has the
no-op value. Seeded rows draw their noise from their own generator, for their row alone, so a
seeded request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlm_engine.device import to_device
from vlm_engine.sampling_params import SamplingParams

# Rows below this temperature are sampled greedily: the result equals argmax except between
# near-ties, and dividing by a tiny temperature can overflow float32 into NaN (vLLM does the same).
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingRow:
    """One request's sampling state at this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None  # per-request seeded generator, or None
    stop_token_ids: frozenset[int]  # EOS ids (unless ignore_eos) + params.stop_token_ids
    num_pending_outputs: int = 0  # earlier output tokens sampled but not yet in output_token_ids


@dataclass
class SamplingBatch:
    """Tensors of a batch of rows, built once per step. A per-row tensor is None when every row
    has its no-op value (greedy rows count as no-op for temperature, min-p, top-k and top-p)."""

    vocab_size: int
    greedy: torch.Tensor | None  # [B] bool; None when all rows are greedy or none is
    num_rows: int
    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None  # [B] float32, 1.0 on greedy rows
    min_p: torch.Tensor | None  # [B] float32
    top_k: torch.Tensor | None  # [B] int64 in [1, V]; V where off
    top_p: torch.Tensor | None  # [B] float32
    repetition_penalty: torch.Tensor | None  # [B] float32
    presence_penalty: torch.Tensor | None  # [B] float32
    frequency_penalty: torch.Tensor | None  # [B] float32
    prompt_token_ids: torch.Tensor | None  # [B, P] int64 padded with V; set with repetition_penalty
    output_token_ids: torch.Tensor | None  # [B, O] int64 padded with V; set with any penalty
    blocked_stop_ids: torch.Tensor | None  # [N] int64 row * V + token id, masked for min_tokens
    generators: dict[int, torch.Generator]  # row -> its request's generator (non-greedy rows)
    max_num_logprobs: int | None  # most top logprobs any row asks for; None if no row asks
    # [B, ceil(V / 32)] int32 on the logits' device: bit t of row i set where row i may take
    # token t (all set on unconstrained rows); None when no row is constrained
    token_bitmask: torch.Tensor | None = None

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[SamplingRow],
        vocab_size: int,
        device: torch.device,
        token_bitmask: torch.Tensor | None = None,
    ) -> SamplingBatch:
        if not rows:
            raise ValueError("a SamplingBatch needs at least one row")
        params = [row.params for row in rows]
        greedy = [p.temperature < GREEDY_TEMPERATURE for p in params]
        sampled = [None if g else p for p, g in zip(params, greedy, strict=True)]
        repetition = _column([p.repetition_penalty for p in params], 1.0, device)
        presence = _column([p.presence_penalty for p in params], 0.0, device)
        frequency = _column([p.frequency_penalty for p in params], 0.0, device)
        any_penalty = any(t is not None for t in (repetition, presence, frequency))
        prompts = (
            _pad(_penalized_prompts(rows), vocab_size, device) if repetition is not None else None
        )
        outputs = (
            _pad([r.output_token_ids for r in rows], vocab_size, device) if any_penalty else None
        )
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        all_greedy, all_random = all(greedy), not any(greedy)
        return cls(
            vocab_size=vocab_size,
            greedy=None if all_greedy or all_random else _to_device(greedy, torch.bool, device),
            num_rows=len(rows),
            all_greedy=all_greedy,
            all_random=all_random,
            temperature=_column([p.temperature if p else 1.0 for p in sampled], 1.0, device),
            min_p=_column([p.min_p if p else 0.0 for p in sampled], 0.0, device),
            top_k=_column([_top_k(p, vocab_size) for p in sampled], vocab_size, device),
            top_p=_column([p.top_p if p else 1.0 for p in sampled], 1.0, device),
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
            prompt_token_ids=prompts,
            output_token_ids=outputs,
            blocked_stop_ids=_blocked_stop_ids(rows, vocab_size, device),
            generators=_generators(rows, greedy, device),
            max_num_logprobs=max(logprobs, default=None),
            token_bitmask=None if token_bitmask is None else to_device(token_bitmask, device),
        )


@dataclass
class SamplerOutput:
    """Sampled tokens, and logprobs when any row asked. Logprob columns are the batch maximum;
    a row that asked for fewer (or none) reads only its first 1 + n columns."""

    sampled_token_ids: torch.Tensor  # [B] int64
    logprob_token_ids: torch.Tensor | None  # [B, 1 + max_n] int64: sampled token, then top-n
    logprobs: torch.Tensor | None  # [B, 1 + max_n] float32, same layout
    sampled_ranks: torch.Tensor | None  # [B] int64 rank (1 = most likely) of the sampled token


class Sampler:
    """Samples one token per row. Never touches torch's global RNG: unseeded rows draw from the
    sampler's own generator (one per device, seeded with `seed`, or randomly when None)."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        _check_logits(logits, batch)
        logits = logits.to(torch.float32, copy=True)  # [B, V]; the caller's tensor stays intact
        if batch.token_bitmask is not None:
            apply_token_bitmask(logits, batch.token_bitmask)
        raw_logprobs = None if batch.max_num_logprobs is None else logits.log_softmax(-1)
        if batch.blocked_stop_ids is not None:
            # index_fill_ takes the value as a kernel argument; `logits[rows, ids] = value` would
            # copy it to the device first, a copy that waits for the forward pass to finish.
            logits.view(-1).index_fill_(0, batch.blocked_stop_ids, float("-inf"))
        logits = apply_penalties(logits, batch)
        sampled = self._sample(logits, batch)  # [B]
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        return _gather_logprobs(raw_logprobs, sampled, batch.max_num_logprobs)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy = None if batch.all_random else logits.argmax(-1)  # [B]
        if batch.all_greedy:
            return greedy
        probs = _truncated_probs(logits, batch)  # [B, V]; consumes logits
        random = probs.div_(self._exponential_noise(probs, batch)).argmax(-1)  # [B]
        return random if greedy is None else torch.where(batch.greedy, greedy, random)

    def _exponential_noise(self, probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        noise = torch.empty_like(probs)  # [B, V]
        if len(batch.generators) < batch.num_rows:
            noise.exponential_(generator=self._generator(probs.device))
        for row, generator in batch.generators.items():
            noise[row].exponential_(generator=generator)
        # exponential_ may return exactly 0; 0 / 0 is NaN and argmax would pick a masked token.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            generator = torch.Generator(device=device)
            if self.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.seed)
            self._generators[device] = generator
        return self._generators[device]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """-inf where a row's bit is clear. In place; rows whose bits are all set are unchanged."""
    import xgrammar  # loaded only by engines that constrain outputs

    xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1])


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (a positive logit is divided by it, a
    negative one multiplied), then OpenAI frequency and presence penalties over output tokens."""
    if batch.output_token_ids is None:
        return logits
    output_counts = _bin_counts(batch.output_token_ids, batch.vocab_size)  # [B, V]
    if batch.repetition_penalty is not None:
        prompt_counts = _bin_counts(batch.prompt_token_ids, batch.vocab_size)  # [B, V]
        seen = (prompt_counts > 0) | (output_counts > 0)
        penalty = torch.where(seen, batch.repetition_penalty[:, None], 1.0)  # [B, V]
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if batch.frequency_penalty is not None:
        logits = logits - batch.frequency_penalty[:, None] * output_counts
    if batch.presence_penalty is not None:
        logits = logits - batch.presence_penalty[:, None] * (output_counts > 0)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops tokens whose probability is below min_p times the row's highest. In place."""
    probs = logits.softmax(-1)  # [B, V]
    threshold = probs.amax(-1, keepdim=True) * min_p[:, None]  # [B, 1]
    return logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Keeps the k most likely tokens (ties with the k-th kept too), then the smallest set of
    those whose renormalized probability reaches top_p (at least one token). One sort serves both."""
    sorted_logits, order = logits.sort(dim=-1)  # [B, V] ascending
    if top_k is not None:
        kth_index = (logits.shape[-1] - top_k).unsqueeze(1)  # [B, 1]
        kth = sorted_logits.gather(1, kth_index)  # [B, 1] the k-th largest logit
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        # A token goes when the tokens more likely than it already hold >= top_p of the mass,
        # i.e. when the mass at or below it (ascending cumsum) is <= 1 - top_p.
        cumulative = sorted_logits.softmax(-1).cumsum(-1)  # [B, V]
        drop = cumulative <= 1 - top_p[:, None]
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, order, sorted_logits)


def _truncated_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.temperature is not None:
        logits.div_(batch.temperature[:, None])
    if batch.min_p is not None:
        logits = apply_min_p(logits, batch.min_p)
    if batch.top_k is not None or batch.top_p is not None:
        logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
    return logits.softmax(-1)


def _gather_logprobs(
    raw_logprobs: torch.Tensor, sampled: torch.Tensor, num_top: int
) -> SamplerOutput:
    sampled_logprobs = raw_logprobs.gather(1, sampled[:, None])  # [B, 1]
    # Rank counts strictly better tokens, so among ties the sampled token gets the best rank.
    ranks = (raw_logprobs > sampled_logprobs).sum(-1) + 1  # [B]
    top_logprobs, top_ids = raw_logprobs.topk(num_top, dim=-1)  # [B, n] descending
    return SamplerOutput(
        sampled_token_ids=sampled,
        logprob_token_ids=torch.cat([sampled[:, None], top_ids], dim=1),
        logprobs=torch.cat([sampled_logprobs, top_logprobs], dim=1),
        sampled_ranks=ranks,
    )


def _bin_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, L] ids padded with vocab_size -> [B, V] float32 count of each token."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=counts.dtype))
    return counts[:, :vocab_size]


def _check_logits(logits: torch.Tensor, batch: SamplingBatch) -> None:
    expected = (batch.num_rows, batch.vocab_size)
    if logits.dim() != 2 or tuple(logits.shape) != expected:
        raise ValueError(f"logits must have shape {expected}, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _column(values: list, off: float | int, device: torch.device) -> torch.Tensor | None:
    """[B] tensor of `values` (dtype of `off`), or None when every row has the no-op `off`."""
    if all(v == off for v in values):
        return None
    dtype = torch.int64 if isinstance(off, int) else torch.float32
    return _to_device(values, dtype, device)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), device)


def _top_k(params: SamplingParams | None, vocab_size: int) -> int:
    if params is None or params.top_k <= 0:
        return vocab_size
    return min(params.top_k, vocab_size)


def _penalized_prompts(rows: Sequence[SamplingRow]) -> list[Sequence[int]]:
    """Prompt ids of rows with a repetition penalty; others skip the (long) copy."""
    return [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else () for r in rows]


def _pad(sequences: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    padded = [list(s) + [pad] * (width - len(s)) for s in sequences]
    return _to_device(padded, torch.int64, device).reshape(len(sequences), width)


def _blocked_stop_ids(
    rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
) -> torch.Tensor | None:
    """Flat logits indices of the stop tokens that rows short of min_tokens may not sample.
    Ids outside the logits can never be sampled, so they need no mask."""
    flat = [
        i * vocab_size + token_id
        for i, row in enumerate(rows)
        if len(row.output_token_ids) + row.num_pending_outputs < row.params.min_tokens
        for token_id in sorted(row.stop_token_ids)
        if token_id < vocab_size
    ]
    return _to_device(flat, torch.int64, device) if flat else None  # [N] into logits.view(-1)


def _generators(
    rows: Sequence[SamplingRow], greedy: list[bool], device: torch.device
) -> dict[int, torch.Generator]:
    generators = {}
    for i, (row, is_greedy) in enumerate(zip(rows, greedy, strict=True)):
        if row.generator is None or is_greedy:
            continue
        if row.generator.device.type != torch.device(device).type:
            raise ValueError(f"row {i}: generator is on {row.generator.device}, logits on {device}")
        generators[i] = row.generator
    return generators
