"""Locust load test: gRPC users built on tritonclient (through the project's client).

    locust -f perf/locustfile.py --headless -u 8 -r 4 -t 60s --host 127.0.0.1:8001 \
        --model stable_diffusion_tiny --i2i-ratio 0.25 --sizes 128x128,64x64 --think-time 0.5,2

Every call is reported to locust as a request event (success with the image bytes, or failure
with the server's message), named by task and size so the CSV splits them.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # make grpcio cooperate with locust's gevent loop

from locust import User, between, events, task


from client import DiffusionClient, GenerationRequest
from perf.prompts import vbench_prompts


@events.quit.add_listener
def _exit_without_grpc_teardown(exit_code, **_kwargs):
    # Locust has written its stats by now. Exit before interpreter shutdown: tritonclient's
    # InferenceServerClient.__del__ closes its grpc channel again, which hangs under gevent.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


@events.init_command_line_parser.add_listener
def _arguments(parser):
    parser.add_argument("--model", default="stable_diffusion_tiny", help="served model")
    parser.add_argument("--prompts-file", default="", help="one prompt per line (default: VBench prompts)")
    parser.add_argument("--i2i-ratio", type=float, default=0.25, help="share of image-to-image requests")
    parser.add_argument("--sizes", default="128x128", help="HxW sizes to draw from, comma-separated")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps (0: the model's default)")
    parser.add_argument("--think-time", default="0,0", help="min,max seconds between a user's requests")


def _prompts(path: str) -> list[str]:
    if path:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    return vbench_prompts()


class DiffusionUser(User):
    """One user: a gRPC connection, a prompt stream, a mix of text-to-image and image-to-image."""

    wait_time = between(0, 0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        low, high = (float(x) for x in options.think_time.split(","))
        self.wait_time = lambda: random.uniform(low, high)
        self.prompts = _prompts(options.prompts_file)
        self.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in options.sizes.split(",")]
        self.i2i_ratio = options.i2i_ratio
        self.steps = options.steps or None
        self.client = DiffusionClient(f"grpc://{self.host}", options.model, timeout_s=300)
        self.rng = random.Random()
        self.source = None

    def on_stop(self) -> None:
        self.client.close()

    @task
    def generate(self) -> None:
        height, width = self.rng.choice(self.sizes)
        request = GenerationRequest(self.rng.choice(self.prompts), seed=self.rng.randrange(2**31),
                                    height=height, width=width, steps=self.steps)
        name = f"text-to-image {height}x{width}"
        if self.source is not None and self.rng.random() < self.i2i_ratio:
            request.init_image, request.strength = self.source, 0.6
            name = f"image-to-image {height}x{width}"
        started = time.perf_counter()
        exception, length = None, 0
        try:
            result = self.client.generate(request)
            length = result.array.nbytes
            self.source = result.array  # later image-to-image requests edit an earlier result
        except Exception as exc:  # reported to locust as a failure, with the server's message
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=exception, context={},
        )
