"""Every environment switch the engine reads, in one place.

Each switch turns one GPU kernel path on or off, for A/B measurements and as a way around a
kernel; the defaults are what runs fastest where it was measured (docs/kernels.md). They are
read once, when this module is first imported: a process keeps one setting for its whole life
(CUDA graphs keep what they captured), and a core in its own process inherits the frontend's
environment. `values` holds this process's settings (tests may set its attributes);
`Engine.stats()["switches"]` reports them by variable name. One more variable, the server's API
key, is named here too (`API_KEY_VARIABLE`), so that this module lists every variable read.

A switch that is on by default is turned off by setting its variable to 0; one that is off by
default is turned on by 1. Other values leave the default.

| variable | default | what it controls |
|---|---|---|
| VLM_ENGINE_PDL | on | programmatic dependent launch of the forward pass's Triton kernels on Hopper |
| VLM_ENGINE_SKINNY_LINEAR | on | the decoder's projections at 1-4 tokens on Triton kernels (off: cuBLAS) |
| VLM_ENGINE_VISION_FUSED_RESIDUAL | on | the tower's out_proj/fc2 accumulate onto the residual stream; their biases go into the next LayerNorm |
| VLM_ENGINE_VISION_FOLD_NORMS | on | each tower layer's second LayerNorm folded into fc1 (Hopper, bf16/fp16) |
| VLM_ENGINE_VISION_GLUON_ATTN | on | the tower's attention in the Gluon kernel (Hopper) instead of SDPA |
| VLM_ENGINE_VISION_FIXED_MAX | on | that kernel's softmax against the first key tile's maxima (bf16) |
| VLM_ENGINE_VISION_TRITON_ATTN | off | the tower's attention in the Triton flash kernel (bf16/fp16 on a GPU) |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Switch:
    attribute: str  # its name on `values`
    variable: str  # its environment variable
    default: bool

    def read(self, environ: Mapping[str, str]) -> bool:
        value = environ.get(self.variable)
        if self.default:
            return value != "0"
        return value == "1"


SWITCHES = (
    Switch("pdl", "VLM_ENGINE_PDL", True),
    Switch("skinny_linear", "VLM_ENGINE_SKINNY_LINEAR", True),
    Switch("vision_fused_residual", "VLM_ENGINE_VISION_FUSED_RESIDUAL", True),
    Switch("vision_fold_norms", "VLM_ENGINE_VISION_FOLD_NORMS", True),
    Switch("vision_gluon_attention", "VLM_ENGINE_VISION_GLUON_ATTN", True),
    Switch("vision_fixed_max", "VLM_ENGINE_VISION_FIXED_MAX", True),
    Switch("vision_triton_attention", "VLM_ENGINE_VISION_TRITON_ATTN", False),
)


class Switches:
    """One process's settings, an attribute per switch."""

    pdl: bool
    skinny_linear: bool
    vision_fused_residual: bool
    vision_fold_norms: bool
    vision_gluon_attention: bool
    vision_fixed_max: bool
    vision_triton_attention: bool

    def __init__(self, environ: Mapping[str, str]):
        for switch in SWITCHES:
            setattr(self, switch.attribute, switch.read(environ))

    def by_variable(self) -> dict[str, bool]:
        return {s.variable: getattr(self, s.attribute) for s in SWITCHES}


values = Switches(os.environ)

# A setting read where it is used, not a switch: the server's API key when `--api-key` is not
# given (an environment variable keeps it out of the process list).
API_KEY_VARIABLE = "VLM_ENGINE_API_KEY"
VARIABLES = frozenset({*(s.variable for s in SWITCHES), API_KEY_VARIABLE})
