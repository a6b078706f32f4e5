"""Structured outputs on a GPU: what holding outputs to a JSON schema costs, beside the same
requests unconstrained, with transformers + xgrammar's logits processor measured in the same run.

Model: the Gemma3-4B shape with random bf16 weights. Its tokenizer is widened to Gemma's
262,144 tokens (a synthetic vocabulary: words with and without the word-start mark, capitalized
words, other scripts, punctuation runs, whitespace), since xgrammar's work per step grows with
the vocabulary.

  a. decode throughput: --batch requests (64) decode --output-len tokens (128) each, all running
     together: unconstrained (ignore_eos), under a JSON schema whose array cannot end before the
     length limit (so every request decodes exactly --output-len tokens through keys, enums,
     integers, strings and booleans), and half of each; with async scheduling (the GPU default)
     and without; transformers `generate` at the same batch, with and without xgrammar's
     `LogitsProcessor`;
  b. time to first token of one request: unconstrained, with a schema compiled before, with a
     new schema (compiled while the request waits), and the first constrained request of the
     engine (the vocabulary's xgrammar tables are built then).

Each workload runs once to warm up, then --repeats times (3), the workloads taking turns so that
drift touches them alike; the table gives the median and the range.

    python benchmarks/structured_outputs.py [--batch 64] [--output-len 128] [--repeats 3]
                                            [--no-transformers]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from gpu_runtime import GEMMA3_4B  # noqa: E402

from vlm_engine import Engine, SamplingParams  # noqa: E402
from vlm_engine.testing import make_tiny_checkpoint  # noqa: E402

GEMMA_VOCAB = 262_144
PROMPT = "Describe the objects in the scene as JSON. Request {i}."
ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "color": {"enum": ["red", "green", "blue", "yellow", "purple", "white"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        "visible": {"type": "boolean"},
        "position": {"enum": ["left", "center", "right"]},
    },
    "required": ["name", "color", "count", "visible", "position"],
}


def long_schema(tag: str = "objects") -> dict:
    """An object holding an array that cannot close within the benchmark's output length."""
    array = {"type": "array", "items": ITEM, "minItems": 10_000}
    return {"type": "object", "properties": {tag: array}, "required": [tag]}


def widen_vocabulary(checkpoint: Path, size: int, seed: int = 0) -> None:
    """Grow the checkpoint's BPE vocabulary to `size` tokens with synthetic pieces (no merges:
    prompts still encode through the original pieces; what changes is what may be sampled)."""
    path = checkpoint / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    scripts = [(0x430, 0x44F), (0x4E00, 0x9FFF), (0x627, 0x64A), (0x3B1, 0x3C9), (0xAC00, 0xD7A3)]
    punctuation = "{}[]():;,.\"'!?-_/\\*&#@%$+=<>|~`"

    def piece() -> str:
        kind = rng.random()
        mark = "▁" if rng.random() < 0.5 else ""
        if kind < 0.55:
            return mark + "".join(rng.choices(letters, k=rng.randint(2, 12)))
        if kind < 0.65:
            word = "".join(rng.choices(letters, k=rng.randint(2, 10)))
            return "▁" + word.capitalize()
        if kind < 0.80:
            low, high = rng.choice(scripts)
            return mark + "".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 4)))
        if kind < 0.90:
            return mark + "".join(rng.choices(punctuation, k=rng.randint(1, 4)))
        if kind < 0.93:
            return rng.choice(["▁", "\n", "\t", " "]) * rng.randint(2, 31)
        return rng.choice(punctuation) + "".join(rng.choices(letters, k=rng.randint(1, 8)))

    next_id = max(vocab.values()) + 1
    taken = set(vocab) | {t["content"] for t in spec.get("added_tokens", [])}
    while next_id < size:
        text = piece()
        if text not in taken:
            taken.add(text)
            vocab[text] = next_id
            next_id += 1
    path.write_text(json.dumps(spec, ensure_ascii=False))


def make_engine(path: Path, async_scheduling: bool, batch: int) -> Engine:
    return Engine(
        path, device="cuda", load_format="dummy", max_model_len=2048,
        max_num_seqs=max(batch, 64), gpu_memory_utilization=0.45,
        async_scheduling=async_scheduling,
    )  # fmt: skip


def throughput(engine: Engine, args, share: float, warm_up: bool = False) -> tuple[float, float]:
    """Output tokens/s of `args.batch` requests of `args.output_len` tokens, `share` of them
    under the long schema; and the host's bitmask time per step (ms)."""
    n = args.batch
    constrained = set(range(0, n, round(1 / share))) if share else set()  # 1.0: all, 0.5: even
    free = SamplingParams(
        temperature=0, max_tokens=args.output_len, min_tokens=args.output_len, ignore_eos=True
    )
    held = SamplingParams(
        temperature=0, max_tokens=args.output_len, structured_outputs={"json": long_schema()}
    )
    prompts = [PROMPT.format(i=i) for i in range(n)]
    params = [held if i in constrained else free for i in range(n)]
    if warm_up:  # Triton compiles kernel variants the first time a shape changes (and the
        engine.generate(prompts, params)  # grammar is compiled once)
        return 0.0, 0.0
    before = engine.stats()
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    after = engine.stats()
    for out in outputs:
        assert len(out.token_ids) == args.output_len, (out.finish_reason, out.text[:200])
    for i in constrained:
        assert outputs[i].text.startswith('{"objects": [{"name": "'), outputs[i].text[:80]
    steps = after["scheduler"]["num_steps"] - before["scheduler"]["num_steps"]
    mask_s = (
        after["structured_outputs"]["bitmask_seconds"]
        - before["structured_outputs"]["bitmask_seconds"]
    )
    return n * args.output_len / seconds, mask_s / max(steps, 1) * 1e3


