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

Bad input raises an `InvalidInputError` subclass (`vlm_engine.errors`) and builds nothing.
What the prompt alone shows (types, an empty prompt, image counts and placeholders, sampling
values this model cannot take) is checked before any image is loaded; image errors name the
image's index and source.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from vlm_engine.config import ModelConfig
from vlm_engine.engine_config import EngineConfig
from vlm_engine.errors import (
    EmptyPromptError,
    ImageTooLargeError,
    InputTypeError,
    InvalidInputError,
    InvalidSamplingParamsError,
    MalformedPromptError,
    PromptTooLongError,
    PromptTypeError,
    SamplingParamsTypeError,
    TooManyImagesError,
)
from vlm_engine.frontend.chat import render_chat, split_messages
from vlm_engine.frontend.image_io import load_image
from vlm_engine.frontend.image_processor import Gemma3ImageProcessor, ProcessedImage
from vlm_engine.frontend.mm_hash import ImageHasher
from vlm_engine.frontend.processor_cache import ProcessorCache
from vlm_engine.frontend.prompt import PromptBuilder
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.structured_output import grammars
from vlm_engine.vocab.inputs import PromptInputs
from vlm_engine.vocab.request import MultiModalFeature, Request

Prompt = str | Mapping[str, Any]
_PROMPT_KEYS = frozenset(("prompt", "images", "image_uuids"))
_SINGLE_IMAGE_TYPES = (str, bytes, bytearray, memoryview)  # sequences that are one image


