"""The README's quick-start figure: ``tiny_shapes`` served by a real tritonserver, six captions at
seed 7, each titled with whether the pixel judge (``shapes.judge``) finds its caption.

    python perf/quickstart_image.py            # writes perf/results/tiny_shapes_quickstart.png
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


from client import DiffusionClient, GenerationRequest
from testing import harness
from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY
from testing.shapes import judge, parse_caption

CAPTIONS = [
    "a red circle on a blue background", "a white circle on a green background", "a black triangle on a red background",
    "a yellow triangle on a blue background", "a blue square on a yellow background", "a yellow square on a black background",
]
SEED = 7
OUT = Path(__file__).resolve().parent / "results" / "tiny_shapes_quickstart.png"


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as tmp:
        server = harness.serve(["tiny_shapes"], DEFAULT_MODEL_REPOSITORY, log_path=Path(tmp) / "server.log")
        try:
            with DiffusionClient(f"grpc://{server.grpc_url}", "tiny_shapes") as client:
                results = client.generate_many([GenerationRequest(c, seed=SEED) for c in CAPTIONS], concurrency=len(CAPTIONS))
        finally:
            server.stop()
    figure, axes = plt.subplots(1, len(CAPTIONS), figsize=(2 * len(CAPTIONS), 2.9))
    for axis, caption, result in zip(axes, CAPTIONS, results):
        right = judge(result.array) == parse_caption(caption)
        axis.imshow(result.array)
        axis.set_title(caption.replace(" on ", "\non ") + f"\n(judged {'right' if right else 'WRONG'})", fontsize=9)
        axis.axis("off")
    figure.suptitle(f"tiny_shapes served by Triton (seed {SEED}, 64x64, 20 steps)")
    figure.tight_layout(rect=(0, 0, 1, 0.92))  # room for the title above the captions
    figure.savefig(OUT, dpi=100)
    print(f"wrote {OUT}; judged right: {sum(judge(r.array) == parse_caption(c) for c, r in zip(CAPTIONS, results))}/{len(CAPTIONS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
