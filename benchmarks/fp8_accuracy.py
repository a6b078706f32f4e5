"""What FP8 costs in accuracy: the engine in float32, bfloat16 and FP8 (`quantization="fp8"`: the
decoder's projections; `"fp8-all"`: the vision tower's linear layers too) on the same trained
model, each compared with bfloat16 and float32.

Model: the shipped demo model (trained; its held-out pictures are scored attribute by attribute)
unless --model names another checkpoint. For each precision:
  - next-token logits of --num-prompts held-out prompts (image and question), prefill only:
    relative error (max |a - b| / max |b|) and top-1 agreement against the reference precision;
  - greedy answers to the same prompts: the share that are token-for-token equal, and the mean
    share of each answer's tokens before the first difference;
  - for the demo model, the held-out score (every attribute right), the task's own measure.

    python benchmarks/fp8_accuracy.py                       # GPU: bf16 and FP8 on their kernels
    python benchmarks/fp8_accuracy.py --device cpu          # FP8 through its dequantized reference

On a GPU, bfloat16 and FP8 run on the kernels they run on in service (FP8: cuBLASLt FP8 GEMMs);
float32 is the reference. On a CPU FP8 takes the reference path (activations rounded to float8
per token, weights dequantized), which computes the same quantized values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from vlm_engine import Engine  # noqa: E402
from vlm_engine.demo.evaluation import caption_images, held_out_examples, score_captions  # noqa: E402
from vlm_engine.demo.model import default_model_path, demo_request  # noqa: E402
from vlm_engine.pipeline import VisionLanguagePipeline  # noqa: E402

SETTINGS = (
    ("float32", "float32", None),
    ("bfloat16", "bfloat16", None),
    ("fp8", "bfloat16", "fp8"),
    ("fp8-all", "bfloat16", "fp8-all"),
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max())


def next_token_logits(path: Path, dtype: str, quantization, device: str, images) -> list:
    pipeline = VisionLanguagePipeline.load(
        path, dtype=dtype, device=device, quantization=quantization
    )
    if device == "cuda":
        pipeline.model.fuse_projections()  # the layers as the engine runs them
    logits = []
    for image in images:  # the prompt the engine gets: the chat of `demo_request`
        prepared = pipeline.prepare_chat(demo_request(image)["messages"])
        (out,) = pipeline.forward_logits([prepared])
        logits.append(out[-1].float().cpu())
    del pipeline
    return logits


def answers(path: Path, dtype: str, quantization, device: str, images) -> tuple[list, list]:
    with Engine(path, device=device, dtype=dtype, quantization=quantization) as engine:
        texts = caption_images(engine, images)
        tokens = [engine.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return texts, tokens


def agreement(ours: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    equal = statistics.mean(a == b for a, b in zip(ours, reference, strict=True))
    prefixes = []
    for a, b in zip(ours, reference, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        longest = max(len(a), len(b), 1)
        prefixes.append((min(len(a), len(b)) if same is None else same) / longest)
    return equal, statistics.mean(prefixes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint (default: the demo model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-prompts", type=int, default=200)
    args = parser.parse_args()
    path = Path(args.model) if args.model else default_model_path()
    examples = held_out_examples(args.num_prompts)
    images = [image for image, _ in examples]
    results = {}
    for name, dtype, quantization in SETTINGS:
        logits = next_token_logits(path, dtype, quantization, args.device, images)
        texts, tokens = answers(path, dtype, quantization, args.device, images)
        score = score_captions([scene for _, scene in examples], texts) if not args.model else None
        results[name] = (logits, tokens, score)
        print(f"{name}: done", flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"\n{path.name}, {args.num_prompts} held-out prompts, {device}, torch {torch.__version__}"
    )
    print("| precision | against | logits rel. error (median / max) | top-1 agreement | "
          "answers equal | answer prefix kept | held-out all right |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, reference in (("float32", None), ("bfloat16", "float32"),
                            ("fp8", "bfloat16"), ("fp8", "float32"),
                            ("fp8-all", "bfloat16"), ("fp8-all", "float32")):  # fmt: skip
        logits, tokens, score = results[name]
        held = f"{score.all_correct_rate:.1%}" if score else "-"
        if reference is None:
            print(f"| {name} | - | - | - | - | - | {held} |")
            continue
        ref_logits, ref_tokens, _ = results[reference]
        errors = [rel_err(a, b) for a, b in zip(logits, ref_logits, strict=True)]
        top1 = statistics.mean(
            int(a.argmax() == b.argmax()) for a, b in zip(logits, ref_logits, strict=True)
        )
        equal, prefix = agreement(tokens, ref_tokens)
        print(
            f"| {name} | {reference} | {statistics.median(errors):.2e} / {max(errors):.2e} | "
            f"{top1:.1%} | {equal:.1%} | {prefix:.1%} | {held} |"
        )


if __name__ == "__main__":
    main()
