"""Training batches for the demo model: the engine's chat prompt for one picture, then its answer.

A batch holds one task. Captions: each row is the token ids the engine builds for
``demo_request(picture)`` (chat template, image group spliced in) followed by the canonical
caption and ``<end_of_turn>``. JSON: the prompt is ``DEMO_JSON_PROMPT`` and the answer the
scene's JSON object (``shapes.scene_json``). Labels cover only the answer and ``<end_of_turn>``;
pixels go through the checkpoint's own image processor, so the model trains on exactly what it
will see at inference.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm_engine.config import ModelConfig
from vlm_engine.demo.model import DEMO_JSON_PROMPT, DEMO_PROMPT, demo_request
from vlm_engine.demo.shapes import ShapeScene, caption, make_example, scene_json
from vlm_engine.frontend.chat import render_chat, split_messages
from vlm_engine.frontend.image_processor import Gemma3ImageProcessor
from vlm_engine.frontend.prompt import PromptBuilder
from vlm_engine.frontend.tokenizer import load_tokenizer

IGNORE_INDEX = -100  # label of positions that carry no loss (transformers' convention)
IMAGE_SIZES = (96, 256)  # pictures are drawn at a random square size in this range, then resized
TASKS = {"caption": (DEMO_PROMPT, caption), "json": (DEMO_JSON_PROMPT, scene_json)}


@dataclass(frozen=True)
class CaptionBatch:
    """Right-padded rows; the keyword arguments of Gemma3ForConditionalGeneration.forward."""

    input_ids: torch.Tensor  # [batch, seq] int64
    token_type_ids: torch.Tensor  # [batch, seq] int64, 1 on image soft tokens
    labels: torch.Tensor  # [batch, seq] int64, IGNORE_INDEX outside captions
    pixel_values: torch.Tensor  # [batch, 3, H, W] float32
    scenes: tuple[ShapeScene, ...]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "token_type_ids": self.token_type_ids,
            "labels": self.labels,
            "pixel_values": self.pixel_values,
        }


class CaptionBatcher:
    """Draws batches of random scenes for one checkpoint's tokenizer and image processor."""

    def __init__(self, checkpoint_dir: str | Path):
        config = ModelConfig.from_hf(checkpoint_dir)
        self.tokenizer = load_tokenizer(checkpoint_dir)
        self.image_token_id = config.image_tokens.image_token_id
        self.processor = Gemma3ImageProcessor.from_pretrained(
            checkpoint_dir, config.image_tokens.mm_tokens_per_image
        )
        self.end_of_turn_id = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        self.pad_id = self.tokenizer.pad_token_id
        builder = PromptBuilder(self.tokenizer, config.image_tokens)
        self.task_prompt_ids = {}
        for task, (prompt, _) in TASKS.items():
            # Only the message structure matters here: the image source is never opened.
            rendered, _, _ = split_messages(demo_request("picture.png", prompt)["messages"])
            text = render_chat(self.tokenizer, rendered)
            self.task_prompt_ids[task] = builder.build(text, [0], add_bos=False).token_ids
        self.prompt_ids = self.task_prompt_ids["caption"]

    def sample(self, rng: random.Random, batch_size: int, task: str = "caption") -> CaptionBatch:
        """``batch_size`` random scenes, each drawn at a random size in ``IMAGE_SIZES``, with
        the prompt and answers of ``task`` ("caption" or "json")."""
        prompt_ids = self.task_prompt_ids[task]
        examples = [make_example(rng, rng.randint(*IMAGE_SIZES)) for _ in range(batch_size)]
        pixels = [self.processor.preprocess(image) for image, _ in examples]
        if any(p.num_crops for p in pixels):
            raise ValueError("the demo model's processor must not cut pan-and-scan crops")
        scenes = tuple(scene for _, scene in examples)
        targets = self.answer_ids(scenes, task)
        seq_len = len(prompt_ids) + max(map(len, targets))
        input_ids = torch.full((batch_size, seq_len), self.pad_id, dtype=torch.long)
        labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
        start = len(prompt_ids)
        for row, target in enumerate(targets):
            input_ids[row, : start + len(target)] = torch.tensor(prompt_ids + target)
            labels[row, start : start + len(target)] = torch.tensor(target)
        return CaptionBatch(
            input_ids=input_ids,
            token_type_ids=(input_ids == self.image_token_id).long(),
            labels=labels,
            pixel_values=torch.cat([p.pixel_values for p in pixels]),
            scenes=scenes,
        )

    def answer_ids(self, scenes: tuple[ShapeScene, ...], task: str) -> list[list[int]]:
        """Token ids the model should answer with: the caption (or JSON), then
        ``<end_of_turn>``."""
        answer = TASKS[task][1]
        encoded = self.tokenizer([answer(s) for s in scenes], add_special_tokens=False)
        return [ids + [self.end_of_turn_id] for ids in encoded["input_ids"]]
