"""Time to first token for a repeated image, with each multimodal cache layer off and on.

One request (an image and a short question, 1 output token) is timed in these states:
  cold               nothing cached (a new image)
  + processor cache  preprocessed pixels and the file-hash memo are cached
  + encoder cache    the image embeddings are also still on the device
  + prefix cache     the KV blocks of the prompt are cached as well (everything warm)
  disk, restarted    a new engine whose only warm layer is the disk connector
transformers, given the same prompt, is timed beside (prefill + 1 token, no caches).
The image is passed as PNG bytes, as a service receives it. Medians over --repeats.

    python benchmarks/multimodal_cache_ttft.py [--device cuda] [--vision so400m]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from transformers import AutoProcessor, Gemma3ForConditionalGeneration  # noqa: E402

from vlm_engine import Engine, SamplingParams  # noqa: E402
from vlm_engine.testing import make_tiny_checkpoint  # noqa: E402
from vlm_engine.testing.samples import random_image  # noqa: E402

# Vision towers: SigLIP so400m as in every Gemma3 (896 px, 4096 patches, 256 tokens), and a
# smaller one that a 2-core CPU runs in well under a second.
VISION = {
    "so400m": dict(vision_hidden_size=1152, vision_intermediate_size=4304,
                   vision_num_hidden_layers=27, vision_num_attention_heads=16,
                   image_size=896, patch_size=14, mm_tokens_per_image=256),
    "base": dict(vision_hidden_size=768, vision_intermediate_size=3072,
                 vision_num_hidden_layers=12, vision_num_attention_heads=12,
                 image_size=448, patch_size=14, mm_tokens_per_image=256),
}  # fmt: skip
TEXT = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    query_pre_attn_scalar=64,
    sliding_window=512,
)
PARAMS = SamplingParams(temperature=0, max_tokens=1)
QUESTION = "<start_of_image>Describe the image in one sentence."


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    random_image(640, 480, seed).save(buffer, format="PNG")
    return buffer.getvalue()


def ttft(engine: Engine, image: bytes) -> float:
    (out,) = engine.generate({"prompt": QUESTION, "images": [image]}, PARAMS)
    return out.time_to_first_token


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_engine(path: Path, args, ec_dir: Path) -> dict[str, list[float]]:
    options = dict(device=args.device, dtype=args.dtype)
    engine = Engine(path, **options)
    ttft(engine, png_bytes(10_000))  # warm-up: kernels, allocator
    times: dict[str, list[float]] = {
        k: [] for k in ("cold", "processor", "encoder", "prefix", "disk")
    }
    for i in range(args.repeats):
        image = png_bytes(i)
        times["cold"].append(ttft(engine, image))
        engine.core.evict_unreferenced_encoder_outputs()
        engine.reset_prefix_cache()
        times["processor"].append(ttft(engine, image))
        engine.reset_prefix_cache()
        times["encoder"].append(ttft(engine, image))
        times["prefix"].append(ttft(engine, image))
    engine.close()
    spec = f"disk:{ec_dir}"
    with Engine(path, **options, ec_connector=spec) as writer:
        for i in range(args.repeats):
            ttft(writer, png_bytes(i))
    with Engine(path, **options, ec_connector=spec) as restarted:
        ttft(restarted, png_bytes(10_000))
        for i in range(args.repeats):
            times["disk"].append(ttft(restarted, png_bytes(i)))
        assert restarted.stats()["vision_encoder"]["items_encoded"] == 1  # only the warm-up
    return times


def measure_transformers(path: Path, args) -> list[float]:
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    model = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=dtype).to(args.device)
    processor = AutoProcessor.from_pretrained(path, backend="pil")
    times = []
    for i in [10_000, *range(args.repeats)]:
        start = time.perf_counter()
        inputs = processor(
            text=QUESTION, images=[Image.open(io.BytesIO(png_bytes(i)))], return_tensors="pt"
        ).to(args.device)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        sync(args.device)
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--vision", default="base", choices=sorted(VISION))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(
            Path(tmp) / "model", seed=0, dtype=args.dtype, **TEXT, **VISION[args.vision]
        )
        times = measure_engine(path, args, Path(tmp) / "ec")
        hf = measure_transformers(path, args)
    rows = [
        ("transformers (no caches)", hf),
        ("vlm_engine, cold", times["cold"]),
        ("+ processor cache", times["processor"]),
        ("+ encoder cache", times["encoder"]),
        ("+ prefix cache (all warm)", times["prefix"]),
        ("disk connector, restarted", times["disk"]),
    ]
    print(
        f"TTFT, one 640x480 PNG + question, vision {args.vision}, {args.dtype} on {args.device}"
        f", median of {args.repeats}"
    )
    print("| state | TTFT (ms) | engine cold / this |")
    print("|---|---:|---:|")
    cold = statistics.median(times["cold"])
    for name, values in rows:
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.1f} | {cold / median:.2f}x |")


if __name__ == "__main__":
    main()
