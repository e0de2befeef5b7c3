"""The Triton Python-backend models: thin Triton glue around the pure core, one class per
transaction policy.

``model_repository/<model>/1/model.py`` re-exports ``TritonPythonModel`` from here; everything a
model needs to know comes from its ``config.pbtxt``: the inputs it declares (``schema.py``) and its
``parameters`` (``settings.py``). ``TritonPythonModel`` picks the class for the model's policy:
``DynamicModel`` (Triton's dynamic batcher hands ``execute`` a batch; ``executor.py`` runs it and
each request is answered through its response sender as soon as its rows are done) or ``ContinuousModel`` (decoupled: ``execute`` hands the
requests to the running batch of ``continuous.py``, which answers each through its response
sender). Both share ``ServedModel``: loading, warm-up, metrics, parsing (``core.admit``) and
response building (``core.response_error``).
"""

from __future__ import annotations

import json
import time
from typing import Optional

import numpy as np
import triton_python_backend_utils as pb_utils

from . import row_cache
from .acceleration import compiled_graphs, cuda_graph_recordings, denoiser_of
from .batching import CallBudget
from .continuous import ContinuousBatcher, Job
from .core import Failed, Outcome, Rejected, admit, response_error
from .executor import Executor
from .families import ContinuousUnsupported, step_model_for
from .metrics import BackendMetrics
from .pipeline import ModelLoadError, PipelineRunner, is_out_of_memory, resolve_device
from .requests import ParseResult, RequestError, parse_request
from .schema import Schema, SchemaError, complete
from .settings import ModelSettings, SettingsError


def wants_progress(request) -> bool:
    """Whether a request asks for progress responses (request parameter ``progress``: true)."""
    try:
        value = json.loads(request.parameters() or "{}").get("progress", False)
    except (ValueError, AttributeError):
        return False
    return value is True or (isinstance(value, str) and value.lower() == "true")


class LoadError(Exception):
    """The model cannot be served as configured; the message says why."""


