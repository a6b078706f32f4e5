"""`vlm-engine serve`'s command line: the server's options and the engine's.

Only argparse here, so that `vlm-engine --help` stays fast; `server/main.py` runs the server.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from vlm_engine import envs
from vlm_engine.quant_config import QUANTIZATIONS

DESCRIPTION = """\
Serve the OpenAI API (chat completions with images, completions, models) over one engine:
any OpenAI client can use it, with base_url http://HOST:PORT/v1. Also GET /health (503 once the
engine is dead) and GET /metrics (Prometheus text format). It binds to 127.0.0.1, reachable
from this machine only, unless --host says otherwise. SIGTERM or Ctrl-C stops accepting
requests, lets running ones finish for --shutdown-grace seconds, then exits."""

EPILOG = f"""\
examples:
  vlm-engine serve                                          the demo model on 127.0.0.1:8000
  vlm-engine serve --model ~/models/gemma-3-4b-it --max-model-len 8192 --api-key sk-local
  {envs.API_KEY_VARIABLE}=sk-local vlm-engine serve --host 0.0.0.0 --allowed-local-media-path /data

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
  client.chat.completions.create(model=client.models.list().data[0].id, messages=[...])"""


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument(
        "--host", default="127.0.0.1",
        help="address to bind (default: %(default)s, this machine only; 0.0.0.0 for every "
        "interface)",
    )  # fmt: skip
    server.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    server.add_argument(
        "--api-key", default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${envs.API_KEY_VARIABLE} "
        "if set, else no key)",
    )  # fmt: skip
    server.add_argument(
        "--served-model-name", default=None,
        help="the model name clients send and /v1/models lists (default: the checkpoint "
        "folder's name)",
    )  # fmt: skip
    server.add_argument(
        "--allowed-local-media-path", type=Path, default=None, metavar="DIR",
        help="allow file:// image URLs inside DIR (links and .. resolved; nothing outside it); "
        "without it file:// URLs are refused",
    )  # fmt: skip
    server.add_argument(
        "--allow-remote-media", action="store_true",
        help="fetch http(s):// image URLs (off by default: the server would fetch whatever a "
        "client names)",
    )  # fmt: skip
    server.add_argument(
        "--remote-media-timeout", type=float, default=10.0, metavar="SECONDS",
        help="time limit of one image fetch (default: %(default)s)",
    )  # fmt: skip
    server.add_argument(
        "--remote-media-max-bytes", type=int, default=32 * 2**20, metavar="N",
        help="largest image fetched (default: 32 MiB)",
    )  # fmt: skip
    server.add_argument(
        "--max-request-bytes", type=int, default=32 * 2**20, metavar="N",
        help="larger request bodies get a 413 (default: 32 MiB)",
    )  # fmt: skip
    server.add_argument(
        "--max-waiting", type=int, default=None, metavar="N",
        help="new requests get a 503 with Retry-After while N requests wait for the engine "
        "(default: no limit)",
    )  # fmt: skip
    server.add_argument(
        "--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
        help="how long running requests may take after SIGTERM (default: %(default)s)",
    )  # fmt: skip
    server.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
        help="server log level (default: %(default)s)",
    )  # fmt: skip
    add_engine_options(parser)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--model", metavar="DIR",
        help="HF Gemma3 checkpoint directory (default: the built-in demo model)",
    )  # fmt: skip
    engine.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    engine.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="weights and activations (default: auto, bfloat16 on a GPU, float32 on a CPU)",
    )  # fmt: skip
    engine.add_argument(
        "--quantization", choices=QUANTIZATIONS, default=None,
        help="fp8: quantize the decoder's projections to FP8 at load; fp8-all: the vision tower's "
        "linear layers too (an FP8 checkpoint is FP8 already)",
    )  # fmt: skip
    ints = {
        "max_num_seqs": "most requests running at once (default: 64)",
        "max_num_batched_tokens": "token budget of one step (default: 2048)",
        "max_model_len": "longest prompt + output (default: the model's, at most 8192)",
        "num_kv_blocks": "KV-cache blocks (default: from memory)",
        "encoder_cache_size": "image embeddings kept on the device (default: 16384)",
        "encoder_compute_budget": "image embeddings the tower may compute per step (default: 4096)",
        "processor_cache_bytes": "preprocessed pixels kept in memory; 0 disables "
        "(default: 512 MiB)",
        "max_image_pixels": "larger images are rejected (default: 64 Mi pixels)",
        "max_images_per_prompt": "more images per prompt are rejected (default: no limit)",
        "seed": "seed of unseeded sampling (default: fresh entropy)",
    }
    for name, text in ints.items():
        engine.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=text)
    engine.add_argument(
        "--kv-cache-memory-gb", type=float, default=None,
        help="KV-cache size (default: profiled on a GPU, 0.25 on a CPU)",
    )  # fmt: skip
    engine.add_argument(
        "--gpu-memory-utilization", type=float, default=None,
        help="share of the GPU the engine may use (default: 0.9)",
    )  # fmt: skip
    engine.add_argument(
        "--ec-connector", default=None, metavar="SPEC",
        help="persistent encoder cache: disk:/path[?size_gb=N] or redis://host:port/db",
    )  # fmt: skip
    engine.add_argument(
        "--scheduling-policy", choices=("fcfs", "priority"), default=None,
        help="order of waiting requests (default: fcfs)",
    )  # fmt: skip
    engine.add_argument(
        "--core-process", choices=("auto", "on", "off"), default="auto",
        help="the engine core in its own process (default: auto, on a GPU only)",
    )  # fmt: skip
    engine.add_argument(
        "--no-prefix-caching", action="store_true", help="turn the prefix cache off"
    )
    engine.add_argument("--no-cuda-graphs", action="store_true", help="run every step eagerly")
    engine.add_argument(
        "--pan-and-scan", action="store_true",
        help="crop wide and tall images into extra views (processor option do_pan_and_scan)",
    )  # fmt: skip
    engine.add_argument(
        "--processor-option", action="append", default=[], metavar="NAME=JSON",
        help="an image processor setting, e.g. pan_and_scan_min_crop_size=128 (repeatable)",
    )  # fmt: skip
    engine.add_argument(
        "--load-format", choices=("safetensors", "dummy"), default=None,
        help="dummy: random weights of the checkpoint's shapes (benchmarks)",
    )  # fmt: skip


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `Engine` options the command line sets; the rest keep the engine's defaults."""
    names = (
        "device", "dtype", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
        "num_kv_blocks", "encoder_cache_size", "encoder_compute_budget", "processor_cache_bytes",
        "max_image_pixels", "max_images_per_prompt", "seed", "kv_cache_memory_gb",
        "gpu_memory_utilization", "ec_connector", "scheduling_policy", "load_format",
        "quantization",
    )  # fmt: skip
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    options["core_process"] = {"auto": None, "on": True, "off": False}[args.core_process]
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    if args.no_cuda_graphs:
        options["use_cuda_graphs"] = False
    processor = dict(_processor_option(text) for text in args.processor_option)
    if args.pan_and_scan:
        processor["do_pan_and_scan"] = True
    if processor:
        options["processor_options"] = processor
    return options


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get(envs.API_KEY_VARIABLE) or None


def _processor_option(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--processor-option takes NAME=JSON, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value  # a bare string
