"""Frontend: a caller's prompt becomes an engine-core `Request`.

A prompt is one of:
- `str`: plain text (a BOS token is added);
- `{"prompt": str, "images": [...]}`: one `<start_of_image>` per image in the text, or, when the
  text has none, the images placed before it;
- `{"messages": [...]}`: chat messages, rendered with the checkpoint's template.
Images are PIL images, paths or bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlm_engine.config import ModelConfig
from vlm_engine.core.request import MultiModalFeature, Request
from vlm_engine.errors import InvalidInputError, InvalidPromptError
from vlm_engine.frontend.chat import render_chat, split_messages
from vlm_engine.frontend.prompt import PromptBuilder, PromptInputs
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.vision.image_io import load_image
from vlm_engine.vision.image_processor import Gemma3ImageProcessor
from vlm_engine.vision.mm_hash import image_mm_hash, processor_key

Prompt = str | Mapping[str, Any]
_PROMPT_KEYS = {"prompt", "images"}


class InputProcessor:
    def __init__(
        self,
        config: ModelConfig,
        tokenizer: Any,
        image_processor: Gemma3ImageProcessor | None,
        model_id: str,
        max_model_len: int,
        max_num_batched_tokens: int,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompt_builder = PromptBuilder(tokenizer, config.image_tokens)
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = frozenset(config.eos_token_ids)
        self._hash_key = processor_key(image_processor.config, model_id) if image_processor else b""

    def process(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> tuple[Request, str]:
        """The request, and the prompt text (for the caller's output)."""
        text, images, add_bos = self._text_and_images(prompt)
        loaded = [load_image(image) for image in images]
        processed = [self.image_processor.preprocess(image) for image in loaded]
        inputs = self.prompt_builder.build(text, [p.num_crops for p in processed], add_bos)
        self._check_lengths(inputs)
        features = [
            MultiModalFeature(image_mm_hash(image, self._hash_key), placeholder, p.pixel_values)
            for image, placeholder, p in zip(loaded, inputs.placeholders, processed, strict=True)
        ]
        request = Request(
            request_id=request_id,
            prompt_token_ids=inputs.token_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            mm_features=features,
            priority=priority,
            cache_salt=cache_salt,
        )
        return request, text

    def _text_and_images(self, prompt: Prompt) -> tuple[str, Sequence[Any], bool]:
        if isinstance(prompt, str):
            return prompt, (), True
        if not isinstance(prompt, Mapping):
            raise InvalidPromptError(
                f"a prompt is a str, {{'prompt', 'images'}} or {{'messages'}}; got {type(prompt).__name__}"
            )
        if "messages" in prompt:
            if set(prompt) != {"messages"}:
                raise InvalidPromptError("a chat prompt holds only 'messages'")
            rendered, images = split_messages(prompt["messages"])
            return render_chat(self.tokenizer, rendered), images, False
        unknown = set(prompt) - _PROMPT_KEYS
        if unknown or "prompt" not in prompt:
            raise InvalidPromptError(
                f"prompt dict needs 'prompt' (and optional 'images'); unknown keys {sorted(unknown)}"
            )
        text, images = prompt["prompt"], prompt.get("images") or ()
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            images = [images]
        boi = self.prompt_builder.boi_text if self.config.image_tokens else None
        if images and isinstance(text, str) and boi and boi not in text:
            text = boi * len(images) + text
        return text, images, True

    def _check_lengths(self, inputs: PromptInputs) -> None:
        num_tokens = len(inputs.token_ids)
        if num_tokens >= self.max_model_len:
            raise InvalidInputError(
                f"prompt has {num_tokens} tokens; max_model_len {self.max_model_len} leaves no "
                "room for output"
            )
        for placeholder in inputs.placeholders:
            if placeholder.length > self.max_num_batched_tokens:
                raise InvalidInputError(
                    f"an image takes {placeholder.length} tokens, more than "
                    f"max_num_batched_tokens={self.max_num_batched_tokens}: raise it"
                )
