"""Greedy decoding of one sequence over a paged KV cache, without a scheduler.

The smallest user of the paged attention path: prefill in chunks (never splitting an image
group), then one token per step. The engine replaces it for real serving; it stays as a
reference loop for tests and debugging.
"""

from __future__ import annotations

import torch

from vlm_engine.kernels.attention.metadata import ForwardContext
from vlm_engine.models.gemma3 import Gemma3Model
from vlm_engine.runtime.memory import allocate_kv_caches
from vlm_engine.vocab.inputs import PromptInputs


def chunk_bounds(prompt: PromptInputs, chunk_size: int) -> list[int]:
    """Ends of prefill chunks of at most `chunk_size` tokens, moved so no image is split."""
    ends, start, total = [], 0, len(prompt.token_ids)
    while start < total:
        end = min(start + chunk_size, total)
        for p in prompt.placeholders:
            if p.offset < end < p.offset + p.length:
                end = p.offset if p.offset > start else p.offset + p.length
        ends.append(end)
        start = end
    return ends


@torch.inference_mode()
def greedy_decode(
    model: Gemma3Model,
    prompt: PromptInputs,
    image_embeds: torch.Tensor | None,
    max_new_tokens: int,
    block_size: int = 16,
    chunk_size: int | None = None,
    block_order: list[int] | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits each was chosen from. `block_order` permutes the physical
    blocks (tests use it to check that the block table, not contiguity, locates the KV)."""
    device = model.language_model.embed_tokens.weight.device
    total = len(prompt.token_ids) + max_new_tokens
    num_blocks = -(-total // block_size)
    order = block_order if block_order is not None else list(range(num_blocks))
    block_table = torch.tensor([order], dtype=torch.int32, device=device)
    caches = allocate_kv_caches(model, num_blocks, block_size)
    tokens, groups = list(prompt.token_ids), prompt.image_groups
    image_rows = _image_rows(prompt, image_embeds)
    out_tokens, out_logits, start = [], [], 0
    for end in chunk_bounds(prompt, chunk_size or len(tokens)):
        logits = _step(model, tokens, start, end, groups, caches, block_table, image_rows)
        start = end
    for _ in range(max_new_tokens):
        out_logits.append(logits)
        out_tokens.append(int(logits.argmax()))
        tokens.append(out_tokens[-1])
        if len(out_tokens) == max_new_tokens:
            break
        logits = _step(model, tokens, len(tokens) - 1, len(tokens), groups, caches, block_table, {})
    return out_tokens, out_logits


def _image_rows(prompt: PromptInputs, image_embeds: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Embedding row of each image soft token, keyed by its position in the prompt."""
    if image_embeds is None:
        return {}
    positions = [p for g in prompt.image_groups for p in range(g.offset, g.end)]
    return dict(zip(positions, image_embeds.reshape(-1, image_embeds.shape[-1]), strict=True))


def _step(model, tokens, start, end, groups, caches, block_table, image_rows) -> torch.Tensor:
    device = block_table.device
    block_size = caches[0].shape[2]
    positions = torch.arange(start, end, device=device)
    slots = block_table[0, positions // block_size].long() * block_size + positions % block_size
    ctx = ForwardContext.build(
        [end - start],
        [end],
        [groups],
        device,
        slot_mapping=slots,
        block_tables=block_table,
        kv_caches=caches,
    )
    rows = [image_rows[p] for p in range(start, end) if p in image_rows]
    embeds = torch.stack(rows) if rows else None
    mask = torch.tensor([p in image_rows for p in range(start, end)], device=device)
    ids = torch.tensor(tokens[start:end], device=device)
    hidden = model(ids, ctx, embeds, mask)
    return model.compute_logits(hidden[-1:])[0]
