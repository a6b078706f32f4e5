"""The Gradio demo app: ask about an image and watch the answer stream in, token by token.

`launch(...)` serves it (what `vlm-engine demo` and `apps/gradio_app.py` run); `build_app(engine)`
builds the page around an `AsyncEngine`. Gradio (the `app` extra) is imported inside functions
only, so `vlm_engine` imports without it.

Every engine call goes through the `AsyncEngine`, which runs them one at a time on its engine
thread: the answers of concurrent users are batched together, and the `Engine` never sees two
threads. Nothing reaches the network: no analytics, no share link, no server-side rendering
(the default theme's fonts are served locally).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_engine import AsyncEngine, EngineDeadError, InvalidInputError, SamplingParams
from vlm_engine.demo.model import DEMO_PROMPT, default_model_path, demo_request

# The sample pictures of the repository (absent when the package is installed on its own).
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples" / "images"
DEFAULT_MAX_TOKENS = 64
MAX_CONCURRENT_ANSWERS = 16  # answers streamed at once; the engine batches them


def launch(
    model: str | None,
    host: str,
    port: int,
    device: str | None,
    dtype: str,
    quantization: str | None = None,
) -> None:
    """Load the model (None: the built-in demo model) and serve the app on host:port until
    interrupted. Without gradio it raises ModuleNotFoundError before loading anything."""
    import gradio  # noqa: F401

    path = Path(model) if model is not None else default_model_path()
    engine = AsyncEngine(path, device=device, dtype=dtype, quantization=quantization)
    app = build_app(engine, title=f"vlm_engine: {path.name}")
    try:  # blocks until Ctrl-C
        app.launch(
            server_name=host,
            server_port=port,
            share=False,
            ssr_mode=False,
            mcp_server=False,
            pwa=False,
            inbrowser=False,
            allowed_paths=[str(EXAMPLES_DIR)] if EXAMPLES_DIR.is_dir() else None,
        )
    finally:
        engine.shutdown()  # and its core process, if it has one


def build_app(engine: AsyncEngine, title: str = "vlm_engine demo") -> Any:
    """The page (a `gr.Blocks`): image, question, sampling controls, streamed answer, and the
    engine's cache statistics, refreshed after each answer."""
    import gradio as gr

    async def answer(image, question, max_tokens, temperature, top_p, top_k, seed):
        # Inputs arrive unprocessed (preprocess=False): the image is Gradio's upload record, so
        # a bad file reaches the engine and comes back as the engine's typed error.
        if image is None:
            raise gr.Error("Upload an image or pick a sample first.")
        try:
            params = SamplingParams(
                max_tokens=int(max_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
                top_k=int(top_k),
                seed=None if seed is None else int(seed),
            )
            text = ""
            async for delta in engine.generate(demo_request(image["path"], question), params):
                text += delta.text
                yield text
        except (InvalidInputError, EngineDeadError) as e:
            raise gr.Error(f"{type(e).__name__}: {e}") from e

    async def refresh_stats():
        return stats_markdown(await engine.stats())

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nUpload a picture (or pick a sample), ask, and watch the answer.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    label="Image", type="filepath", sources=["upload", "clipboard"], elem_id="image"
                )
                question = gr.Textbox(DEMO_PROMPT, label="Question", elem_id="question")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                sampling = _sampling_controls(gr)
                if EXAMPLES_DIR.is_dir():
                    samples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.png"))
                    gr.Examples(
                        [[p] for p in samples], inputs=image, label="Samples", elem_id="samples"
                    )
            with gr.Column():
                output = gr.Textbox(label="Answer", lines=3, interactive=False, elem_id="answer")
                stats = gr.Markdown(elem_id="stats")
        answered = gr.on(
            [ask.click, question.submit],
            answer,
            inputs=[image, question, *sampling],
            outputs=output,
            preprocess=False,
            concurrency_limit=MAX_CONCURRENT_ANSWERS,
        )
        answered.then(refresh_stats, outputs=stats)
        # Gradio 6's page runs a plain `then` only after success; rejected requests count too.
        answered.failure(refresh_stats, outputs=stats)
        app.load(refresh_stats, outputs=stats)
    return app


def _sampling_controls(gr: Any) -> list[Any]:
    with gr.Accordion("Sampling", open=False):
        return [
            gr.Slider(1, 1024, value=DEFAULT_MAX_TOKENS, step=1, label="Max tokens"),
            gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)"),
            gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p"),
            gr.Slider(0, 200, value=0, step=1, label="Top-k (0: off)"),
            gr.Number(None, precision=0, label="Seed (empty: random)"),
        ]


def stats_markdown(stats: dict[str, Any]) -> str:
    """`Engine.stats()` as a Markdown table of hits and misses per cache layer, then the KV cache
    and request counters."""
    connector = stats["ec_connector"]
    prefix = stats["prefix_cache"]
    rows = [
        ("processor cache", stats["processor_cache"]),
        ("encoder cache", stats["encoder_cache"]),
        ("ec connector", connector if connector.get("enabled", True) else None),
        ("prefix cache (tokens)", prefix),
    ]
    lines = ["| cache layer | hits | misses |", "|---|---:|---:|"]
    for name, layer in rows:
        hits, misses = ("off", "off") if layer is None else (layer["hits"], layer["misses"])
        lines.append(f"| {name} | {hits} | {misses} |")
    kv, requests = stats["kv_cache"], stats["requests"]
    lines += [
        "",
        f"KV cache: {kv['usage']:.1%} in use, {kv['num_free_blocks']} of {kv['num_blocks']} "
        f"blocks free ({kv['block_size']} tokens each)",
        "",
        f"Requests: {requests['finished']} answered, {requests['rejected']} rejected, "
        f"{requests['generated_tokens']} tokens generated",
    ]
    return "\n".join(lines)
