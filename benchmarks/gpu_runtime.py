"""GPU benchmarks on a Gemma3-4B-shaped model (the real 4B config, random bf16 weights), with
transformers measured in the same run:

  a. batch captioning: N distinct images, a short prompt, fixed output length: images/s, tokens/s
     (transformers `generate` at batch 64);
  b. single stream: time to first token and decode ms/token at batch 1, beside the bandwidth
     floor (bytes of weights read per decode step / measured device copy bandwidth);
  c. the vision tower alone: images/s (one row per batch size of --vision-batch, e.g. 8,16,32).

    python benchmarks/gpu_runtime.py [--only a,b,c,d] [--num-images 256] [--output-len 128]
                                     [--core-process both|own|in] [--vision-batch 32]
                                     [--quantization none,fp8,fp8-all]

--quantization runs the engine once per setting listed (none: bf16; fp8: the decoder's
projections quantized at load; fp8-all: the vision tower's linear layers too), transformers
(bf16) measured once beside them; the floor of (b) is then each setting's own weight bytes.

(a) and (b) run with the engine core in its own process (the default on a GPU) and in-process;
(c) and (d) read the in-process engine's internals.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from transformers import AutoConfig, AutoProcessor, Gemma3ForConditionalGeneration  # noqa: E402

from vlm_engine import Engine, SamplingParams  # noqa: E402
from vlm_engine.testing import make_tiny_checkpoint  # noqa: E402

GEMMA3_4B = dict(
    vocab_size=262_208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    sliding_window=1024, sliding_window_pattern=6, rope_scaling_factor=8.0,
    max_position_embeddings=131_072, vision_hidden_size=1152, vision_intermediate_size=4304,
    vision_num_hidden_layers=27, vision_num_attention_heads=16, image_size=896, patch_size=14,
    mm_tokens_per_image=256, dtype="bfloat16", write_weights=False,
)  # fmt: skip
# The 27B: its decoder (the vision tower is the same so400m SigLIP). In bf16 its weights take
# 54 GB, so beside transformers it needs the H200's memory; --no-transformers runs it alone.
GEMMA3_27B = dict(
    GEMMA3_4B, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
    num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
)  # fmt: skip
SHAPES = {"4b": GEMMA3_4B, "27b": GEMMA3_27B}
PROMPT = "<start_of_image>Write a caption for this image."


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(n)]


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def hf_model(path: Path):
    config = AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return model.eval(), AutoProcessor.from_pretrained(path)


def hf_generate(model, processor, batch: list[Image.Image], output_len: int):
    inputs = processor(
        text=[PROMPT] * len(batch), images=[[im] for im in batch], return_tensors="pt", padding=True
    ).to("cuda")
    with torch.inference_mode():
        return model.generate(
            **inputs, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False
        )


def caption_seconds(engine, args) -> float:
    pics = images(args.num_images, seed=1)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, min_tokens=args.output_len)
    # Warm-up at full length: Triton compiles a kernel variant the first time an argument's
    # divisibility changes, which mixed prefill/decode steps keep doing for a while.
    engine.generate([{"prompt": PROMPT, "images": [p]} for p in images(48, seed=9)], params)
    return timed(
        lambda: engine.generate([{"prompt": PROMPT, "images": [p]} for p in pics], params)
    )[0]


def single_stream_ms(engine, args) -> tuple[float, float]:
    params = SamplingParams(temperature=0, max_tokens=args.output_len, min_tokens=args.output_len)
    engine.generate({"prompt": PROMPT, "images": [images(1, seed=8)[0]]}, params)
    runs = [
        engine.generate({"prompt": PROMPT, "images": [im]}, params)[0] for im in images(3, seed=3)
    ]
    ttft = statistics.median(o.time_to_first_token for o in runs) * 1e3
    tpot = statistics.median(o.time_per_output_token for o in runs) * 1e3
    return ttft, tpot


def bench_own_process(path: Path, args, quantization: str | None) -> dict[str, object]:
    """(a) and (b) with the core in its own process; transformers is compared later."""
    engine = make_engine(path, args, core_process=True, quantization=quantization)
    results: dict[str, object] = {}
    if "a" in args.only:
        results["a"] = caption_seconds(engine, args)
    if "b" in args.only:
        results["b"] = single_stream_ms(engine, args)
    engine.close()
    return results


def bench_captioning(engine, hf, args, own=None) -> list[str]:
    pics = images(args.num_images, seed=1)
    ours = caption_seconds(engine, args)
    if hf is not None and "a" not in _HF:  # measured once, beside every setting of the engine
        hf_generate(*hf, images(2, seed=9), 4)
        _HF["a"], _ = timed(
            lambda: [
                hf_generate(*hf, pics[i : i + args.hf_batch], args.output_len)
                for i in range(0, len(pics), args.hf_batch)
            ]
        )
    theirs = _HF.get("a")
    n, tokens = len(pics), len(pics) * args.output_len
    rows = []
    for label, seconds in (("core in-process", ours), ("core in own process", own)):
        if seconds is None:
            continue
        rows += [
            f"| a. captioning {n} images x {args.output_len} tokens, {label} | images/s | "
            f"{n / seconds:.2f} | {_peer(n, theirs, '.2f')} | {_ratio(theirs, seconds)} |",
            f"| | output tokens/s | {tokens / seconds:.0f} | {_peer(tokens, theirs, '.0f')} | "
            f"{_ratio(theirs, seconds)} |",
        ]
    return rows


def _peer(amount: float, seconds: float | None, fmt: str) -> str:
    return "-" if seconds is None else format(amount / seconds, fmt)


def _ratio(theirs: float | None, ours: float) -> str:
    return "-" if theirs is None else f"{theirs / ours:.2f}x"


def bandwidth_floor_ms(engine) -> tuple[float, float]:
    lm = engine.core.engine_core.runner.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    buffer = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    other = torch.empty_like(buffer)
    other.copy_(buffer)
    seconds = min(timed(lambda: other.copy_(buffer))[0] for _ in range(5))
    bandwidth = 2 * buffer.numel() / seconds  # read + write
    return weight_bytes / bandwidth * 1e3, bandwidth / 1e9


def bench_single_stream(engine, hf, args, own=None) -> list[str]:
    pic = images(1, seed=2)[0]
    ttft, tpot = single_stream_ms(engine, args)
    if hf is not None and "b" not in _HF:
        hf_generate(*hf, [pic], 2)
        first = statistics.median(timed(lambda: hf_generate(*hf, [pic], 1))[0] for _ in range(3))
        full, _ = timed(lambda: hf_generate(*hf, [pic], args.output_len))
        _HF["b"] = first, (full - first) / (args.output_len - 1) * 1e3
    hf_first, hf_tpot = _HF.get("b", (None, None))
    floor, bandwidth = bandwidth_floor_ms(engine)
    rows = []
    for label, (first, per_token) in (
        ("core in-process", (ttft, tpot)),
        ("core in own process", own or (None, None)),
    ):
        if first is None:
            continue
        hf_ms = None if hf_first is None else hf_first * 1e3
        rows += [
            f"| b. single stream, {label} | time to first token (ms) | {first:.1f} | "
            f"{'-' if hf_ms is None else f'{hf_ms:.1f}'} | {_ratio(hf_ms, first)} |",
            f"| | decode ms/token | {per_token:.2f} | "
            f"{'-' if hf_tpot is None else f'{hf_tpot:.2f}'} | {_ratio(hf_tpot, per_token)} "
            f"(floor {per_token / floor:.2f}x) |",
        ]
    return [
        *rows,
        f"| | bandwidth floor ms/token ({bandwidth:.0f} GB/s copy) | {floor:.2f} | | |",
    ]


def bench_vision(engine, hf, args, own=None) -> list[str]:
    """The tower (and projector) alone, the engine's and transformers' passes interleaved, at
    each batch size of `--vision-batch`.

    Both towers run at the GPU's power cap, where a pass's speed depends on what ran just
    before it; alternating the two and taking each one's median keeps either from being timed
    in a cooler or hotter state than the other."""
    return [
        row for batch in args.vision_batch for row in _bench_vision_batch(engine, hf, args, batch)
    ]


def _bench_vision_batch(engine, hf, args, batch: int) -> list[str]:
    processor = engine.input_processor.image_processor
    pixels = torch.cat([processor.preprocess(im).pixel_values for im in images(batch)])
    pixels = pixels.to("cuda", torch.bfloat16)
    model = engine.core.engine_core.runner.model
    ours, theirs = [], []
    with torch.inference_mode():
        model.embed_images(pixels)
        if hf is not None:
            hf[0].get_image_features(pixel_values=pixels)
        for _ in range(args.vision_rounds):
            ours.append(timed(lambda: model.embed_images(pixels))[0])
            if hf is not None:
                theirs.append(timed(lambda: hf[0].get_image_features(pixel_values=pixels))[0])
    n = pixels.shape[0]
    mine = statistics.median(ours)
    peer, ratio = "-", "-"
    if theirs:
        median = statistics.median(theirs)
        peer = f"{n / median:.1f} ({n / max(theirs):.1f}-{n / min(theirs):.1f})"
        ratio = f"{median / mine:.2f}x"
    return [
        f"| c. vision tower, batch {n}, median of {args.vision_rounds} interleaved passes | "
        f"images/s | {n / mine:.1f} ({n / max(ours):.1f}-{n / min(ours):.1f}) | {peer} | "
        f"{ratio} |"
    ]


def bench_host_overhead(engine, hf, args, own=None) -> list[str]:
    """Per-step host time at 256 running text requests (decode steps dominate)."""
    params = SamplingParams(temperature=0, max_tokens=64, min_tokens=64)
    prompts = [f"Request {i}: describe a quiet street at night." for i in range(256)]
    engine.generate(prompts[:8], params)
    core = engine.core.engine_core
    before = dict(core.step_seconds, prepare=core.runner.prepare_seconds, steps=core.num_steps)
    wall, _ = timed(lambda: engine.generate(prompts, params))
    steps = core.num_steps - before["steps"]
    ms = {k: (core.step_seconds[k] - before[k]) / steps * 1e3 for k in core.step_seconds}
    prepare = (core.runner.prepare_seconds - before["prepare"]) / steps * 1e3
    host = ms["schedule"] + prepare + ms["update"]
    step = wall / steps * 1e3
    return [
        f"| d. 256 running requests, {steps} steps | ms per step (wall, incl. frontend) | "
        f"{step:.2f} | | |",
        f"| | host: schedule / prepare inputs / update (ms) | {ms['schedule']:.2f} / "
        f"{prepare:.2f} / {ms['update']:.2f} | | host {host / step:.0%} of the step |",
        f"| | execute: launch, and waiting for the step before (ms) | "
        f"{ms['execute'] - prepare:.2f} | | |",
    ]


def print_row_of(command: list[str], env: dict | None = None) -> None:
    """Run one benchmark process and print the table row it printed last (or its error)."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    rows = [line for line in done.stdout.splitlines() if line.startswith("|")]
    print(rows[-1] if rows else done.stderr[-3000:], flush=True)
    if done.returncode:  # reported, not hidden: the row (if any) was measured
        print(f"(that process exited with code {done.returncode})", flush=True)


