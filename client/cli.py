"""``tdiff``: generate images, check health, read batching statistics, from the command line.

    tdiff generate "a lighthouse at dusk" "a red fox" --n 4 --seed 1 --out images/
    tdiff generate --prompts-file prompts.txt --concurrency 16 --size 128x128
    tdiff health
    tdiff stats
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
import urllib.request
from pathlib import Path

from .aio import AsyncDiffusionClient
from .api import DEFAULT_MODEL, GenerationRequest, ServerError, _split_url, as_json


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")[:limit].lower() or "image"


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


def _requests(args) -> list[GenerationRequest]:
    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("give prompts as arguments or with --prompts-file")
    height = width = None
    if args.size:
        height, _, width = args.size.lower().partition("x")
        height, width = int(height), int(width or height)
    init_image = None
    if args.init_image:
        from PIL import Image

        init_image = Image.open(args.init_image).convert("RGB")
    requests = []
    for index, (prompt, copy) in enumerate((p, c) for p in prompts for c in range(args.n)):
        requests.append(GenerationRequest(
            prompt, negative_prompt=args.negative, seed=None if args.seed is None else args.seed + index,
            steps=args.steps, guidance_scale=args.guidance, height=height, width=width,
            init_image=init_image, strength=args.strength, num_frames=args.frames, priority=args.priority,
        ))
    return requests


def _save(result, index: int, out: Path, model: str, video_format: str = "mp4", fps: int = 16) -> Path:
    from PIL.PngImagePlugin import PngInfo

    request = result.request
    stem = f"{index:04d}-{_slug(request.prompt)}-seed{result.seed}"
    if result.is_video:
        path = out / f"{stem}.{video_format}"
        result.save_video(path, fps)
        return path
    info = PngInfo()
    for key, value in {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt or "", "seed": result.seed,
        "model": model, "steps": request.steps or "", "guidance_scale": request.guidance_scale or "",
    }.items():
        info.add_text(key, str(value))
    path = out / f"{stem}.png"
    result.image.save(path, pnginfo=info)
    return path


async def _generate(args) -> int:
    from tqdm import tqdm

    requests = _requests(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[int, ServerError]] = []
    progress = tqdm(total=len(requests), unit="img", disable=args.quiet)
    steps: dict[int, tuple[int, int]] = {}  # continuous models report denoising progress per request

    def stepped(index, counts):
        steps[index] = (int(counts[:, 0].sum()), int(counts[:, 1].sum()))
        done, total = (sum(values) for values in zip(*steps.values()))
        progress.set_postfix_str(f"steps {done}/{total} of the requests in flight", refresh=True)

    for index, request in enumerate(requests):
        request.on_progress = lambda counts, index=index: stepped(index, counts)

    def on_result(index, outcome):
        steps.pop(index, None)
        if isinstance(outcome, ServerError):
            failures.append((index, outcome))
            progress.write(f"request {index} ({requests[index].prompt[:40]!r}) failed: {outcome}")
        else:
            _save(outcome, index, out, args.model, args.video_format, args.fps)
        progress.update(1)

    started = time.perf_counter()
    async with AsyncDiffusionClient(args.url, args.model, timeout_s=args.timeout) as client:
        results = await client.generate_many(requests, args.concurrency, on_result)
    wall = time.perf_counter() - started
    progress.close()
    latencies = [r.seconds for r in results if not isinstance(r, ServerError)]
    ok = len(latencies)
    print(
        f"{ok}/{len(requests)} images in {wall:.1f}s ({ok / wall:.2f} images/s), {len(failures)} failed; "
        f"latency p50 {percentile(latencies, 50):.2f}s p95 {percentile(latencies, 95):.2f}s "
        f"p99 {percentile(latencies, 99):.2f}s; saved to {out}/"
    )
    return 1 if failures else 0


def _client(args):
    protocol, address = _split_url(args.url)
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return protocol, module.InferenceServerClient(address)


def _health(args) -> int:
    from tritonclient.utils import InferenceServerException

    protocol, client = _client(args)
    try:
        live, ready = client.is_server_live(), client.is_server_ready()
        model_ready = client.is_model_ready(args.model)
        print(f"server {args.url}: live={live} ready={ready}; model {args.model}: ready={model_ready}")
        if not model_ready:
            try:
                index = client.get_model_repository_index(**as_json(protocol))
            except InferenceServerException:  # an admin API: restricted where the server has an admin key
                print("  (its state and reason are in the repository index, which needs the admin key here)")
                return 1
            entries = index.get("models", []) if isinstance(index, dict) else index
            for entry in entries:
                if entry.get("name") == args.model:
                    print(f"  state {entry.get('state')}: {entry.get('reason', '')}")
            return 1
        metadata = client.get_model_metadata(args.model, **as_json(protocol))
        for tensor in metadata["inputs"]:
            print(f"  input  {tensor['name']:<20} {tensor['datatype']:<6} {tensor['shape']}")
        for tensor in metadata["outputs"]:
            print(f"  output {tensor['name']:<20} {tensor['datatype']:<6} {tensor['shape']}")
        return 0 if live and ready else 1
    except InferenceServerException as exc:
        print(f"server {args.url} unreachable or failing: {exc.message()}", file=sys.stderr)
        return 1


def _stats(args) -> int:
    protocol, client = _client(args)
    stats = client.get_inference_statistics(args.model, **as_json(protocol))
    model = stats["model_stats"][0]
    inferences, executions = int(model.get("inference_count", 0)), int(model.get("execution_count", 0))
    print(f"{args.model}: {inferences} inferences in {executions} executions "
          f"(mean batch {inferences / executions if executions else 0:.2f})")
    success = model["inference_stats"]["success"]
    queue = model["inference_stats"]["queue"]
    count = int(success.get("count", 0))
    if count:
        print(f"  mean request {int(success['ns']) / count / 1e6:.1f} ms, mean queue {int(queue.get('ns', 0)) / count / 1e6:.1f} ms")
    print("  batch size | executions | mean compute ms")
    for batch in sorted(model.get("batch_stats", []), key=lambda b: int(b["batch_size"])):
        infer = batch["compute_infer"]
        print(f"  {int(batch['batch_size']):>10} | {int(infer['count']):>10} | {int(infer['ns']) / int(infer['count']) / 1e6:.1f}")
    if args.metrics_url:
        with urllib.request.urlopen(args.metrics_url) as response:
            lines = [line for line in response.read().decode().splitlines()
                     if line.startswith("diffusion_") and f'model="{args.model}"' in line and "_bucket" not in line]
        print("  custom metrics:")
        for line in lines:
            print(f"    {line}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tdiff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="grpc://localhost:8001", help="grpc://host:port or http://host:port")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images (PNGs, seed and prompt in PNG metadata) or videos (MP4/GIF)")
    gen.add_argument("prompts", nargs="*")
    gen.add_argument("--prompts-file")
    gen.add_argument("--n", type=int, default=1, help="images per prompt")
    gen.add_argument("--seed", type=int, help="seed of the first image; the others count up (default: random)")
    gen.add_argument("--concurrency", type=int, default=8)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--size", help="HxW, e.g. 512x512 (or one number)")
    gen.add_argument("--negative")
    gen.add_argument("--init-image", help="source image for image-to-image")
    gen.add_argument("--strength", type=float)
    gen.add_argument("--frames", type=int, help="video models: frames per video (default: the model's)")
    gen.add_argument("--fps", type=int, default=16, help="video models: frame rate of the saved file")
    gen.add_argument("--video-format", choices=("mp4", "gif"), default="mp4", help="video models: file format")
    gen.add_argument("--priority", type=int, default=0)
    gen.add_argument("--timeout", type=float, help="client-side timeout per request, seconds")
    gen.add_argument("--out", default="images")
    gen.add_argument("--quiet", action="store_true")
    sub.add_parser("health", help="server and model readiness, the model's inputs and outputs")
    stats = sub.add_parser("stats", help="realized batch sizes and queue times")
    stats.add_argument("--metrics-url", default="", help="e.g. http://localhost:8002/metrics for custom metrics")
    args = parser.parse_args(argv)
    if args.command == "generate":
        return asyncio.run(_generate(args))
    return {"health": _health, "stats": _stats}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