def ttft_ms(engine: Engine, params: SamplingParams, prompt: str) -> float:
    (out,) = engine.generate(prompt, params)
    return out.time_to_first_token * 1e3


def bench_ttft(engine: Engine) -> list[tuple[str, float]]:
    base = dict(temperature=0, max_tokens=8)
    rows = []
    first = SamplingParams(**base, structured_outputs={"json": long_schema("first")})
    rows.append(("first constrained request of the engine", ttft_ms(engine, first, "warm 0")))
    free = [ttft_ms(engine, SamplingParams(**base), f"free {i}") for i in range(5)]
    seen = SamplingParams(**base, structured_outputs={"json": long_schema("seen")})
    ttft_ms(engine, seen, "compile it")
    seen_ms = [ttft_ms(engine, seen, f"seen {i}") for i in range(5)]
    new_ms = [
        ttft_ms(
            engine,
            SamplingParams(**base, structured_outputs={"json": long_schema(f"new{i}")}),
            f"new {i}",
        )
        for i in range(5)
    ]
    rows += [
        ("unconstrained", statistics.median(free)),
        ("schema compiled before", statistics.median(seen_ms)),
        ("new schema (compiled while it waits)", statistics.median(new_ms)),
    ]
    return rows


def bench_transformers(path: Path, args) -> tuple[float, float]:
    import xgrammar
    from transformers import AutoConfig, AutoTokenizer, Gemma3ForConditionalGeneration
    from xgrammar.contrib.hf import LogitsProcessor

    config = AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    info = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=config.text_config.vocab_size
    )
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(
        json.dumps(long_schema()), any_whitespace=False
    )
    prompts = [PROMPT.format(i=i) for i in range(args.batch)]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")

    def run(constrained: bool) -> float:
        extra = {"logits_processor": [LogitsProcessor(compiled)]} if constrained else {}
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=args.output_len, do_sample=False,
                **({} if constrained else {"min_new_tokens": args.output_len}), **extra,
            )  # fmt: skip
        torch.cuda.synchronize()
        assert out.shape[1] - inputs["input_ids"].shape[1] == args.output_len
        return args.batch * args.output_len / (time.perf_counter() - start)

    run(False)  # warm-up
    return run(False), run(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per workload")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-sync", action="store_true", help="skip async_scheduling=False")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "gemma3-4b-shape", **GEMMA3_4B)
        widen_vocabulary(path, GEMMA_VOCAB)
        # (setting, workload, tokens/s per repeat, mask ms per repeat)
        rows: list[tuple[str, str, list[float], list[float]]] = []
        ttft: list[tuple[str, float]] = []
        workloads = (("unconstrained", 0.0), ("JSON schema", 1.0), ("half", 0.5))
        for overlapped in (True, False) if not args.no_sync else (True,):
            setting = "async scheduling" if overlapped else "one step at a time"
            with make_engine(path, overlapped, args.batch) as engine:
                if overlapped:
                    ttft = bench_ttft(engine)
                for _, share in workloads:
                    throughput(engine, args, share, warm_up=True)
                runs = {name: ([], []) for name, _ in workloads}
                for _ in range(args.repeats):
                    for name, share in workloads:
                        rate, mask_ms = throughput(engine, args, share)
                        runs[name][0].append(rate)
                        runs[name][1].append(mask_ms)
                        print((setting, name, round(rate), round(mask_ms, 3)), flush=True)
                rows += [(setting, name, *runs[name]) for name, _ in workloads]
        hf = None if args.no_transformers else bench_transformers(path, args)
    device = torch.cuda.get_device_name()
    print(f"\nGemma3-4B shape, random bf16 weights, {GEMMA_VOCAB} tokens, {device}")
    print(f"a. decode: {args.batch} requests x {args.output_len} tokens, all running together")
    print(f"median of {args.repeats} runs (range)")
    print("| engine | workload | output tokens/s | vs unconstrained | bitmask ms/step (host) |")
    print("|---|---|---:|---:|---:|")
    for setting, name, rates, masks in rows:
        base = next(statistics.median(r[2]) for r in rows if r[:2] == (setting, "unconstrained"))
        rate = statistics.median(rates)
        print(
            f"| vlm_engine, {setting} | {name} | {rate:.0f} ({min(rates):.0f}-{max(rates):.0f}) "
            f"| {rate / base:.3f}x | {statistics.median(masks):.2f} |"
        )
    if hf is not None:
        print(f"| transformers | unconstrained | {hf[0]:.0f} | 1.000x | |")
        print(f"| transformers + xgrammar LogitsProcessor | JSON schema | {hf[1]:.0f} | "
              f"{hf[1] / hf[0]:.3f}x | |")  # fmt: skip
    print("\nb. time to first token, one request (median of 5)")
    print("| request | ms |")
    print("|---|---:|")
    for name, ms in ttft:
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
