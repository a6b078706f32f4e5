"""Caption a folder, a glob or a list file of images into a JSONL or CSV file, resumably.

    .venv/bin/python examples/caption_images.py examples/images -o captions.jsonl
    .venv/bin/python examples/caption_images.py "photos/**/*.jpg" -o captions.csv \\
        --model ~/models/gemma-3-4b-it --prompt "Describe the image in one sentence."

The same command as `vlm-engine caption` (`--help` lists the options). From Python:

    from vlm_engine.captioning import caption_sources
    print(caption_sources(["examples/images"], "captions.jsonl", batch_size=64))
"""

import sys

from vlm_engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
