"""Write the input-data files shipped for plain ``perf_analyzer`` runs (README, Benchmarks).

Each entry is one request: a VBench prompt and its own seed; image-to-image entries add a source
image (base64 UINT8 with its shape) and a strength. Everything else is left to the model's
defaults, and since all entries send the same set of inputs, Triton may batch any of them
together (requests with different sets of optional inputs never share a batch).

The output of an image-to-image request takes its source's size, so the source must be a size
the model serves: the shipped file has 64x64 sources (every tiny CPU model); a larger model
needs its own file (``--source-side 512`` writes ``image_to_image_512.json``).

    python perf/perf_analyzer_inputs.py                     # rewrites perf/inputs/*.json
    python perf/perf_analyzer_inputs.py --source-side 512   # perf/inputs/image_to_image_512.json only
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np


from perf.prompts import prompt_at, vbench_prompts

OUT = Path(__file__).resolve().parent / "inputs"
TEXT_TO_IMAGE_ENTRIES, IMAGE_TO_IMAGE_ENTRIES, SOURCE_SIDE = 64, 8, 64


def source_image(index: int, side: int = SOURCE_SIDE) -> np.ndarray:
    """A smooth colour field (not noise: image-to-image of noise is not a realistic input)."""
    rows, cols = np.mgrid[0:side, 0:side] / side
    phase = index / IMAGE_TO_IMAGE_ENTRIES
    channels = [np.sin(2 * np.pi * (rows + phase)), np.cos(2 * np.pi * (cols - phase)), np.sin(2 * np.pi * (rows + cols))]
    return ((np.stack(channels, axis=-1) + 1) * 127.5).astype(np.uint8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-side", type=int, default=SOURCE_SIDE, help="side of the image-to-image sources")
    side = parser.parse_args(argv).source_side
    prompts = vbench_prompts()
    text_to_image = [{"PROMPT": [prompt_at(prompts, i)], "SEED": [1000 + i]} for i in range(TEXT_TO_IMAGE_ENTRIES)]
    image_to_image = [
        {
            "PROMPT": [prompts[(11 * i + 3) % len(prompts)]], "SEED": [2000 + i], "STRENGTH": [0.6],
            "IMAGE": {"b64": base64.b64encode(source_image(i, side).tobytes()).decode(), "shape": [side, side, 3]},
        }
        for i in range(IMAGE_TO_IMAGE_ENTRIES)
    ]
    OUT.mkdir(exist_ok=True)
    files = [("text_to_image", text_to_image), ("image_to_image", image_to_image)]
    if side != SOURCE_SIDE:
        files = [(f"image_to_image_{side}", image_to_image)]
    for name, entries in files:
        path = OUT / f"{name}.json"
        path.write_text(json.dumps({"data": entries}, indent=0) + "\n")
        print(f"{path}: {len(entries)} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
