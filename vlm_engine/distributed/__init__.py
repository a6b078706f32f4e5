"""Captioning on a Ray cluster with Ray Data (the `ray` extra): `caption_dataset`, and
`vlm-engine caption --ray`."""

from vlm_engine.distributed.captioning import caption_dataset

__all__ = ["caption_dataset"]
