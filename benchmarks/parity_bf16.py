"""How far bfloat16 greedy outputs agree with a float32 reference, for the engine and for
transformers, on the same checkpoint and prompts (the engine parity workload: 18 mixed requests).

For each side in bfloat16: logits of the first output token against transformers float32
(relative error), and where its greedy tokens first leave the float32 reference's. The engine
in float32 must agree exactly.

    python benchmarks/parity_bf16.py [--model-size small] [--output-len 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from test_engine_parity import NUM_IMAGES, SPECS, random_image  # noqa: E402
from transformers import AutoProcessor, Gemma3ForConditionalGeneration  # noqa: E402

from vlm_engine import Engine, SamplingParams  # noqa: E402
from vlm_engine.testing import make_tiny_checkpoint  # noqa: E402

SIZES = {"tiny": {}, "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                   query_pre_attn_scalar=32, sliding_window=64)}  # fmt: skip


def transformers_run(path, images, dtype, output_len):
    model = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=dtype).cuda().eval()
    processor = AutoProcessor.from_pretrained(path, backend="pil")
    tokens, first_logits = [], []
    for text, ids, _ in SPECS:
        inputs = processor(
            text=text, images=[images[i] for i in ids] or None, return_tensors="pt"
        ).to("cuda")
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
        tokens.append(out.sequences[0, inputs["input_ids"].shape[1] :].tolist())
        first_logits.append(out.logits[0][0].float().cpu())
    return tokens, first_logits


def engine_run(path, images, dtype, output_len):
    engine = Engine(path, device="cuda", dtype=dtype)
    prompts = [{"prompt": text, "images": [images[i] for i in ids]} for text, ids, _ in SPECS]
    params = SamplingParams(temperature=0, max_tokens=output_len, min_tokens=output_len)
    return [o.token_ids for o in engine.generate(prompts, params)]


def first_divergence(tokens, reference) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), None)


def summarize(name, tokens, reference) -> str:
    firsts = [first_divergence(t, r) for t, r in zip(tokens, reference, strict=True)]
    diverged = [f for f in firsts if f is not None]
    agree = len(firsts) - len(diverged)
    where = (
        f"median first divergence at token {statistics.median(diverged):.0f}" if diverged else ""
    )
    return f"| {name} | {agree}/{len(firsts)} | {sorted(diverged)} | {where} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    images = [random_image(100 + i) for i in range(NUM_IMAGES)]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "m", seed=1, **SIZES[args.model_size])
        ref_tokens, ref_logits = transformers_run(path, images, torch.float32, args.output_len)
        hf_tokens, hf_logits = transformers_run(path, images, torch.bfloat16, args.output_len)
        ours32 = engine_run(path, images, "float32", args.output_len)
        ours16 = engine_run(path, images, "bfloat16", args.output_len)
    rel = [
        float((h - r).abs().max() / r.abs().max())
        for h, r in zip(hf_logits, ref_logits, strict=True)
    ]
    print(
        f"model {args.model_size}, {len(SPECS)} requests x {args.output_len} greedy tokens; "
        f"reference: transformers float32 on {torch.cuda.get_device_name()}"
    )
    print(f"transformers bf16 first-token logits vs float32: max rel err {max(rel):.4f}")
    print(
        "| side | requests identical to the float32 reference | first divergent token index "
        "of the others | |"
    )
    print("|---|---:|---|---|")
    print(summarize("vlm_engine float32", ours32, ref_tokens))
    print(summarize("vlm_engine bfloat16", ours16, ref_tokens))
    print(summarize("transformers bfloat16", hf_tokens, ref_tokens))


if __name__ == "__main__":
    main()
