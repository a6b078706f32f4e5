"""Engine options: what a caller passes to `Engine(checkpoint_dir, **options)`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlm_engine.quant_config import QUANTIZATIONS


@dataclass(frozen=True)
class EngineConfig:
    device: str | None = None  # None: "cuda" when available, else "cpu"
    dtype: str = "auto"  # "auto": bfloat16 on a GPU, float32 on a CPU
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    max_model_len: int | None = None  # None: min(model's max positions, 8192)
    num_kv_blocks: int | None = None  # None: from kv_cache_memory_gb
    kv_cache_memory_gb: float | None = None  # None: 0.25 GiB on a CPU; on a GPU, profiled
    gpu_memory_utilization: float = 0.9  # share of the GPU the engine may use (KV sizing)
    use_cuda_graphs: bool = True  # replay decode-only steps from CUDA graphs (GPU only)
    async_scheduling: bool | None = None  # schedule a step while the previous runs; None: GPU
    load_format: str = "safetensors"  # or "dummy": random weights of the checkpoint's shapes
    # "fp8": the decoder's projections quantized at load time; "fp8-all": the vision tower's
    # linear layers too (quant_config.QUANTIZATIONS)
    quantization: str | None = None
    enable_prefix_caching: bool = True
    encoder_cache_size: int = 16384  # image embeddings kept on the device (256 per Gemma3 image)
    encoder_compute_budget: int = 4096  # image embeddings the vision tower may compute per step
    processor_cache_bytes: int = 512 * 2**20  # preprocessed pixels kept in memory; 0 disables
    ec_connector: str | None = None  # "disk:/path[?size_gb=N]" or "redis://host:port/db"
    max_image_pixels: int | None = 64 * 2**20  # larger images are rejected (decompression bombs)
    max_images_per_prompt: int | None = None  # more images are rejected; None: max_model_len bounds
    scheduling_policy: str = "fcfs"  # or "priority" (lower value first)
    core_process: bool | None = None  # engine core in its own process; None: on a GPU only
    resize_on_device: bool | None = None  # resize images in the core, on its device; None: GPU
    seed: int | None = None  # seeds unseeded sampling; None: fresh entropy
    processor_options: dict[str, Any] = field(default_factory=dict)  # e.g. do_pan_and_scan

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "encoder_cache_size",
            "encoder_compute_budget",
        ):
            value = getattr(self, name)
            if _not_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        optional_limits = (
            ("max_model_len", 2),
            ("num_kv_blocks", 2),
            ("max_image_pixels", 1),
            ("max_images_per_prompt", 0),
        )
        for name, low in optional_limits:
            value = getattr(self, name)
            if value is not None and (_not_int(value) or value < low):
                raise ValueError(f"{name} must be an int >= {low} or None, got {value!r}")
        if not isinstance(self.processor_cache_bytes, int) or self.processor_cache_bytes < 0:
            raise ValueError(
                f"processor_cache_bytes must be an int >= 0, got {self.processor_cache_bytes!r}"
            )
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        for name in ("core_process", "async_scheduling", "resize_on_device"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be True, False or None, got {getattr(self, name)!r}")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(
                f"load_format must be 'safetensors' or 'dummy', got {self.load_format!r}"
            )
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(
                f"quantization must be one of {list(QUANTIZATIONS)} or None, "
                f"got {self.quantization!r}"
            )
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(
                f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown Engine options {unknown}; valid options: {sorted(known)}")
        return cls(**options)


def _not_int(value: object) -> bool:
    return not isinstance(value, int) or isinstance(value, bool)
