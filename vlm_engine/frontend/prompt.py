"""Prompt token ids with each image placeholder expanded into its image token groups.

Gemma3 turns each `<start_of_image>` in a prompt into
`"\\n\\n" <boi> <image_soft_token>*N <eoi> "\\n\\n"` (with pan-and-scan: the original image and its
crops, joined by a fixed sentence). The groups are spliced in as token ids, never as text; only
the text between special tokens is tokenized. A tokenizer splits its input at special tokens and
encodes the pieces independently, so the ids are exactly those of tokenizing the expanded text,
including the single tokens for newline runs that the "\\n\\n" around an image joins with the
user's own newlines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlm_engine.config import ImageTokenConfig
from vlm_engine.errors import (
    ImagePlaceholderError,
    MalformedPromptError,
    PromptTypeError,
    TooManyImagesError,
)
from vlm_engine.vocab.inputs import ImageGroup, ImagePlaceholder, PromptInputs

_CROPS_INTRO = "Here is the original image "
_CROPS_MIDDLE = " and here are some crops to help you see better "


class PromptBuilder:
    def __init__(self, tokenizer: Any, image_tokens: ImageTokenConfig | None):
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.bos_token = tokenizer.bos_token
        if image_tokens is not None:
            self.boi_text = tokenizer.convert_ids_to_tokens(image_tokens.boi_token_id)
            self.group_ids = (
                [image_tokens.boi_token_id]
                + [image_tokens.image_token_id] * image_tokens.mm_tokens_per_image
                + [image_tokens.eoi_token_id]
            )
            reserved = (image_tokens.image_token_id, image_tokens.eoi_token_id)
            self.reserved_texts = tokenizer.convert_ids_to_tokens(list(reserved))

    def build(self, text: str, num_crops: Sequence[int] = (), add_bos: bool = True) -> PromptInputs:
        """Token ids of `text`, whose `<start_of_image>` markers take the images in order."""
        if not isinstance(text, str):
            raise PromptTypeError(f"prompt must be a str, got {type(text).__name__}")
        segments = self._split_at_images(text, len(num_crops))
        if add_bos and not text.startswith(self.bos_token):
            segments[0] = self.bos_token + segments[0]
        pieces = self._interleave(segments, num_crops)
        texts = [p for p in pieces if isinstance(p, str)]
        encoded = (
            iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else None
        )
        token_ids: list[int] = []
        groups_per_image: list[list[ImageGroup]] = [[] for _ in num_crops]
        for piece in pieces:
            if isinstance(piece, str):
                token_ids += next(encoded)
                continue
            start = len(token_ids) + 1  # soft tokens follow the <boi>
            groups_per_image[piece].append(ImageGroup(start, self.image_tokens.mm_tokens_per_image))
            token_ids += self.group_ids
        return PromptInputs(token_ids, [ImagePlaceholder(tuple(g)) for g in groups_per_image])

    def check_images(self, text: str, num_images: int) -> None:
        """Raise unless `text` marks each of `num_images` images with one `<start_of_image>` and
        holds no other image token (a text-only checkpoint takes no images)."""
        if self.image_tokens is None:
            if num_images:
                raise TooManyImagesError(
                    f"this checkpoint is text-only: it takes no images, got {num_images}"
                )
            return
        for reserved in self.reserved_texts:
            if reserved in text:
                raise MalformedPromptError(
                    f"prompt contains the reserved token {reserved!r}; "
                    f"mark each image with {self.boi_text!r} instead"
                )
        num_placeholders = text.count(self.boi_text)
        if num_placeholders != num_images:
            raise ImagePlaceholderError(
                f"prompt has {num_placeholders} {self.boi_text!r} "
                f"placeholders for {num_images} images"
            )

    def _split_at_images(self, text: str, num_images: int) -> list[str]:
        self.check_images(text, num_images)
        return [text] if self.image_tokens is None else text.split(self.boi_text)

    @staticmethod
    def _interleave(segments: list[str], num_crops: Sequence[int]) -> list[str | int]:
        """Text pieces and image indices (one per soft-token group), in prompt order."""
        pieces: list[str | int] = [segments[0]]
        for image, (crops, after) in enumerate(zip(num_crops, segments[1:], strict=True)):
            if crops:
                pieces[-1] += _CROPS_INTRO
            pieces[-1] += "\n\n"
            pieces.append(image)
            for crop in range(crops):
                pieces.append("\n\n" + (_CROPS_MIDDLE if crop == 0 else " ") + "\n\n")
                pieces.append(image)
            pieces.append("\n\n" + after)
        return pieces
