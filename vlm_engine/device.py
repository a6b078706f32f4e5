"""The engine's device, and host-to-device transfers that do not make the host wait."""

from __future__ import annotations

import torch

from vlm_engine.engine_config import EngineConfig


def resolve_device(config: EngineConfig) -> torch.device:
    """The configured device, else the GPU where there is one, else the CPU."""
    return torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def pinned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host tensor the device can copy from asynchronously (plain memory without a GPU)."""
    return torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda")


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory, without blocking the host."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