class InputProcessor:
    def __init__(
        self,
        config: ModelConfig,
        tokenizer: Any,
        image_processor: Gemma3ImageProcessor | None,
        model_id: str,
        engine_config: EngineConfig,
        max_model_len: int,
        resize_on_device: bool = False,
    ):
        self.config = config
        self.resize_on_device = resize_on_device  # leave the resize to the core's device
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
        self._check_request_args(params, priority, cache_salt)
        text, images, uuids, add_bos = self._text_and_images(prompt)
        if not images and not text.strip():
            raise EmptyPromptError(f"empty prompt {text!r}: it has neither text nor images")
        self._check_num_images(text, len(images))
        hashed = self._process_images(images, uuids)
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

    def _check_request_args(
        self, params: SamplingParams, priority: int, cache_salt: str | None
    ) -> None:
        if not isinstance(params, SamplingParams):
            raise SamplingParamsTypeError(
                f"sampling_params must be a SamplingParams, got {type(params).__name__}"
            )
        vocab_size = self.config.text.vocab_size
        outside = [t for t in params.stop_token_ids if t >= vocab_size]
        if outside:
            raise InvalidSamplingParamsError(
                f"stop_token_ids {outside} are outside the model's vocabulary "
                f"(vocab_size={vocab_size})"
            )
        if params.structured_outputs is not None:
            grammars.check(params.structured_outputs)  # syntax and support, before it runs
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InputTypeError(f"priority must be an int, got {priority!r}")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise InputTypeError(f"cache_salt must be a str or None, got {cache_salt!r}")

    def _text_and_images(self, prompt: Prompt) -> tuple[str, list[Any], list[str | None], bool]:
        if isinstance(prompt, str):
            return prompt, [], [], True
        if not isinstance(prompt, Mapping):
            raise PromptTypeError(
                "a prompt is a str, {'prompt', 'images'} or {'messages'}; "
                f"got {type(prompt).__name__}"
            )
        if "messages" in prompt:
            if set(prompt) != {"messages"}:
                raise PromptTypeError(
                    f"a chat prompt holds only 'messages', got keys {sorted(map(str, prompt))}"
                )
            rendered, images, uuids = split_messages(prompt["messages"])
            return render_chat(self.tokenizer, rendered), images, uuids, False
        if not _PROMPT_KEYS.issuperset(prompt) or "prompt" not in prompt:
            raise PromptTypeError(
                f"a prompt dict takes 'prompt' (required), 'images' and 'image_uuids'; "
                f"got keys {sorted(map(str, prompt))}"
            )
        text = prompt["prompt"]
        if not isinstance(text, str):
            raise PromptTypeError(f"'prompt' must be a str, got {type(text).__name__}")
        images = _image_list(prompt.get("images"))
        uuids = _uuid_list(prompt.get("image_uuids"), len(images))
        boi = self.prompt_builder.boi_text if self.config.image_tokens else None
        if images and boi and boi not in text:
            text = boi * len(images) + text
        return text, images, uuids, True

    def _check_num_images(self, text: str, num_images: int) -> None:
        """Image count against the limit and the placeholders, before any image is loaded."""
        limit = 0 if self.hasher is None else self.limits.max_images_per_prompt
        if limit is not None and num_images > limit:
            why = "this checkpoint is text-only" if self.hasher is None else "max_images_per_prompt"
            raise TooManyImagesError(f"prompt has {num_images} images, more than {limit} ({why})")
        self.prompt_builder.check_images(text, num_images)

    def _process_images(
        self, images: Sequence[Any], uuids: Sequence[str | None]
    ) -> list[tuple[str, ProcessedImage]]:
        processed = []
        for index, (source, uuid) in enumerate(zip(images, uuids, strict=True)):
            try:
                processed.append(self._process_image(source, uuid))
            except InvalidInputError as e:
                e.add_context(f"image {index}")
                raise
        return processed

    def _process_image(self, source: Any, image_uuid: str | None) -> tuple[str, ProcessedImage]:
        mm_hash, image = self.hasher.identify(source, image_uuid)
        processed = self.processor_cache.get(mm_hash)
        if processed is None:
            if image is None:  # known by its uuid or file bytes, but not yet preprocessed
                image = load_image(source, self.limits.max_image_pixels)
            pixels, num_crops = self.image_processor.preprocess_uint8(
                image, resize=not self.resize_on_device
            )
            processed = ProcessedImage(pixels, num_crops)  # normalized on the device
            self.processor_cache.put(mm_hash, processed)
        return mm_hash, processed

    def _check_lengths(self, inputs: PromptInputs) -> None:
        num_tokens = len(inputs.token_ids)
        if num_tokens >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {num_tokens} tokens, max_model_len is {self.max_model_len}: "
                "no room is left for output; shorten the prompt or raise max_model_len"
            )
        limits = self.limits
        largest = min(limits.encoder_cache_size, limits.encoder_compute_budget)
        for index, placeholder in enumerate(inputs.placeholders):
            if placeholder.length > limits.max_num_batched_tokens:
                raise ImageTooLargeError(
                    f"image {index} takes {placeholder.length} tokens, more than "
                    f"max_num_batched_tokens={limits.max_num_batched_tokens}: raise it"
                )
            if placeholder.num_embeds > largest:
                raise ImageTooLargeError(
                    f"image {index} has {placeholder.num_embeds} embeddings, more than the "
                    f"encoder cache can hold or compute in a step (encoder_cache_size="
                    f"{limits.encoder_cache_size}, encoder_compute_budget="
                    f"{limits.encoder_compute_budget}): raise them"
                )


def _image_list(images: Any) -> list[Any]:
    """A prompt's "images": None, one image, or a list of them."""
    if images is None:
        return []
    if isinstance(images, _SINGLE_IMAGE_TYPES) or not isinstance(images, Sequence):
        return [images]
    return list(images)


def _uuid_list(uuids: Any, num_images: int) -> list[str | None]:
    if uuids is None:
        return [None] * num_images
    if not isinstance(uuids, list | tuple) or not all(
        u is None or isinstance(u, str) for u in uuids
    ):
        raise PromptTypeError(f"image_uuids must be a list of str (or None), got {uuids!r}")
    if len(uuids) != num_images:
        raise MalformedPromptError(f"{len(uuids)} image_uuids for {num_images} images")
    return list(uuids)