class ServedModel:
    """What both policies do the same way. Subclasses add ``_start`` (after the pipeline loaded and
    before warm-up) and ``execute``."""

    def __init__(self, args: dict, model_config: dict, schema: Schema, settings: ModelSettings):
        self.model_name = args["model_name"]
        self.schema, self.settings = schema, settings
        device = resolve_device(settings.load.device, args.get("model_instance_kind", ""),
                                int(args.get("model_instance_device_id") or 0))
        try:
            self.runner = PipelineRunner.load(settings, device, schema.output)
            self._start()
        except (ModelLoadError, ContinuousUnsupported, SettingsError) as exc:
            raise LoadError(str(exc)) from None
        for warning in settings.batching_warnings(int(model_config.get("max_batch_size", 0))):
            pb_utils.Logger.log_warn(f"{self.model_name}: WARNING: {warning}")
        self.metrics = BackendMetrics(pb_utils, self.model_name, args["model_version"], args.get("model_instance_name", ""),
                                      self.runner.device)
        if self.runner.speed:
            pb_utils.Logger.log_info(f"{self.model_name}: speed settings: {'; '.join(self.runner.speed)}")
        for warning in self.runner.warnings:
            pb_utils.Logger.log_warn(f"{self.model_name}: {warning}")
        warmup = self._warm_up()  # before READY: serving must not compile
        self.metrics.warmup_seconds.set(warmup.seconds)
        if warmup.calls:
            pb_utils.Logger.log_info(f"{self.model_name}: warm-up ran {warmup.calls} calls in {warmup.seconds:.1f}s, "
                                     f"{warmup.compiled_graphs} graphs compiled, {warmup.cuda_graphs} CUDA graphs recorded")
        # what happens after READY and should not (a warning each), and the padding rows: the
        # process-wide count, the metric it moves, the warning
        denoiser = denoiser_of(self.runner.text_to_image)
        self._while_serving = [
            (compiled_graphs, self.metrics.compilations,
             "compiled {} new graph(s) while serving (a batch size or size the warm-up did not cover)"),
            (cuda_graph_recordings, self.metrics.cuda_graph_recordings,
             "recorded {} new CUDA graph(s) while serving (a shape or path the warm-up did not record)"),
            (lambda: self.runner.padded_rows, self.metrics.padding_rows, None),
            (lambda: row_cache.skipped_rows(denoiser), self.metrics.cache_skipped_rows, None),
        ]
        adapters = self.runner.adapters
        if adapters is not None:  # (counted per process, as the rest: hits, loads, evictions, failures)
            self._while_serving += [(lambda event=event: getattr(adapters, event + "s"), metric, None)
                                    for event, metric in self.metrics.lora.items()]
        self._seen = [count() for count, _, _ in self._while_serving]
        self.budget = CallBudget(settings.calls.max_images_per_call, settings.calls.max_pixels_per_call)
        self._serve()
        pb_utils.Logger.log_info(f"{self.model_name}: {type(self.runner.text_to_image).__name__} from "
                                 f"{settings.load.model_location} on {self.runner.device}")

    # -- per policy ------------------------------------------------------------------------------
    def _start(self) -> None:
        """Policy-specific set-up that can fail the load (after the pipeline loaded)."""

    def _warm_up(self):
        return self.runner.warm_up()

    def _serve(self) -> None:
        """Policy-specific set-up after warm-up (the executor, the running batch)."""

    def execute(self, requests: list) -> Optional[list]:
        raise NotImplementedError

    def finalize(self) -> None:
        if getattr(self.runner, "group", None) is not None:  # parallel workers end with their instance
            self.runner.group.stop()
        self.runner = None
        # The custom metrics are left to the stub's exit, where Triton 2.51's stub segfaults on them
        # (Metric::SaveToSharedMemory on a freed pool: harmless, the process is leaving). Released
        # here instead, they delete their metric families, which a reload's new instance of the same
        # model shares, and tritonserver itself crashed (tests/test_faults.py's config swap).

    # -- shared ----------------------------------------------------------------------------------
    def _checks(self) -> tuple:
        return (self.runner.unsupported,)

    def _parse(self, request) -> ParseResult:
        inputs = {name: pb_utils.get_input_tensor_by_name(request, name) for name in self.schema.names}
        parsed = parse_request({name: t.as_numpy() for name, t in inputs.items() if t is not None}, self.settings)
        return admit(parsed, *self._checks())

    def _respond(self, outcome: Outcome):
        self.metrics.observe_outcome(outcome)
        error = response_error(outcome)
        if error is None:
            return pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(self.schema.output, np.stack(outcome.images)),
                pb_utils.Tensor("SEED", np.array([[seed] for seed in outcome.seeds], dtype=np.int64)),
            ])
        code, message = error
        return pb_utils.InferenceResponse(output_tensors=[],
                                          error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))

    def _count_while_serving(self) -> None:
        """Move the while-serving metrics by what the process counted since the last look."""
        for index, (count, metric, warning) in enumerate(self._while_serving):
            now = count()
            if now > self._seen[index]:
                if warning:
                    pb_utils.Logger.log_warn(f"{self.model_name}: " + warning.format(now - self._seen[index]))
                metric.increment(now - self._seen[index])
                self._seen[index] = now


