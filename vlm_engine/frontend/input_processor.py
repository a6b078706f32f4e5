"""Frontend: a caller's prompt becomes an engine-core `Request`.

A prompt is one of:
- `str`: plain text (a BOS token is added);
- `{"prompt": str, "images": [...], "image_uuids": [...]}`: one `<start_of_image>` per image in
  the text, or, when the text has none, the images placed before it; `image_uuids` (optional)
  are the caller's own ids for the images, used instead of hashing them;
- `{"messages": [...]}`: chat messages, rendered with the checkpoint's template (an image item
  may carry a "uuid").
Images are PIL images, paths or bytes. Each image gets its mm_hash first; preprocessed pixels come
from the processor cache when that image was seen before.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from vlm_engine.caches.processor_cache import ProcessorCache
from vlm_engine.config import ModelConfig
from vlm_engine.core.request import MultiModalFeature, Request
from vlm_engine.engine_config import EngineConfig
from vlm_engine.errors import InvalidInputError, InvalidPromptError
from vlm_engine.frontend.chat import render_chat, split_messages
from vlm_engine.frontend.prompt import PromptBuilder, PromptInputs
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.vision.image_io import load_image
from vlm_engine.vision.image_processor import Gemma3ImageProcessor, ProcessedImage
from vlm_engine.vision.mm_hash import ImageHasher

Prompt = str | Mapping[str, Any]
_PROMPT_KEYS = {"prompt", "images", "image_uuids"}


class InputProcessor:
    def __init__(
        self,
        config: ModelConfig,
        tokenizer: Any,
        image_processor: Gemma3ImageProcessor | None,
        model_id: str,
        engine_config: EngineConfig,
        max_model_len: int,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompt_builder = PromptBuilder(tokenizer, config.image_tokens)
        self.limits = engine_config
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(config.eos_token_ids)
        self.processor_cache = ProcessorCache(engine_config.processor_cache_bytes)
        self.hasher = None
        if image_processor is not None:
            self.hasher = ImageHasher(
                image_processor.config, model_id, max_pixels=engine_config.max_image_pixels
            )

    def process(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
    ) -> tuple[Request, str]:
        """The request, and the prompt text (for the caller's output)."""
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        text, images, uuids, add_bos = self._text_and_images(prompt)
        if images and self.hasher is None:
            raise InvalidPromptError("this checkpoint is text-only: it cannot take images")
        hashed = [
            self._process_image(image, uuid) for image, uuid in zip(images, uuids, strict=True)
        ]
        inputs = self.prompt_builder.build(text, [p.num_crops for _, p in hashed], add_bos)
        self._check_lengths(inputs)
        features = [
            MultiModalFeature(mm_hash, placeholder, processed.pixel_values)
            for (mm_hash, processed), placeholder in zip(hashed, inputs.placeholders, strict=True)
        ]
        request = Request(
            request_id=request_id,
            prompt_token_ids=inputs.token_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            mm_features=features,
            priority=priority,
            cache_salt=cache_salt,
            arrival_time=arrival_time,
        )
        return request, text

    def reset_cache(self) -> None:
        """Forget preprocessed pixels and remembered file hashes."""
        self.processor_cache.clear()
        if self.hasher is not None:
            self.hasher.clear()

    def _process_image(self, source: Any, image_uuid: str | None) -> tuple[str, ProcessedImage]:
        mm_hash, image = self.hasher.identify(source, image_uuid)
        processed = self.processor_cache.get(mm_hash)
        if processed is None:
            if image is None:  # known by its uuid or file bytes, but not yet preprocessed
                image = load_image(source, self.limits.max_image_pixels)
            pixels, num_crops = self.image_processor.preprocess_uint8(image)
            processed = ProcessedImage(pixels, num_crops)  # normalized on the device
            self.processor_cache.put(mm_hash, processed)
        return mm_hash, processed

    def _text_and_images(self, prompt: Prompt) -> tuple[str, Sequence[Any], list, bool]:
        if isinstance(prompt, str):
            return prompt, (), [], True
        if not isinstance(prompt, Mapping):
            raise InvalidPromptError(
                f"a prompt is a str, {{'prompt', 'images'}} or {{'messages'}}; got {type(prompt).__name__}"
            )
        if "messages" in prompt:
            if set(prompt) != {"messages"}:
                raise InvalidPromptError("a chat prompt holds only 'messages'")
            rendered, images, uuids = split_messages(prompt["messages"])
            return render_chat(self.tokenizer, rendered), images, uuids, False
        unknown = set(prompt) - _PROMPT_KEYS
        if unknown or "prompt" not in prompt:
            raise InvalidPromptError(
                f"prompt dict needs 'prompt' (and optional 'images'); unknown keys {sorted(unknown)}"
            )
        text, images = prompt["prompt"], prompt.get("images") or ()
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            images = [images]
        uuids = list(prompt.get("image_uuids") or [None] * len(images))
        if len(uuids) != len(images) or not all(u is None or isinstance(u, str) for u in uuids):
            raise InvalidPromptError("image_uuids must be a list of strings, one per image")
        boi = self.prompt_builder.boi_text if self.config.image_tokens else None
        if images and isinstance(text, str) and boi and boi not in text:
            text = boi * len(images) + text
        return text, images, uuids, True

    def _check_lengths(self, inputs: PromptInputs) -> None:
        num_tokens = len(inputs.token_ids)
        if num_tokens >= self.max_model_len:
            raise InvalidInputError(
                f"prompt has {num_tokens} tokens; max_model_len {self.max_model_len} leaves no "
                "room for output"
            )
        limits = self.limits
        for placeholder in inputs.placeholders:
            if placeholder.length > limits.max_num_batched_tokens:
                raise InvalidInputError(
                    f"an image takes {placeholder.length} tokens, more than "
                    f"max_num_batched_tokens={limits.max_num_batched_tokens}: raise it"
                )
            largest = min(limits.encoder_cache_size, limits.encoder_compute_budget)
            if placeholder.num_embeds > largest:
                raise InvalidInputError(
                    f"an image has {placeholder.num_embeds} embeddings, more than the encoder "
                    f"cache can hold or compute in a step (encoder_cache_size="
                    f"{limits.encoder_cache_size}, encoder_compute_budget="
                    f"{limits.encoder_compute_budget}): raise them"
                )