def make_engine(
    path: Path,
    args,
    core_process: bool,
    async_scheduling: bool | None = None,
    quantization: str | None = None,
) -> Engine:
    # Half the GPU for the engine when transformers runs in the same process beside it.
    return Engine(
        path,
        device="cuda",
        load_format="dummy",
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        encoder_compute_budget=args.encoder_compute_budget,
        max_model_len=4096,
        gpu_memory_utilization=0.85 if args.no_transformers else 0.5,
        core_process=core_process,
        async_scheduling=async_scheduling,
        quantization=quantization,
    )


def default_args() -> argparse.Namespace:
    """This benchmark's settings at their defaults: the A/B scripts run the same workload."""
    return _parser().parse_args([])


def _sizes(text: str) -> list[int]:
    return [int(size) for size in text.split(",")]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="a,b,c,d")
    parser.add_argument("--core-process", choices=("both", "own", "in"), default="both")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument(
        "--vision-batch", type=_sizes, default="32", help="one size or a list: 8,16,32"
    )
    parser.add_argument("--vision-rounds", type=int, default=9)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--encoder-compute-budget", type=int, default=4096)
    parser.add_argument(
        "--quantization", default="none", help="engine settings to run, e.g. none,fp8"
    )
    parser.add_argument("--shape", choices=tuple(SHAPES), default="4b", help="Gemma3 size")
    parser.add_argument("--no-transformers", action="store_true", help="the engine alone")
    return parser


_HF: dict[str, object] = {}  # transformers' figures, measured with the first setting


def main() -> None:
    args = _parser().parse_args()
    settings = args.quantization.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / f"gemma3-{args.shape}-shape", **SHAPES[args.shape])
        hf = None
        rows = []
        for setting in settings:
            quantization = None if setting == "none" else setting
            own = bench_own_process(path, args, quantization) if args.core_process != "in" else {}
            engine = make_engine(path, args, core_process=False, quantization=quantization)
            if hf is None and not args.no_transformers:
                hf = hf_model(path)
            rows.append(
                f"| **engine weights: {'bf16' if quantization is None else setting}** | | | | |"
            )
            for part, bench in (
                ("a", bench_captioning),
                ("b", bench_single_stream),
                ("c", bench_vision),
                ("d", bench_host_overhead),
            ):
                if part in args.only.split(","):
                    new_rows = bench(engine, hf, args, own.get(part))
                    print("\n".join(new_rows), flush=True)
                    rows += new_rows
            engine.close()
    print(
        f"\nGemma3-{args.shape.upper()} shape, random bf16 weights, {torch.cuda.get_device_name()}"
    )
    print("| benchmark | metric | vlm_engine | transformers | engine vs transformers |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
