"""Where images sit in a prompt's token ids."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageGroup:
    """A run of image soft tokens that attend to each other: [offset, offset + length)."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class ImagePlaceholder:
    """Where one image's embeddings go: its soft-token groups (original, then crops).

    `offset`/`length` cover the first through the last soft token of the image, the text between
    crops included; the scheduler never splits this range across steps.
    """

    groups: tuple[ImageGroup, ...]

    @property
    def offset(self) -> int:
        return self.groups[0].offset

    @property
    def length(self) -> int:
        return self.groups[-1].end - self.offset

    @property
    def num_embeds(self) -> int:
        return sum(g.length for g in self.groups)


@dataclass(frozen=True)
class PromptInputs:
    """A prompt's token ids, each image expanded into its groups of soft tokens."""

    token_ids: list[int]
    placeholders: list[ImagePlaceholder]

    @property
    def image_groups(self) -> list[ImageGroup]:
        return [g for p in self.placeholders for g in p.groups]
