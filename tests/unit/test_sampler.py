"""Sampler: greedy, seeded draws, truncation masks, penalties, min_tokens and logprobs, each
against a plain loop-based reference on random logits."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_engine.runtime.sampler import (
    Sampler,
    SamplingBatch,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
)
from vlm_engine.sampling_params import SamplingParams

VOCAB = 32
CPU = torch.device("cpu")
# Chi-square critical values at significance 0.001, by degrees of freedom.
CHI2_CRITICAL = {2: 13.816, 5: 20.515}


def make_row(prompt=(), output=(), stop=(), generator=None, **kwargs) -> SamplingRow:
    params = SamplingParams(max_tokens=10_000, **kwargs)
    if generator is None and params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    return SamplingRow(params, list(prompt), list(output), generator, frozenset(stop))


def make_batch(rows, vocab_size=VOCAB) -> SamplingBatch:
    return SamplingBatch.from_rows(rows, vocab_size, CPU)


def random_logits(num_rows, vocab_size=VOCAB, seed=0, scale=2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab_size, generator=generator) * scale


def sample(logits, rows, sampler=None):
    sampler = sampler or Sampler(seed=0)
    return sampler(logits, make_batch(rows, logits.shape[1]))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# ---- plain references -------------------------------------------------------------------


def softmax_list(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    return [e / sum(exps) for e in exps]


def reference_top_k_top_p(row: list[float], top_k: int, top_p: float) -> set[int]:
    """Tokens kept: the top_k most likely, then the shortest prefix of those (by probability)
    whose renormalized mass reaches top_p."""
    probs = softmax_list(row)
    order = sorted(range(len(row)), key=lambda t: -row[t])
    if top_k > 0:
        order = order[:top_k]
    total = sum(probs[t] for t in order)
    kept, mass = set(), 0.0
    for token in order:
        kept.add(token)
        mass += probs[token] / total
        if mass >= top_p:
            break
    return kept


def reference_min_p(row: list[float], min_p: float) -> set[int]:
    probs = softmax_list(row)
    return {t for t, p in enumerate(probs) if p >= min_p * max(probs)}


def reference_penalties(row, prompt, output, repetition, presence, frequency) -> list[float]:
    logits = list(row)
    for token in set(prompt) | set(output):
        if logits[token] > 0:
            logits[token] /= repetition
        else:
            logits[token] *= repetition
    for token in set(output):
        logits[token] -= presence + frequency * output.count(token)
    return logits


def finite_set(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


# ---- greedy -----------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = random_logits(16)
    out = sample(logits, [make_row(temperature=0) for _ in range(16)])
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.sampled_ranks is None


def test_greedy_rows_in_mixed_batch_are_argmax():
    logits = random_logits(8, scale=0.5)  # flat: random rows rarely hit the argmax
    rows = [make_row(temperature=0 if i % 2 else 1.5, top_k=5) for i in range(8)]
    sampler = Sampler(seed=1)
    random_hits = 0
    for _ in range(20):
        tokens = sample(logits, rows, sampler).sampled_token_ids
        assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))
        random_hits += int((tokens[0::2] == logits[0::2].argmax(-1)).sum())
    assert random_hits < 80  # the random rows did sample


def test_tiny_temperature_is_greedy():
    logits = random_logits(4)
    batch = make_batch([make_row(temperature=1e-7, seed=3) for _ in range(4)])
    assert batch.all_greedy and batch.generators == {}
    assert torch.equal(Sampler()(logits, batch).sampled_token_ids, logits.argmax(-1))


def test_bfloat16_logits():
    logits = random_logits(6).to(torch.bfloat16)
    out = sample(logits, [make_row(temperature=0, logprobs=2) for _ in range(6)])
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
    assert out.logprobs.dtype == torch.float32


def test_caller_logits_untouched():
    logits = random_logits(4)
    before = logits.clone()
    rows = [make_row(top_k=3, min_p=0.1, repetition_penalty=2.0, output=[1, 2]) for _ in range(4)]
    sample(logits, rows)
    assert torch.equal(logits, before)


def test_wrong_logits_shape():
    batch = make_batch([make_row(), make_row()])
    for bad in (random_logits(2, VOCAB + 1), random_logits(3), random_logits(2)[None]):
        with pytest.raises(ValueError, match="logits must have shape"):
            Sampler()(bad, batch)
    with pytest.raises(ValueError, match="floating point"):
        Sampler()(torch.zeros(2, VOCAB, dtype=torch.int64), batch)


def test_empty_batch_rejected():
    with pytest.raises(ValueError, match="at least one row"):
        make_batch([])


def test_unused_steps_are_skipped():
    batch = make_batch([make_row(top_k=VOCAB + 10), make_row(top_k=-1)])
    assert batch.all_random and not batch.all_greedy
    skipped = ("temperature", "min_p", "top_k", "top_p", "repetition_penalty")
    skipped += ("presence_penalty", "frequency_penalty", "prompt_token_ids", "output_token_ids")
    for name in skipped + ("blocked_stop_ids", "max_num_logprobs"):
        assert getattr(batch, name) is None, name
    # Greedy rows need no truncation; their temperature tensor is not built either.
    greedy = make_batch([make_row(temperature=0, top_k=3, top_p=0.5, min_p=0.1)])
    assert greedy.all_greedy and greedy.top_k is None and greedy.top_p is None
    assert greedy.min_p is None and greedy.temperature is None


# ---- seeded and unseeded randomness -----------------------------------------------------


def seeded_tokens(seed: int, others: list[SamplingParams], position: int, steps=50) -> list[int]:
    """Tokens a seeded row draws over `steps` steps, at `position` among rows with `others`."""
    params = SamplingParams(seed=seed, temperature=0.9, top_k=20, presence_penalty=0.3)
    generator = torch.Generator().manual_seed(seed)
    other_generators = [
        None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in others
    ]
    sampler = Sampler(seed=len(others))
    tokens = []
    for step in range(steps):
        rows = [
            SamplingRow(p, [1, 2], [step % VOCAB], g, frozenset())
            for p, g in zip(others, other_generators, strict=True)
        ]
        rows.insert(position, SamplingRow(params, [3, 4], list(tokens), generator, frozenset()))
        logits = random_logits(len(rows), seed=1000 + step)
        logits[position] = random_logits(1, seed=step, scale=1.0)[0]
        tokens.append(int(sampler(logits, make_batch(rows)).sampled_token_ids[position]))
    return tokens


OTHERS = [
    SamplingParams(),
    SamplingParams(temperature=0),
    SamplingParams(seed=99, top_p=0.5),
    SamplingParams(min_p=0.2, repetition_penalty=1.3, logprobs=2),
]


def test_seeded_row_reproducible_whatever_the_batch():
    alone = seeded_tokens(7, [], 0)
    assert len(set(alone)) > 5  # really random, so agreement below means something
    assert seeded_tokens(7, [], 0) == alone
    assert seeded_tokens(7, OTHERS, 2) == alone
    assert seeded_tokens(7, OTHERS[::-1], 4) == alone
    assert seeded_tokens(7, OTHERS[:1], 0) == alone


def test_different_seeds_differ():
    assert seeded_tokens(7, [], 0) != seeded_tokens(8, [], 0)


def test_sampler_seed_drives_unseeded_rows():
    logits = random_logits(16, scale=0.5)
    rows = [make_row() for _ in range(16)]

    def draws(seed):
        sampler = Sampler(seed=seed)
        return [sampler(logits, make_batch(rows)).sampled_token_ids for _ in range(3)]

    first, again, other = draws(5), draws(5), draws(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_global_rng_untouched():
    state = torch.get_rng_state()
    sample(random_logits(3), [make_row(), make_row(seed=1), make_row(top_p=0.5)], Sampler())
    assert torch.equal(torch.get_rng_state(), state)


# ---- truncation masks -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["top_k", "top_p", "both"])
def test_top_k_top_p_mask_matches_reference(mode):
    num_rows = 24
    logits = random_logits(num_rows, seed=3)
    generator = torch.Generator().manual_seed(4)
    top_k = torch.randint(1, VOCAB + 1, (num_rows,), generator=generator)
    top_p = torch.rand(num_rows, generator=generator) * 0.98 + 0.01
    use_k, use_p = mode in ("top_k", "both"), mode in ("top_p", "both")
    masked = apply_top_k_top_p(logits.clone(), top_k if use_k else None, top_p if use_p else None)
    for i in range(num_rows):
        k = int(top_k[i]) if use_k else 0
        p = float(top_p[i]) if use_p else 1.0
        expected = reference_top_k_top_p(logits[i].tolist(), k, p)
        assert finite_set(masked[i]) == expected, i
        kept = sorted(expected)
        assert torch.equal(masked[i, kept], logits[i, kept])  # kept logits are unchanged


def test_top_p_stops_once_mass_is_reached():
    logits = torch.tensor([[math.log(2), 0.0, 0.0], [math.log(2), 0.0, 0.0]])  # probs 1/2, 1/4, 1/4
    masked = apply_top_k_top_p(logits.clone(), None, torch.tensor([0.5, 0.51]))
    assert finite_set(masked[0]) == {0}  # 0.5 already reaches top_p = 0.5
    assert len(finite_set(masked[1])) == 2 and 0 in finite_set(masked[1])


def test_min_p_mask_matches_reference():
    logits = random_logits(24, seed=5)
    min_p = torch.rand(24, generator=torch.Generator().manual_seed(6))
    masked = apply_min_p(logits.clone(), min_p)
    for i in range(24):
        assert finite_set(masked[i]) == reference_min_p(logits[i].tolist(), float(min_p[i])), i


def sampled_set(logits_row: torch.Tensor, num_draws=4000, **kwargs) -> set[int]:
    logits = logits_row.expand(num_draws, -1).contiguous()
    out = sample(logits, [make_row(**kwargs) for _ in range(num_draws)])
    return set(out.sampled_token_ids.tolist())


def test_sampled_tokens_stay_in_top_k_top_p_set():
    row = random_logits(1, seed=7, scale=1.0)[0]
    expected = reference_top_k_top_p((row / 1.5).tolist(), 10, 0.7)
    assert 2 < len(expected) < 10
    assert sampled_set(row, temperature=1.5, top_k=10, top_p=0.7) == expected


def test_sampled_tokens_stay_in_min_p_set_after_temperature():
    row = random_logits(1, seed=8, scale=1.0)[0]
    expected = reference_min_p((row / 2.0).tolist(), 0.5)
    assert expected != reference_min_p(row.tolist(), 0.5)  # temperature comes first
    assert sampled_set(row, temperature=2.0, min_p=0.5) == expected


# ---- sampling frequencies ---------------------------------------------------------------

FREQ_LOGITS = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0])


def draw_counts(num_draws=20_000, **kwargs) -> torch.Tensor:
    logits = FREQ_LOGITS.expand(num_draws, -1).contiguous()
    out = sample(logits, [make_row(**kwargs) for _ in range(num_draws)])
    return torch.bincount(out.sampled_token_ids, minlength=6).float()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_match_softmax_at_temperature(temperature):
    counts = draw_counts(temperature=temperature)
    probs = (FREQ_LOGITS / temperature).softmax(-1)
    assert chi_square(counts, probs) < CHI2_CRITICAL[5]
    assert torch.allclose(counts / counts.sum(), probs, atol=0.015)
    # The test can tell temperatures apart: the untempered softmax is rejected.
    if temperature != 1.0:
        assert chi_square(counts, FREQ_LOGITS.softmax(-1)) > 10 * CHI2_CRITICAL[5]


def test_frequencies_under_top_k_are_renormalized():
    counts = draw_counts(top_k=3)
    kept = [4, 0, 1]
    assert counts.sum() == counts[kept].sum()
    probs = FREQ_LOGITS[kept].softmax(-1)
    assert chi_square(counts[kept], probs) < CHI2_CRITICAL[2]


def test_seeded_row_frequencies_over_steps():
    generator = torch.Generator().manual_seed(11)
    row = make_row(seed=11, generator=generator)
    sampler, logits = Sampler(), FREQ_LOGITS[None]
    tokens = [int(sampler(logits, make_batch([row], 6)).sampled_token_ids) for _ in range(3000)]
    counts = torch.bincount(torch.tensor(tokens), minlength=6).float()
    assert chi_square(counts, FREQ_LOGITS.softmax(-1)) < CHI2_CRITICAL[5]


# ---- penalties --------------------------------------------------------------------------

PENALTIES = [
    {"repetition_penalty": 1.8},
    {"repetition_penalty": 0.6},
    {"presence_penalty": 1.2},
    {"frequency_penalty": -0.7},
    {"repetition_penalty": 1.3, "presence_penalty": -0.5, "frequency_penalty": 0.4},
]


@pytest.mark.parametrize("penalty", PENALTIES, ids=[repr(p) for p in PENALTIES])
def test_penalties_match_reference(penalty):
    generator = torch.Generator().manual_seed(12)
    logits = random_logits(3, seed=13)
    rows = []
    for kwargs in (penalty, {}, {k: v / 2 for k, v in penalty.items()}):
        prompt = torch.randint(0, VOCAB, (12,), generator=generator).tolist()
        output = torch.randint(0, VOCAB // 2, (9,), generator=generator).tolist()
        rows.append(make_row(prompt, output, temperature=0, **kwargs))
    penalized = apply_penalties(logits.clone(), make_batch(rows))
    for i, row in enumerate(rows):
        p = row.params
        expected = reference_penalties(
            logits[i].tolist(),
            row.prompt_token_ids,
            row.output_token_ids,
            p.repetition_penalty,
            p.presence_penalty,
            p.frequency_penalty,
        )
        assert torch.allclose(penalized[i], torch.tensor(expected), atol=1e-6), i
    assert not torch.allclose(penalized[0], logits[0])  # the penalty did something
    greedy = sample(logits, rows).sampled_token_ids
    assert torch.equal(greedy, penalized.argmax(-1))


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[0.0, 2.0, 1.5, -1.0]])
    assert int(sample(logits, [make_row(temperature=0)]).sampled_token_ids) == 1
    row = make_row(prompt=[1], temperature=0, repetition_penalty=2.0)
    assert int(sample(logits, [row]).sampled_token_ids) == 2


# ---- min_tokens -------------------------------------------------------------------------


def test_min_tokens_blocks_stop_tokens_until_reached():
    logits = random_logits(1)[0]
    logits[5] = logits[9] = 100.0  # stop tokens dominate
    eos_and_stop = (5, 9, VOCAB + 100)  # an id outside the logits is ignored
    short = make_row(output=[1], min_tokens=3, stop=eos_and_stop, temperature=0)
    done = make_row(output=[1, 2, 3], min_tokens=3, stop=eos_and_stop, temperature=0)
    out = sample(torch.stack([logits, logits]), [short, done]).sampled_token_ids
    allowed = logits.clone()
    allowed[[5, 9]] = float("-inf")
    assert int(out[0]) == int(allowed.argmax())
    assert int(out[1]) in (5, 9)
    tokens = sampled_set(logits, 2000, output=[], min_tokens=1, stop=eos_and_stop)
    assert not tokens & {5, 9} and len(tokens) > 3


def test_min_tokens_counts_pending_outputs():
    """Under async scheduling, earlier tokens may be sampled but not yet on the host."""
    logits = random_logits(1)[0]
    logits[5] = 100.0
    params = SamplingParams(max_tokens=100, min_tokens=3, temperature=0)
    rows = [
        SamplingRow(params, [7], [1], None, frozenset({5}), num_pending_outputs=pending)
        for pending in (1, 2)
    ]
    out = sample(torch.stack([logits, logits]), rows).sampled_token_ids
    assert int(out[0]) != 5 and int(out[1]) == 5  # 1 + 1 < 3 outputs before; 1 + 2 = 3


# ---- logprobs ---------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_top_n_and_rank():
    num_rows = 64
    logits = random_logits(num_rows, seed=14, scale=1.0)
    rows = [
        make_row(
            output=[0, 1],
            temperature=0 if i % 4 == 0 else 3.0,
            top_k=0 if i % 3 else 8,
            repetition_penalty=1.5,
            logprobs=[3, 0, None][i % 3],
        )
        for i in range(num_rows)
    ]
    out = sample(logits, rows)
    raw = logits.log_softmax(-1)
    assert out.logprob_token_ids.shape == out.logprobs.shape == (num_rows, 4)
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled_token_ids)
    assert torch.allclose(out.logprobs, raw.gather(1, out.logprob_token_ids), atol=1e-6)
    top_values, top_ids = raw.sort(-1, descending=True)
    assert torch.equal(out.logprob_token_ids[:, 1:], top_ids[:, :3])
    assert torch.all(out.logprobs[:, 1:-1] >= out.logprobs[:, 2:])
    for i in range(num_rows):
        token = int(out.sampled_token_ids[i])
        rank = 1 + sum(value > raw[i, token] for value in raw[i].tolist())
        assert int(out.sampled_ranks[i]) == rank, i
    assert int(out.sampled_ranks.max()) > 1  # random rows do sample unlikely tokens


def test_logprobs_zero_returns_only_sampled_token():
    logits = random_logits(2)
    out = sample(logits, [make_row(temperature=0, logprobs=0), make_row(temperature=0)])
    assert out.logprobs.shape == (2, 1)
    assert torch.equal(out.sampled_ranks, torch.tensor([1, 1]))
    assert torch.allclose(out.logprobs[:, 0], logits.log_softmax(-1).amax(-1))
