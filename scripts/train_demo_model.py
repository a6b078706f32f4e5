"""Train the built-in demo model on a CPU and write it where the package ships it.

    .venv/bin/python scripts/train_demo_model.py [--out DIR] [--steps N] [--threads 2]

The shipped model is made in two stages (vlm_engine/demo/training.py says why):

    .venv/bin/python scripts/train_demo_model.py --out /tmp/captions            # 2500 steps
    .venv/bin/python scripts/train_demo_model.py --start-from /tmp/captions \
        --json-share 0.5 --steps 600 --learning-rate 5e-4

Prints the loss as it goes, the training wall time, and the held-out accuracy through the
engine (greedy, default options: every cache on) of the captions and of the JSON answers, those
held to the demo schema by structured outputs and those written freely.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vlm_engine import Engine
from vlm_engine.demo.evaluation import (
    caption_images,
    held_out_examples,
    json_answers,
    score_captions,
    score_json,
)
from vlm_engine.demo.training import TrainingConfig, TrainingLog, train_demo_model

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "vlm_engine" / "assets" / "demo_model"


def print_log(log: TrainingLog) -> None:
    print(
        f"step {log.step:5d}  loss {log.loss:.4f}  lr {log.learning_rate:.2e}  {log.seconds:6.1f}s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    defaults = TrainingConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    parser.add_argument("--steps", type=int, default=defaults.num_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument(
        "--json-share", type=float, default=defaults.json_share,
        help="share of the batches answered in JSON (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--start-from", type=Path, default=None, metavar="DIR",
        help="start from this checkpoint's weights instead of a fresh initialization",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--eval-images", type=int, default=200, help="0 skips the evaluation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TrainingConfig(
        num_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        json_share=args.json_share,
        seed=args.seed,
        log_every=max(1, min(defaults.log_every, args.steps // 10)),
    )
    start = time.perf_counter()
    result = train_demo_model(args.out, config, on_log=print_log, start_from=args.start_from)
    size_mb = (result.path / "model.safetensors").stat().st_size / 1e6
    print(
        f"trained {result.num_parameters / 1e6:.2f}M parameters for {result.num_steps} steps "
        f"in {result.seconds / 60:.1f} min (total with set-up and saving: "
        f"{(time.perf_counter() - start) / 60:.1f} min); final loss {result.final_loss:.4f}; "
        f"wrote {result.path} (model.safetensors {size_mb:.1f} MB)"
    )
    if args.eval_images:
        examples = held_out_examples(args.eval_images)
        engine = Engine(result.path)
        captions = caption_images(engine, [image for image, _ in examples])
        score = score_captions([scene for _, scene in examples], captions)
        print("held-out accuracy through the engine:", score.summary())
        for expected, got in score.mistakes[:10]:
            print(f"  expected {expected!r}, got {got!r}")
        scenes, images = [scene for _, scene in examples], [image for image, _ in examples]
        for constrained in (True, False):
            score = score_json(scenes, json_answers(engine, images, constrained))
            how = "structured outputs" if constrained else "unconstrained"
            print(f"held-out JSON answers ({how}):", score.summary())
            for expected, got in score.mistakes[:5]:
                print(f"  expected {expected!r}, got {got!r}")


if __name__ == "__main__":
    main()
