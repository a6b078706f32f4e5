"""The Gluon vision-tower attention kernel (Hopper only) against SDPA in float32, and its dispatch.

Gluon has no interpreter: on a CPU the kernel is compiled for compute capability 9.0 (Triton
ships ptxas), which catches what a change to the kernel or to Gluon's API breaks, and the PTX is
checked for what the design rests on (TMA, asynchronous warpgroup MMAs, per-partition register
counts). On a Hopper GPU the kernel runs and is compared with float32 attention.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_engine import envs
from vlm_engine.kernels import vision_attention as va
from vlm_engine.kernels.vision_attention import gluon_hopper as gva
from vlm_engine.kernels.vision_attention import vision_attention_ref

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_gluon = pytest.mark.skipif(
    gva.gluon is None, reason="this triton has no Gluon with Hopper support"
)
needs_hopper = pytest.mark.skipif(
    not HOPPER, reason="the kernel runs only on a Hopper GPU (wgmma, setmaxnreg)"
)
H100_SHARED_MEMORY = 232448  # bytes of shared memory one program may use on an H100


@pytest.fixture
def gluon_calls(monkeypatch) -> list:
    """One entry per call of the Gluon kernel's wrapper from here on (it still runs)."""
    calls = []
    kernel = gva.vision_attention
    monkeypatch.setattr(gva, "vision_attention", lambda *a: calls.append(1) or kernel(*a))
    return calls


# Compiled in a fresh interpreter: the `interpret` fixture of other kernel tests swaps Triton's
# language helpers for interpreted twins, which Gluon's compiler must not pick up.
_COMPILE = """
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from vlm_engine.kernels.vision_attention import gluon_hopper as gva

dtype, head_dim, num_heads = getattr(torch, sys.argv[1]), int(sys.argv[2]), 4
qkv = torch.zeros(2, 512, 3 * num_heads * head_dim, dtype=dtype)  # CPU: descriptors only
names = ["q_desc", "q_tail_desc", "kv_desc", "k_tail_desc", "v_tail_desc"]
descriptors = gva.descriptors(qkv, num_heads)
signature = {name: mangle_type(d) for name, d in zip(names, descriptors, strict=True)}
signature["out_ptr"] = "*bf16" if dtype == torch.bfloat16 else "*fp16"
signature["flag_ptr"] = "*i32"
signature |= {"num_patches": "i32", "num_heads": "i32", "out_row_stride": "i32"}
signature["qk_scale"] = "fp32"
constants = {
    "HEAD_DIM": head_dim, "BLOCK_M": gva.BLOCK_M, "BLOCK_N": gva.BLOCK_N, "STAGES": gva.STAGES,
    "PRODUCER_REGISTERS": gva.PRODUCER_REGISTERS, "CONSUMER_REGISTERS": gva.CONSUMER_REGISTERS,
    "FIXED_MAX": dtype == torch.bfloat16,  # what the wrapper passes
}
signature |= dict.fromkeys(constants, "constexpr")
source = GluonASTSource(gva.vision_attention_kernel, signature, constants)
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print(json.dumps({"ptx": compiled.asm["ptx"], "cubin_bytes": len(compiled.asm["cubin"]),
                  "shared": compiled.metadata.shared}))
"""


@needs_gluon
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("head_dim", [72, 80])
def test_compiles_for_hopper(dtype, head_dim):
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE, dtype, str(head_dim)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    ptx = result["ptx"]
    assert result["cubin_bytes"] > 0
    assert "cp.async.bulk.tensor.3d" in ptx  # TMA loads over the [tokens, 3H, D] view
    # S_j waited for alone, the products of P_{j-1} still running: with the fixed maximum (bf16)
    # there are three of these (values, value tail, row sums), otherwise two
    waits = 3 if dtype == "bfloat16" else 2
    assert "wgmma.mma_async" in ptx and f"wgmma.wait_group.sync.aligned {waits}" in ptx
    assert f"setmaxnreg.inc.sync.aligned.u32 \t{gva.CONSUMER_REGISTERS}" in ptx
    assert f"setmaxnreg.dec.sync.aligned.u32 \t{gva.PRODUCER_REGISTERS}" in ptx
    # the value tail's product is exactly head_dim - 64 wide (8 for SigLIP's 72, not padded to 16)
    ab = "bf16" if dtype == "bfloat16" else "f16"
    assert f"wgmma.mma_async.sync.aligned.m64n{head_dim - 64}k16.f32.{ab}.{ab}" in ptx
    assert result["shared"] <= H100_SHARED_MEMORY


def test_not_supported_off_hopper_or_off_shape():
    qkv = torch.zeros(1, 4096, 3 * 16 * 72, dtype=torch.bfloat16)
    assert not gva.supported(qkv, 16)  # CPU
    with pytest.raises(ValueError, match="does not take"):
        gva.vision_attention(qkv, 16)


@needs_hopper
@needs_gluon
def test_supported_shapes():
    def qkv(n, p, h, d, dtype=torch.bfloat16):
        return torch.zeros(n, p, 3 * h * d, dtype=dtype, device="cuda")

    assert gva.supported(qkv(2, 4096, 16, 72), 16)
    assert gva.supported(qkv(1, 256, 4, 80, torch.float16), 4)
    assert not gva.supported(qkv(1, 4096, 16, 64), 16)  # no tail: SDPA
    assert not gva.supported(qkv(1, 4096, 16, 72, torch.float32), 16)
    assert not gva.supported(qkv(1, 4000, 16, 72), 16)  # not whole 256-patch blocks
    assert not gva.supported(qkv(1, 4096, 16, 72)[:, ::2], 16)  # not contiguous


