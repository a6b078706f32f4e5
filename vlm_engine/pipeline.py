"""One checkpoint's model, tokenizer, image processor and prompt builder, loaded together.

`prepare` turns a prompt (text with `<start_of_image>` markers, or chat messages) and its images
into token ids, image groups and pixels; `forward_logits` runs whole sequences without a cache;
`generate` decodes one prompt greedily over a paged KV cache with no scheduler. It is the
model-level reference that tests check the `Engine` against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlm_engine.config import ModelConfig
from vlm_engine.frontend.chat import render_chat, split_messages
from vlm_engine.frontend.image_io import load_image
from vlm_engine.frontend.image_processor import Gemma3ImageProcessor
from vlm_engine.frontend.prompt import PromptBuilder
from vlm_engine.frontend.tokenizer import load_tokenizer
from vlm_engine.kernels.attention.metadata import ForwardContext
from vlm_engine.models.gemma3 import Gemma3Model
from vlm_engine.models.loader import load_model
from vlm_engine.runtime.greedy import greedy_decode
from vlm_engine.vocab.inputs import PromptInputs


@dataclass
class PreparedPrompt:
    prompt: PromptInputs
    pixel_values: torch.Tensor | None  # [images + crops, 3, H, W] float32, in prompt order


def image_mask(prompts: Sequence[PromptInputs], device: torch.device) -> torch.Tensor:
    """[total tokens] bool: the image soft-token rows of prompts laid end to end."""
    mask = torch.zeros(sum(len(p.token_ids) for p in prompts), dtype=torch.bool)
    start = 0
    for prompt in prompts:
        for group in prompt.image_groups:
            mask[start + group.offset : start + group.end] = True
        start += len(prompt.token_ids)
    return mask.to(device)


class VisionLanguagePipeline:
    def __init__(
        self,
        config: ModelConfig,
        model: Gemma3Model,
        tokenizer: Any,
        image_processor: Gemma3ImageProcessor | None,
    ):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompt_builder = PromptBuilder(tokenizer, config.image_tokens)

    @classmethod
    def load(
        cls,
        checkpoint_dir: str | Path,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device = "cpu",
        quantization: str | None = None,
        **processor_overrides: Any,
    ) -> VisionLanguagePipeline:
        config = ModelConfig.from_hf(checkpoint_dir)
        model = load_model(
            config, checkpoint_dir, dtype=dtype, device=device, quantization=quantization
        )
        tokenizer = load_tokenizer(checkpoint_dir)
        processor = None
        if config.is_multimodal:
            processor = Gemma3ImageProcessor.from_pretrained(
                checkpoint_dir, config.image_tokens.mm_tokens_per_image, processor_overrides
            )
        return cls(config, model, tokenizer, processor)

    @property
    def device(self) -> torch.device:
        return self.model.language_model.embed_tokens.weight.device

    def prepare(
        self, text: str, images: Sequence[Any] = (), add_bos: bool = True
    ) -> PreparedPrompt:
        processed = [self.image_processor.preprocess(load_image(image)) for image in images]
        prompt = self.prompt_builder.build(text, [p.num_crops for p in processed], add_bos)
        pixels = torch.cat([p.pixel_values for p in processed]) if processed else None
        return PreparedPrompt(prompt, pixels)

    def prepare_chat(self, messages: Sequence[dict[str, Any]]) -> PreparedPrompt:
        rendered, images, _ = split_messages(messages)
        return self.prepare(render_chat(self.tokenizer, rendered), images, add_bos=False)

    def image_embeds(self, prepared: PreparedPrompt) -> torch.Tensor | None:
        # -> [images + crops, mm_tokens_per_image, hidden], or None without images
        if prepared.pixel_values is None:
            return None
        return self.model.embed_images(prepared.pixel_values.to(self.device))

    @torch.inference_mode()
    def forward_logits(self, batch: Sequence[PreparedPrompt]) -> list[torch.Tensor]:
        """Logits of every position of each prompt, all prompts in one flat forward pass."""
        ids = torch.tensor([t for p in batch for t in p.prompt.token_ids], device=self.device)
        embeds = [e.flatten(0, 1) for p in batch if (e := self.image_embeds(p)) is not None]
        ctx = ForwardContext.full_sequences(
            [len(p.prompt.token_ids) for p in batch],
            [p.prompt.image_groups for p in batch],
            self.device,
        )
        mask = image_mask([p.prompt for p in batch], self.device)
        hidden = self.model(ids, ctx, torch.cat(embeds) if embeds else None, mask)
        logits = self.model.compute_logits(hidden)
        return list(logits.split(ctx.query_lens_cpu))

    def generate(self, prepared: PreparedPrompt, max_new_tokens: int, **paging: Any) -> list[int]:
        tokens, _ = greedy_decode(
            self.model, prepared.prompt, self.image_embeds(prepared), max_new_tokens, **paging
        )
        return tokens
