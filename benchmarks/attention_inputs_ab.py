"""A/B of the attention-input kernel on a GPU: q/k norms, rotary and KV store fused into one
launch per layer, against the three separate kernels, in one process.

    python benchmarks/attention_inputs_ab.py [--rounds 4]

Engines on the Gemma3-4B shape (random bf16 weights, in-process core, CUDA graphs) are built
alternately with each path; each round measures time to first token for cold images (128-token
outputs) and for text-only prompts of ~300 tokens, and decode ms/token. Prints each round and the
medians of the round medians.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_runtime import GEMMA3_4B, PROMPT, images  # noqa: E402

import vlm_engine.models.gemma3 as gemma3  # noqa: E402
from vlm_engine import Engine, SamplingParams  # noqa: E402
from vlm_engine.kernels.attention_inputs import norm_rope_store  # noqa: E402
from vlm_engine.kernels.kv_store import store_kv  # noqa: E402
from vlm_engine.kernels.norm import rms_norm  # noqa: E402
from vlm_engine.testing import make_tiny_checkpoint  # noqa: E402

TEXT = "Describe a quiet street at night with details. " * 27


def separate_kernels(q, k, v, q_weight, k_weight, eps, rotary, kv_cache=None, slot_mapping=None):
    q, k = rotary.apply(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps))
    if kv_cache is not None:
        store_kv(k, v, kv_cache, slot_mapping)
    return q, k


def measure(path: Path, pictures: list) -> tuple[float, float, float]:
    engine = Engine(path, device="cuda", load_format="dummy", max_num_seqs=8,
                    max_model_len=4096, kv_cache_memory_gb=4, core_process=False)  # fmt: skip
    full = SamplingParams(temperature=0, max_tokens=128, min_tokens=128)
    one = SamplingParams(temperature=0, max_tokens=1)
    engine.generate({"prompt": PROMPT, "images": [pictures[0]]}, full)  # warm-up
    engine.generate(f"warm-up {TEXT}", one)
    runs = [engine.generate({"prompt": PROMPT, "images": [p]}, full)[0] for p in pictures[1:]]
    text = [engine.generate(f"{i} {TEXT}", one)[0].time_to_first_token for i in range(10)]
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return (
        statistics.median(o.time_to_first_token for o in runs) * 1e3,
        statistics.median(text) * 1e3,
        statistics.median(o.time_per_output_token for o in runs) * 1e3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "gemma3-4b-shape", **GEMMA3_4B)
    paths = {"fused": norm_rope_store, "separate": separate_kernels}
    results: dict[str, list] = {name: [] for name in paths}
    for round_ in range(args.rounds):
        for name, fn in paths.items():
            gemma3.norm_rope_store = fn  # what each attention layer calls
            row = measure(path, images(5, seed=100 * round_ + len(results[name])))
            results[name].append(row)
            print(f"round {round_} {name}: image TTFT {row[0]:.1f} ms, text TTFT {row[1]:.1f} "
                  f"ms, decode {row[2]:.3f} ms/token", flush=True)  # fmt: skip
    print("| path | TTFT image (ms) | TTFT text (ms) | decode ms/token |")
    print("|---|---:|---:|---:|")
    for name, rows in results.items():
        medians = [statistics.median(r[i] for r in rows) for i in range(3)]
        print(f"| {name} | {medians[0]:.1f} | {medians[1]:.1f} | {medians[2]:.3f} |")


if __name__ == "__main__":
    main()