@needs_hopper
@needs_gluon
@pytest.mark.parametrize("fixed_max", [True, False])  # float16 always takes the online maximum
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "num_images,num_patches,num_heads,head_dim,q_scale",
    [(2, 4096, 16, 72, 2.0), (3, 256, 4, 80, 2.0), (1, 1024, 3, 72, 2.0), (5, 512, 2, 72, 2.0),
     (2, 4096, 4, 72, 8.0)],
)  # fmt: skip
def test_matches_float32_attention(
    monkeypatch, fixed_max, dtype, num_images, num_patches, num_heads, head_dim, q_scale
):
    monkeypatch.setattr(envs.values, "vision_fixed_max", fixed_max)
    gen = torch.Generator(device="cuda").manual_seed(num_patches + head_dim)
    width = 3 * num_heads * head_dim
    qkv = torch.randn(num_images, num_patches, width, device="cuda", dtype=dtype, generator=gen)
    qkv[..., : num_heads * head_dim] *= q_scale  # sharper softmax than unit scores
    expected = vision_attention_ref(qkv.float(), num_heads)
    sdpa_error = (vision_attention_ref(qkv, num_heads).float() - expected).abs().max().item()

    out = gva.vision_attention(qkv, num_heads)

    assert out.shape == expected.shape and out.dtype == dtype and out.is_contiguous()
    error = (out.float() - expected).abs().max().item()
    assert error <= 2 * sdpa_error + 1e-4, (error, sdpa_error)


@needs_hopper
@needs_gluon
def test_rows_that_overflow_the_fixed_maximum_are_computed_again(monkeypatch):
    # Image 1, head 2: the query rows of block 2 (patches 256..383) see keys 320..383 score ~370
    # (log2 units) above the first key tile's maximum: exp2 overflows there, and only there.
    # Those 128 rows are flagged and computed again by the Triton kernel; the output is right.
    num_heads, head_dim = 4, 72
    gen = torch.Generator(device="cuda").manual_seed(3)
    qkv = torch.randn(2, 512, 3 * num_heads * head_dim, device="cuda", generator=gen) * 0.1
    q = qkv[1, 256:384, 2 * head_dim : 3 * head_dim]
    q.fill_(1.0)
    key = (num_heads + 2) * head_dim
    qkv[1, 320:384, key : key + head_dim] = 30.0
    qkv = qkv.to(torch.bfloat16)
    seen = []
    redo = gva.triton_flash.redo_flagged

    def spy(out, qkv, num_heads, flags, block_m):
        seen.append(flags.clone())
        redo(out, qkv, num_heads, flags, block_m)

    monkeypatch.setattr(gva.triton_flash, "redo_flagged", spy)
    monkeypatch.setattr(envs.values, "vision_fixed_max", True)
    out = gva.vision_attention(qkv, num_heads)

    flagged = seen[0].nonzero().flatten().tolist()
    assert flagged == [(1 * num_heads + 2) * 4 + 2] and seen[0][flagged[0]].item() == 128
    expected = vision_attention_ref(qkv.float(), num_heads)
    sdpa_error = (vision_attention_ref(qkv, num_heads).float() - expected).abs().max().item()
    assert out.isfinite().all()
    assert (out.float() - expected).abs().max().item() <= 2 * sdpa_error + 1e-4


@needs_hopper
@needs_gluon
def test_dispatch_takes_gluon_on_hopper(monkeypatch, gluon_calls):
    qkv = torch.randn(2, 4096, 3 * 16 * 72, device="cuda", dtype=torch.bfloat16)
    out = va.vision_attention(qkv, 16)
    assert gluon_calls == [1]
    va.vision_attention(qkv[:1].contiguous(), 16)  # one image: SDPA (GLUON_MIN_IMAGES)
    assert gluon_calls == [1]
    monkeypatch.setattr(envs.values, "vision_gluon_attention", False)
    sdpa = va.vision_attention(qkv, 16)
    assert gluon_calls == [1]
    assert (out.float() - sdpa.float()).abs().max().item() < 2e-2


@needs_hopper
@needs_gluon
def test_tower_with_gluon_attention_matches_sdpa(monkeypatch, gluon_calls):
    # Gemma3's tower shape (so400m at 896 px: width 1152, 16 heads of 72, 4096 patches) cut to 2
    # layers, random weights, two images so that the dispatch takes the kernel: same last hidden
    # state as the SDPA path, as far as bf16 allows.
    from vlm_engine.config import VisionConfig
    from vlm_engine.models.siglip import SiglipVisionTower

    config = VisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16,
        image_size=896, patch_size=14,
    )  # fmt: skip
    torch.manual_seed(0)
    tower = SiglipVisionTower(config)
    for p in tower.parameters():
        torch.nn.init.normal_(p, std=0.02)
    tower = tower.to("cuda", torch.bfloat16).eval()
    tower.fuse_projections()
    pixels = torch.rand(2, 3, 896, 896, device="cuda", dtype=torch.bfloat16) * 2 - 1
    with torch.inference_mode():
        ours = tower(pixels).float()
        assert gluon_calls == [1, 1]  # one per layer
        monkeypatch.setattr(envs.values, "vision_gluon_attention", False)
        sdpa = tower(pixels).float()
    assert gluon_calls == [1, 1]
    scale = sdpa.abs().max().item()
    assert (ours - sdpa).abs().max().item() <= 0.02 * scale
    assert torch.nn.functional.cosine_similarity(ours.flatten(), sdpa.flatten(), dim=0) > 0.9999
