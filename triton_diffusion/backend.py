"""The Triton Python-backend model: Triton glue around the executor (parse -> plan -> run -> respond).

``model_repository/<model>/1/model.py`` re-exports ``TritonPythonModel`` from here; everything a
model needs to know comes from its ``config.pbtxt``: the inputs it declares (``schema.py``) and its
``parameters`` (``settings.py``). The work itself is in ``executor.py``, which has no Triton in it.
"""

from __future__ import annotations

import json
import time
from typing import Optional

import numpy as np
import triton_python_backend_utils as pb_utils

from .acceleration import compiled_graphs
from .batching import CallBudget
from .continuous import ContinuousBatcher, Job
from .executor import Cancelled, Executor, Failed, Images, Outcome, Rejected
from .families import ContinuousUnsupported, step_model_for
from .families.stepping import StepModel
from .metrics import BackendMetrics
from .pipeline import ModelLoadError, PipelineRunner, is_out_of_memory, resolve_device
from .requests import ParsedRequest, ParseResult, RequestError, parse_request
from .schema import Schema, SchemaError
from .settings import ModelSettings, SettingsError


def wants_progress(request) -> bool:
    """Whether a request asks for progress responses (request parameter ``progress``: true)."""
    try:
        value = json.loads(request.parameters() or "{}").get("progress", False)
    except (ValueError, AttributeError):
        return False
    return value is True or (isinstance(value, str) and value.lower() == "true")


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
            decoupled = pb_utils.using_decoupled_model_transaction_policy(model_config)
            if decoupled != self.settings.continuous:
                raise SettingsError("batching: continuous and model_transaction_policy { decoupled: true } go together "
                                    "(a continuous model answers from its running batch, after execute() returned)")
            self.runner = PipelineRunner.load(self.settings, device, self.schema.output)
            self.steps: Optional[StepModel] = None
            if self.settings.continuous:
                self.steps = step_model_for(self.runner.text_to_image, self.runner.device, self.settings.max_sequence_length)
        except (SchemaError, SettingsError, ModelLoadError, ContinuousUnsupported) as exc:
            # Raising fails this model's load with the message; the server and other models stay up.
            raise pb_utils.TritonModelException(f"{self.model_name}: {exc}") from None
        for warning in self.settings.batching_warnings(int(model_config.get("max_batch_size", 0))):
            pb_utils.Logger.log_warn(f"{self.model_name}: WARNING: {warning}")
        self.metrics = BackendMetrics(pb_utils, self.model_name, args["model_version"], args.get("model_instance_name", ""),
                                      self.runner.device)
        if self.runner.speed:
            pb_utils.Logger.log_info(f"{self.model_name}: speed settings: {'; '.join(self.runner.speed)}")
        # before READY: serving must not compile (a continuous model warms its step loop, not __call__)
        warmup = self.steps.warm_up(*self.settings.warmup_plan()) if self.steps else self.runner.warm_up()
        self.metrics.warmup_seconds.set(warmup.seconds)
        if warmup.calls:
            pb_utils.Logger.log_info(f"{self.model_name}: warm-up ran {warmup.calls} calls in {warmup.seconds:.1f}s, "
                                     f"{warmup.compiled_graphs} graphs compiled")
        self.graphs_seen, self.padded_rows_seen = compiled_graphs(), 0
        budget = CallBudget(self.settings.max_images_per_call, self.settings.max_pixels_per_call)
        self.batcher: Optional[ContinuousBatcher] = None
        if self.steps is not None:
            self.batcher = ContinuousBatcher(self.steps, budget, is_out_of_memory,
                                             self.settings.cancellation_poll_interval_ms / 1000,
                                             on_step=self._observe_running_step,
                                             on_admit=self.metrics.observe_admission,
                                             on_out_of_memory=self.metrics.row_cap.set,
                                             progress_interval_s=self.settings.progress_interval_ms / 1000)
            self.metrics.row_cap.set(self.batcher.row_cap)
            self.batcher.start()
        self.executor = Executor(
            self.runner.run,
            budget,
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

    def execute(self, requests: list) -> Optional[list]:
        if self.steps is not None:
            return self._execute_continuous(requests)
        started = time.perf_counter()
        parsed = [self._parse(request) for request in requests]
        self.metrics.observe_stage("validate", time.perf_counter() - started)
        outcomes = self.executor.run(parsed, [request.is_cancelled for request in requests])
        self._count_compilations_and_padding()
        started = time.perf_counter()
        responses = [self._respond(outcome) for outcome in outcomes]
        self.metrics.observe_stage("respond", time.perf_counter() - started)
        return responses

    def _execute_continuous(self, requests: list) -> None:
        """Hand the requests to the running batch and return once they are in it (decoupled: each
        is answered through its response sender when its last row is decoded)."""
        started = time.perf_counter()
        accepted, progress = [], []
        for request in requests:
            sender = request.get_response_sender()
            parsed = self._parse(request)
            if isinstance(parsed, RequestError):
                self._send_final(sender, Rejected(str(parsed)))
            else:
                accepted.append((sender, parsed))
                progress.append(self.schema.progress and wants_progress(request))
        self.metrics.observe_stage("validate", time.perf_counter() - started)
        if not accepted:
            return None
        items = [item for _, parsed in accepted for item in parsed.items]
        try:  # encoding happens here, on Triton's thread, while the running batch keeps stepping
            rows = iter(self.steps.prepare(items))
        except Exception as exc:  # noqa: BLE001 - these requests fail; the running batch goes on
            is_out_of_memory(exc)
            for sender, _ in accepted:
                self._send_final(sender, Failed(f"encoding the prompts failed: {type(exc).__name__}: {exc}"))
            return None
        jobs = [
            Job([next(rows) for _ in parsed.items], tuple(item.seed for item in parsed.items), sender.is_cancelled,
                lambda outcome, sender=sender: self._send_final(sender, outcome),
                progress=(lambda counts, sender=sender: self._send_progress(sender, counts)) if wants else None)
            for (sender, parsed), wants in zip(accepted, progress)
        ]
        for job in jobs:  # the first sign of life: the request is in this stub now (0 steps done)
            if job.progress is not None:
                self.batcher.send_progress(job)
        self.batcher.submit(jobs)
        self.batcher.wait_for_room()  # backpressure: the next requests wait in Triton's queue, by priority
        return None

    def _observe_running_step(self, report) -> None:
        self.metrics.observe_running_step(report)
        self._count_compilations_and_padding()

    def _send_final(self, sender, outcome: Outcome) -> None:
        sender.send(self._respond(outcome), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _send_progress(self, sender, counts: list) -> None:
        sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PROGRESS", np.array(counts, dtype=np.int32))]))

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
                reason = self.runner.unsupported(item) or (self.steps and self.steps.unsupported(item))
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
        if self.batcher is not None:
            self.batcher.stop()
        self.runner = None
        # The custom metrics are left to the stub's exit, where Triton 2.51's stub segfaults on them
        # (Metric::SaveToSharedMemory on a freed pool: harmless, the process is leaving). Released
        # here instead, they delete their metric families, which a reload's new instance of the same
        # model shares, and tritonserver itself crashed (tests/test_faults.py's config swap).
