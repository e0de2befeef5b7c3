"""Custom Prometheus metrics of the backend (served on Triton's metrics port, /metrics)."""

from __future__ import annotations

from .continuous import StepReport
from .core import Cancelled, Images, Outcome, Rejected
from .executor import CallReport

STAGES = ("validate", "pipeline", "respond")
CALL_RESULTS = ("ok", "out_of_memory", "failed")
LORA_EVENTS = ("hit", "load", "eviction", "failure")
_BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
_GROUP_BUCKETS = [1, 2, 3, 4, 8, 16]
_STEP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
_SECONDS_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class BackendMetrics:
    """Per-model metric series: realized batch per pipeline call, groups per execute, stage times."""

    def __init__(self, pb_utils, model_name: str, model_version: str, instance: str = "", device: str = ""):
        # One series per model instance (Triton's own statistics are per model): shows how the
        # batcher spreads executions over instances. Triton gives a KIND_GPU group's instances on
        # different GPUs the same name, so the device tells them apart.
        labels = {"model": model_name, "version": model_version, "instance": instance, "device": device}
        histogram = pb_utils.MetricFamily.HISTOGRAM
        counter = pb_utils.MetricFamily.COUNTER
        gauge = pb_utils.MetricFamily.GAUGE
        self._families = [
            pb_utils.MetricFamily("diffusion_pipeline_batch_size", "Images per diffusers pipeline call (every actual call)", histogram),
            pb_utils.MetricFamily("diffusion_groups_per_execute", "Signature groups per execute() call", histogram),
            pb_utils.MetricFamily("diffusion_stage_seconds", "Seconds per execute() stage", histogram),
            pb_utils.MetricFamily("diffusion_pipeline_calls_total", "Diffusers pipeline calls, by result", counter),
            pb_utils.MetricFamily("diffusion_images_total", "Images generated", counter),
            pb_utils.MetricFamily("diffusion_request_errors_total", "Requests answered with an error", counter),
            pb_utils.MetricFamily("diffusion_requests_cancelled_total", "Requests cancelled before their image was done", counter),
            pb_utils.MetricFamily(
                "diffusion_cancelled_rows_dropped_total", "Cancelled images dropped from a running pipeline call", counter
            ),
            pb_utils.MetricFamily("diffusion_denoising_steps_total", "Denoising steps run (one per step of a call)", counter),
            pb_utils.MetricFamily(
                "diffusion_cancellation_poll_seconds_total", "Seconds spent asking Triton whether requests were cancelled", counter
            ),
            pb_utils.MetricFamily("diffusion_warmup_seconds", "Seconds the warm-up ran before the model was READY", gauge),
            pb_utils.MetricFamily(
                "diffusion_compilations_while_serving_total",
                "Graphs torch.compile built after the warm-up (a shape no warm-up covered; 0 when warm)", counter),
            pb_utils.MetricFamily(
                "diffusion_cuda_graph_recordings_while_serving_total",
                "CUDA graphs recorded after the warm-up (compile_mode reduce-overhead: a shape no warm-up recorded; 0 when warm)",
                counter),
            pb_utils.MetricFamily("diffusion_padding_rows_total", "Filler rows run to pad calls to a batch bucket", counter),
            pb_utils.MetricFamily(
                "diffusion_lora_adapters_total",
                "LoRA adapters asked for by requests, by event: hit (loaded already), load, eviction (least recently "
                "used, to make room), failure (refused: the request got INVALID_ARG)", counter),
            pb_utils.MetricFamily(
                "diffusion_step_cache_skipped_rows_total",
                "Row-steps at which the per-row step cache skipped the transformer blocks after the first (STEP_CACHE=1 rows)",
                counter),
            # continuous batching (batching: continuous)
            pb_utils.MetricFamily("diffusion_continuous_live_rows", "Rows denoised together per step of the running batch",
                                  histogram),
            pb_utils.MetricFamily("diffusion_continuous_step_seconds", "Seconds per step of the running batch (all sizes)",
                                  histogram),
            pb_utils.MetricFamily("diffusion_continuous_admissions_total",
                                  "Rows admitted to the running batch: when it was idle, or mid-flight (joining running rows)",
                                  counter),
            pb_utils.MetricFamily("diffusion_continuous_row_cap", "Most rows the running batch admits (lowered after out-of-memory)",
                                  gauge),
        ]
        (batch, groups, stages, calls, images, errors, cancelled, dropped, steps, poll, warmup, compilations, recordings, padding,
         adapters, skipped, live_rows, step_seconds, admissions, row_cap) = self._families
        self.pipeline_batch_size = batch.Metric(labels=labels, buckets=_BATCH_BUCKETS)
        self.groups_per_execute = groups.Metric(labels=labels, buckets=_GROUP_BUCKETS)
        self.stage_seconds = {
            stage: stages.Metric(labels={**labels, "stage": stage}, buckets=_SECONDS_BUCKETS) for stage in STAGES
        }
        self.pipeline_calls = {result: calls.Metric(labels={**labels, "result": result}) for result in CALL_RESULTS}
        self.images = images.Metric(labels=labels)
        # by the code the client got: Triton counts these requests in nv_inference_request_success
        # (the Python backend answered them), so dashboards need this series for an error rate
        self.request_errors = {code: errors.Metric(labels={**labels, "code": code}) for code in ("INVALID_ARG", "INTERNAL")}
        self.cancelled = cancelled.Metric(labels=labels)
        self.rows_dropped = dropped.Metric(labels=labels)
        self.steps = steps.Metric(labels=labels)
        self.poll_seconds = poll.Metric(labels=labels)
        self.warmup_seconds = warmup.Metric(labels=labels)
        self.compilations = compilations.Metric(labels=labels)
        self.cuda_graph_recordings = recordings.Metric(labels=labels)
        self.padding_rows = padding.Metric(labels=labels)
        self.cache_skipped_rows = skipped.Metric(labels=labels)
        self.lora = {event: adapters.Metric(labels={**labels, "event": event}) for event in LORA_EVENTS}
        self.live_rows = live_rows.Metric(labels=labels, buckets=_BATCH_BUCKETS)
        self.step_seconds = step_seconds.Metric(labels=labels, buckets=_STEP_BUCKETS)
        self.admissions = {when: admissions.Metric(labels={**labels, "when": when}) for when in ("idle", "mid_flight")}
        self.row_cap = row_cap.Metric(labels=labels)

    def observe_running_step(self, report: StepReport) -> None:
        self.live_rows.observe(report.live_rows)
        self.step_seconds.observe(report.seconds)
        self.steps.increment(1)

    def observe_admission(self, rows: int, mid_flight: bool) -> None:
        self.admissions["mid_flight" if mid_flight else "idle"].increment(rows)

    def observe_call(self, report: CallReport) -> None:
        self.pipeline_batch_size.observe(report.rows)
        self.pipeline_calls[report.result].increment(1)
        self.stage_seconds["pipeline"].observe(report.seconds)
        if report.rows_dropped:
            self.rows_dropped.increment(report.rows_dropped)
        if report.poll_seconds:
            self.poll_seconds.increment(report.poll_seconds)

    def observe_step(self) -> None:
        self.steps.increment(1)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage].observe(seconds)

    def observe_outcome(self, outcome: Outcome) -> None:
        if isinstance(outcome, Images):
            self.images.increment(len(outcome.images))
        elif isinstance(outcome, Cancelled):
            self.cancelled.increment(1)
        else:
            self.request_errors["INVALID_ARG" if isinstance(outcome, Rejected) else "INTERNAL"].increment(1)
