"""The Triton Python-backend model: thin glue around parse -> plan -> run -> split.

``model_repository/<model>/1/model.py`` re-exports ``TritonPythonModel`` from here; everything a
model needs to know comes from its ``config.pbtxt``.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from .batching import ItemRef, plan_batches, run_splitting_on_oom, split_results
from .metrics import BackendMetrics
from .pipeline import ModelLoadError, PipelineRunner, is_out_of_memory
from .requests import KNOWN_INPUTS, ParsedRequest, RequestError, parse_request
from .settings import ModelSettings

log = logging.getLogger(__name__)


def _read_inputs(request) -> dict:
    return {name: _as_numpy(pb_utils.get_input_tensor_by_name(request, name)) for name in KNOWN_INPUTS}


def _as_numpy(tensor):
    return None if tensor is None else tensor.as_numpy()


def _error_response(message: str, code=None):
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class RequestCancelled(Exception):
    """Marks the output of a request that was cancelled before its image was finished."""


class TritonPythonModel:
    """Diffusers pipeline served with Triton's dynamic batching; every request answered in order."""

    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.settings = ModelSettings.from_model_config(model_config)
        try:
            self.runner = PipelineRunner.load(self.settings)
        except ModelLoadError as exc:
            # Raising fails this model's load with the message; the server and other models stay up.
            raise pb_utils.TritonModelException(f"{self.model_name}: {exc}") from None
        self.metrics = BackendMetrics(pb_utils, self.model_name, args["model_version"])
        pb_utils.Logger.log_info(
            f"{self.model_name}: {type(self.runner.text_to_image).__name__} from "
            f"{self.settings.model_location} on {self.runner.device}"
        )

    def execute(self, requests: list) -> list:
        started = time.perf_counter()
        parsed = [self._parse(request) for request in requests]
        items = [
            (ItemRef(index, row), item)
            for index, result in enumerate(parsed)
            if isinstance(result, ParsedRequest)
            for row, item in enumerate(result.items)
        ]
        chunks = plan_batches(items, self.settings.max_images_per_call, self.settings.max_pixels_per_call)
        self.metrics.observe_stage("validate", time.perf_counter() - started)
        self.metrics.groups_per_execute.observe(len({chunk.signature for chunk in chunks}))

        images: dict[ItemRef, object] = {}
        for chunk in chunks:
            started = time.perf_counter()
            split_results(chunk, self._run_chunk(chunk, [requests[ref.request] for ref in chunk.refs]), images)
            self.metrics.observe_stage("pipeline", time.perf_counter() - started)

        started = time.perf_counter()
        responses = [self._respond(index, result, images) for index, result in enumerate(parsed)]
        self.metrics.observe_stage("postprocess", time.perf_counter() - started)
        return responses

    def _run_chunk(self, chunk, chunk_requests: list) -> list:
        """One pipeline call; outputs are images, or the exception / cancellation of each item.

        A request cancelled while queued never runs; one cancelled mid-denoise leaves the call at
        the next step (see ``cancellation.py``) while its batch-mates finish.
        """
        if all(request.is_cancelled() for request in chunk_requests):
            return [RequestCancelled()] * len(chunk)
        cancelled_of = {id(item): request.is_cancelled for item, request in zip(chunk.items, chunk_requests)}
        try:
            outputs = run_splitting_on_oom(
                lambda items: self.runner.run(items, cancelled=[cancelled_of[id(item)] for item in items]),
                chunk.items,
                is_out_of_memory,
            )
        except Exception as exc:  # one failed call must not fail the other chunks of this execute
            log.exception("pipeline call failed")
            return [exc] * len(chunk)
        self.metrics.observe_call(len(chunk))
        dropped = sum(output is None for output in outputs)
        if dropped:
            self.metrics.rows_dropped.increment(dropped)
        return [
            RequestCancelled() if output is None or request.is_cancelled() else output
            for output, request in zip(outputs, chunk_requests)
        ]

    def _parse(self, request):
        result = parse_request(_read_inputs(request), self.settings)
        if isinstance(result, ParsedRequest):
            for item in result.items:
                reason = self.runner.unsupported(item)
                if reason:
                    return RequestError(reason)
        return result

    def _respond(self, index: int, result, images: dict):
        if isinstance(result, RequestError):
            self.metrics.request_errors.increment(1)
            return _error_response(str(result))
        outputs = [images[ItemRef(index, row)] for row in range(len(result.items))]
        if any(isinstance(output, RequestCancelled) for output in outputs):
            self.metrics.cancelled.increment(1)
            return _error_response("request cancelled", pb_utils.TritonError.CANCELLED)
        failures = [output for output in outputs if isinstance(output, Exception)]
        if failures:
            self.metrics.request_errors.increment(1)
            return _error_response(f"pipeline failed: {failures[0]}", pb_utils.TritonError.INTERNAL)
        self.metrics.images.increment(len(outputs))
        seeds = np.array([[item.seed] for item in result.items], dtype=np.int64)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("IMAGE", np.stack(outputs)),
                pb_utils.Tensor("SEED", seeds),
            ]
        )

    def finalize(self) -> None:
        self.runner = None
