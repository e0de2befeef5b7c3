"""The Triton Python-backend model: Triton glue around the executor (parse -> plan -> run -> respond).

``model_repository/<model>/1/model.py`` re-exports ``TritonPythonModel`` from here; everything a
model needs to know comes from its ``config.pbtxt``: the inputs it declares (``schema.py``) and its
``parameters`` (``settings.py``). The work itself is in ``executor.py``, which has no Triton in it.
"""

from __future__ import annotations

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from .acceleration import compiled_graphs
from .batching import CallBudget
from .executor import Cancelled, Executor, Failed, Images, Outcome, Rejected
from .metrics import BackendMetrics
from .pipeline import ModelLoadError, PipelineRunner, is_out_of_memory, resolve_device
from .requests import ParsedRequest, ParseResult, RequestError, parse_request
from .schema import Schema, SchemaError
from .settings import ModelSettings, SettingsError


def _error_response(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    """Diffusers pipeline served with Triton's dynamic batching; every request answered in order."""

    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        try:
            self.schema = Schema.from_model_config(model_config)
            self.settings = ModelSettings.from_model_config(model_config)
            device = resolve_device(self.settings.device, args.get("model_instance_kind", ""),
                                    int(args.get("model_instance_device_id") or 0))
            self.runner = PipelineRunner.load(self.settings, device, self.schema.output)
        except (SchemaError, SettingsError, ModelLoadError) as exc:
            # Raising fails this model's load with the message; the server and other models stay up.
            raise pb_utils.TritonModelException(f"{self.model_name}: {exc}") from None
        for warning in self.settings.batching_warnings(int(model_config.get("max_batch_size", 0))):
            pb_utils.Logger.log_warn(f"{self.model_name}: WARNING: {warning}")
        self.metrics = BackendMetrics(pb_utils, self.model_name, args["model_version"], args.get("model_instance_name", ""),
                                      self.runner.device)
        if self.runner.speed:
            pb_utils.Logger.log_info(f"{self.model_name}: speed settings: {'; '.join(self.runner.speed)}")
        warmup = self.runner.warm_up()  # before READY: serving must not compile
        self.metrics.warmup_seconds.set(warmup.seconds)
        if warmup.calls:
            pb_utils.Logger.log_info(f"{self.model_name}: warm-up ran {warmup.calls} calls in {warmup.seconds:.1f}s, "
                                     f"{warmup.compiled_graphs} graphs compiled")
        self.graphs_seen, self.padded_rows_seen = compiled_graphs(), 0
        self.executor = Executor(
            self.runner.run,
            CallBudget(self.settings.max_images_per_call, self.settings.max_pixels_per_call),
            is_out_of_memory,
            on_call=self.metrics.observe_call,
            on_step=self.metrics.observe_step,
            on_plan=lambda chunks: self.metrics.groups_per_execute.observe(len({chunk.params for chunk in chunks})),
            poll_interval_s=self.settings.cancellation_poll_interval_ms / 1000,
        )
        pb_utils.Logger.log_info(
            f"{self.model_name}: {type(self.runner.text_to_image).__name__} from "
            f"{self.settings.model_location} on {self.runner.device}"
        )

    def execute(self, requests: list) -> list:
        started = time.perf_counter()
        parsed = [self._parse(request) for request in requests]
        self.metrics.observe_stage("validate", time.perf_counter() - started)
        outcomes = self.executor.run(parsed, [request.is_cancelled for request in requests])
        self._count_compilations_and_padding()
        started = time.perf_counter()
        responses = [self._respond(outcome) for outcome in outcomes]
        self.metrics.observe_stage("respond", time.perf_counter() - started)
        return responses

    def _count_compilations_and_padding(self) -> None:
        graphs = compiled_graphs()
        if graphs > self.graphs_seen:
            pb_utils.Logger.log_warn(f"{self.model_name}: compiled {graphs - self.graphs_seen} new graph(s) while serving "
                                     "(a batch size or size the warm-up did not cover)")
            self.metrics.compilations.increment(graphs - self.graphs_seen)
            self.graphs_seen = graphs
        if self.runner.padded_rows > self.padded_rows_seen:
            self.metrics.padding_rows.increment(self.runner.padded_rows - self.padded_rows_seen)
            self.padded_rows_seen = self.runner.padded_rows

    def _parse(self, request) -> ParseResult:
        inputs = {name: pb_utils.get_input_tensor_by_name(request, name) for name in self.schema.names}
        result = parse_request({name: t.as_numpy() for name, t in inputs.items() if t is not None}, self.settings)
        if isinstance(result, ParsedRequest):
            for item in result.items:
                reason = self.runner.unsupported(item)
                if reason:
                    return RequestError(reason)
        return result

    def _respond(self, outcome: Outcome):
        self.metrics.observe_outcome(outcome)
        if isinstance(outcome, Images):
            return pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(self.schema.output, np.stack(outcome.images)),
                    pb_utils.Tensor("SEED", np.array([[seed] for seed in outcome.seeds], dtype=np.int64)),
                ]
            )
        if isinstance(outcome, Rejected):
            return _error_response(outcome.message, pb_utils.TritonError.INVALID_ARG)
        if isinstance(outcome, Cancelled):
            return _error_response("request cancelled", pb_utils.TritonError.CANCELLED)
        assert isinstance(outcome, Failed)
        return _error_response(outcome.message, pb_utils.TritonError.INTERNAL)

    def finalize(self) -> None:
        self.runner = None
