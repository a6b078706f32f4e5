"""Device side of the encoder cache: image embeddings by mm_hash, filled from the second-level
connector when it has them, else by running the vision tower (whose results it then saves)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlm_engine.device import to_device
from vlm_engine.models.gemma3 import Gemma3Model
from vlm_engine.runtime.connectors import ECConnector
from vlm_engine.vocab.scheduler_output import ScheduledChunk


class EncoderRunner:
    def __init__(
        self,
        model: Gemma3Model,
        connector: ECConnector | None,
        to_model_input: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    ):
        self.model = model
        # uint8 pixels of each image, on the device -> the tower's float input (resized where
        # the frontend left that to the device, normalized): Gemma3ImageProcessor.to_model_input
        self.to_model_input = to_model_input
        self.connector = connector  # keyed by this model's fingerprint
        self.cache: dict[str, torch.Tensor] = {}  # mm_hash -> [crops * tokens, hidden]
        self.num_items_encoded = 0  # images and crops run through the vision tower
        self.num_loaded = 0  # images taken from the connector
        self._staging: torch.Tensor | None = None  # pinned host buffer for pixel uploads
        self._staged: torch.cuda.Event | None = None  # recorded after the last upload from it

    def drop(self, mm_hashes: list[str]) -> None:
        for mm_hash in mm_hashes:
            self.cache.pop(mm_hash, None)

    def run(self, chunks: list[ScheduledChunk]) -> None:
        """Make sure every image the scheduler listed for this step is in the cache."""
        todo: dict[str, torch.Tensor] = {}
        for chunk in chunks:
            for index in chunk.encoder_inputs:
                feature = chunk.request.mm_features[index]
                if feature.mm_hash not in self.cache:
                    todo[feature.mm_hash] = feature.pixel_values
        if self.connector is not None and todo:
            self._load(todo)
        if todo:
            self._encode(todo)

    def _load(self, todo: dict[str, torch.Tensor]) -> None:
        weight = self.model.language_model.embed_tokens.weight
        hashes = list(todo)
        loaded = self.connector.load_many(hashes, expected_shape_tail=(weight.shape[1],))
        for mm_hash, tensor in zip(hashes, loaded, strict=True):
            rows = todo[mm_hash].shape[0] * self.model.config.image_tokens.mm_tokens_per_image
            if tensor is None or tensor.shape[0] != rows:
                continue  # a miss (a verified entry of another size is not this image's)
            self.cache[mm_hash] = tensor.to(weight.device, weight.dtype)
            self.num_loaded += 1
            del todo[mm_hash]

    def _encode(self, todo: dict[str, torch.Tensor]) -> None:
        # [crops, 3, h, w] per image of the step -> per image [crops * tokens, hidden]
        device = self.model.language_model.embed_tokens.weight.device
        items = self._upload(list(todo.values()), device)
        pixels = self.to_model_input(items) if items[0].dtype == torch.uint8 else torch.cat(items)
        embeds = self.model.embed_images(pixels)
        self.num_items_encoded += embeds.shape[0]
        sizes = [p.shape[0] for p in todo.values()]
        for mm_hash, item in zip(todo, embeds.split(sizes), strict=True):
            self.cache[mm_hash] = item.flatten(0, 1)
            if self.connector is not None:
                self.connector.save(mm_hash, self.cache[mm_hash])

    def close(self) -> None:
        self.cache.clear()
        self._staging = self._staged = None

    def _upload(self, items: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """The step's pixels on the device, each image's at its own shape. To a GPU in one copy
        through a pinned staging buffer kept across steps: no copy waits for queued work, and no
        fresh allocation (new pinned or pageable memory costs page faults on every image,
        milliseconds)."""
        if device.type != "cuda":
            return [to_device(item, device) for item in items]
        sizes = [item.numel() for item in items]
        numel = sum(sizes)
        staging = self._staging
        if staging is None or staging.numel() < numel or staging.dtype != items[0].dtype:
            size = max(numel, 2 * staging.numel()) if staging is not None else numel
            self._staging = torch.empty(size, dtype=items[0].dtype, pin_memory=True)
            self._staged = None
        if self._staged is not None:
            self._staged.synchronize()  # the previous upload has left the buffer
        host = self._staging[:numel]
        torch.cat([item.reshape(-1) for item in items], out=host)
        flat = host.to(device, non_blocking=True)
        self._staged = torch.cuda.Event()
        self._staged.record()
        return [part.view(item.shape) for part, item in zip(flat.split(sizes), items, strict=True)]

    def stats(self) -> dict[str, int]:
        return {"items_encoded": self.num_items_encoded, "images_loaded": self.num_loaded}