class DynamicModel(ServedModel):
    """Triton's dynamic batcher forms the batch; one execution's requests run as pipeline calls."""

    def _serve(self) -> None:
        self.executor = Executor(
            self.runner.run,
            self.budget,
            is_out_of_memory,
            on_call=self.metrics.observe_call,
            on_step=self.metrics.observe_step,
            on_plan=lambda chunks: self.metrics.groups_per_execute.observe(len({chunk.params for chunk in chunks})),
            poll_interval_s=self.settings.calls.cancellation_poll_interval_ms / 1000,
            ready=self.runner.ready,
        )

    def execute(self, requests: list) -> None:
        """Run the execution's calls; each request is answered through its response sender as soon as
        its rows are done (a request of the first call does not wait for the execution's other calls)."""
        started = time.perf_counter()
        senders = [request.get_response_sender() for request in requests]
        parsed = [self._parse(request) for request in requests]
        self.metrics.observe_stage("validate", time.perf_counter() - started)
        answered: set[int] = set()
        responding = [0.0]

        def answer(index: int, outcome: Outcome) -> None:
            started = time.perf_counter()
            answered.add(index)
            try:
                senders[index].send(self._respond(outcome), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as exc:  # noqa: BLE001 - a client gone must not fail its batch-mates' answers
                pb_utils.Logger.log_warn(f"{self.model_name}: answering a request failed: {type(exc).__name__}: {exc}")
            responding[0] += time.perf_counter() - started

        try:
            self.executor.run(parsed, [request.is_cancelled for request in requests], on_outcome=answer)
        except Exception as exc:  # noqa: BLE001 - a bug here must not leave a request unanswered
            pb_utils.Logger.log_error(f"{self.model_name}: execution failed: {type(exc).__name__}: {exc}")
            for index in set(range(len(requests))) - answered:
                answer(index, Failed(f"execution failed: {type(exc).__name__}: {exc}"))
        self._count_while_serving()
        self.metrics.observe_stage("respond", responding[0])
        return None


class ContinuousModel(ServedModel):
    """Decoupled: requests join a running batch at the next step, each answered when its rows are done."""

    def _start(self) -> None:
        self.steps = step_model_for(self.runner.text_to_image, self.runner.device, self.settings.load.max_sequence_length)

    def _warm_up(self):
        return self.steps.warm_up(*self.settings.warmup_plan())  # the step loop itself, not __call__

    def _checks(self) -> tuple:
        return (self.runner.unsupported, self.steps.unsupported)

    def _serve(self) -> None:
        self.batcher = ContinuousBatcher(self.steps, self.budget, is_out_of_memory,
                                         self.settings.calls.cancellation_poll_interval_ms / 1000,
                                         on_step=self._observe_running_step,
                                         on_admit=self.metrics.observe_admission,
                                         on_out_of_memory=self.metrics.row_cap.set,
                                         progress_interval_s=self.settings.calls.progress_interval_ms / 1000,
                                         ready=self.runner.ready)
        self.metrics.row_cap.set(self.batcher.row_cap)
        self.batcher.start()

    def execute(self, requests: list) -> None:
        """Hand the requests to the running batch and return once they are in it (each is answered
        through its response sender when its last row is decoded)."""
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

    def finalize(self) -> None:
        self.batcher.stop()
        super().finalize()

    def _observe_running_step(self, report) -> None:
        self.metrics.observe_running_step(report)
        self._count_while_serving()

    def _send_final(self, sender, outcome: Outcome) -> None:
        sender.send(self._respond(outcome), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _send_progress(self, sender, counts: list) -> None:
        sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PROGRESS", np.array(counts, dtype=np.int32))]))


class TritonPythonModel:
    """What Triton instantiates for every model: declares the inputs and outputs the config leaves
    out, then serves it with the class of its transaction policy (checked against ``batching``)."""

    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        """The schema a ``config.pbtxt`` leaves out (``schema.declaration``: image or video,
        continuous or not), so a model's file holds only what is specific to it and the served
        config still shows the whole schema. Declared lists are kept as they are."""
        # ``schema.complete`` is what ``model_config.load`` applies to files; as_dict() is the config
        # Triton takes back, so updating it in place serves the same schema (allow_ragged_batch and
        # the transaction policy included, which add_input/add_output cannot set).
        config = auto_complete_model_config.as_dict()
        config.update(complete(config))
        return auto_complete_model_config

    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        name = args["model_name"]
        try:
            schema = Schema.from_model_config(model_config)
            settings = ModelSettings.from_model_config(model_config)
            decoupled = pb_utils.using_decoupled_model_transaction_policy(model_config)
            if decoupled != settings.calls.continuous:
                raise SettingsError("batching: continuous and model_transaction_policy { decoupled: true } go together "
                                    "(a continuous model answers from its running batch, after execute() returned)")
            self.model = (ContinuousModel if decoupled else DynamicModel)(args, model_config, schema, settings)
        except (SchemaError, SettingsError, LoadError) as exc:
            # Raising fails this model's load with the message; the server and other models stay up.
            raise pb_utils.TritonModelException(f"{name}: {exc}") from None

    def execute(self, requests: list) -> Optional[list]:
        return self.model.execute(requests)

    def finalize(self) -> None:
        if getattr(self, "model", None) is not None:  # not after a failed initialize
            self.model.finalize()
