"""asyncio client (tritonclient's aio clients): many requests at a bounded concurrency.

    async with AsyncDiffusionClient("grpc://localhost:8001") as c:
        results = await c.generate_many([GenerationRequest(p, seed=i) for i, p in enumerate(prompts)], concurrency=8)

Cancelling the task of a gRPC ``generate`` cancels the RPC; the server then drops the request
if it is still queued, or stops its pipeline call at the next step when no batch-mate needs it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional, Sequence

from .api import (
    ClientOptions,
    GenerationRequest,
    GenerationResult,
    ServedSchema,
    STREAM_HEADERS,
    ServerError,
    as_json,
    as_request,
    build_inputs,
    build_outputs,
    decoupled_over_http,
    final_or_none,
    infer_options,
    parse_result,
    stalled_error,
    stream_request,
    timeout_error,
    to_server_error,
)


def _aio_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as types
        import tritonclient.grpc.aio as aio
    else:
        import tritonclient.http as types
        import tritonclient.http.aio as aio
    return types, aio


async def _drain(responses, timeout_s: float = 10.0) -> None:
    """Read a stream to its end after the answer. Dropping it open makes grpc.aio cancel it, and a
    cancellation racing the answer Triton already sent can strand the request in Triton 2.51 (its
    model version then never unloads; perf/stream_cancel_race.py)."""
    import grpc

    try:
        while True:
            await asyncio.wait_for(responses.__anext__(), timeout_s)
    except (StopAsyncIteration, asyncio.TimeoutError, grpc.aio.AioRpcError):
        return


class AsyncDiffusionClient(ClientOptions):
    """asyncio client: ``await generate(...)``, or ``generate_many`` at a bounded concurrency."""

    def _connect(self) -> None:
        self._types, aio = _aio_module(self.protocol)
        self._client = aio.InferenceServerClient(self.address)

    async def schema(self) -> ServedSchema:
        """The served model's inputs and request defaults, read once from its config."""
        if self._schema is None:
            from tritonclient.utils import InferenceServerException

            try:
                config = await self._bounded(self._client.get_model_config(self.model, **as_json(self.protocol)))
            except InferenceServerException as exc:
                raise to_server_error(exc) from None
            self._schema = ServedSchema.from_config(config)
        return self._schema

    async def _bounded(self, call):
        """``call`` within ``timeout_s`` (HTTP: the aio client has no deadline of its own)."""
        if self.timeout_s is None or self.protocol == "grpc":
            return await call
        try:
            return await asyncio.wait_for(call, self.timeout_s)
        except asyncio.TimeoutError:
            raise timeout_error(self.timeout_s) from None

    async def generate(self, prompt_or_request, **options) -> GenerationResult:
        request = as_request(prompt_or_request, options)
        delays = self.retry.delays()
        while True:
            try:
                return await self._generate_once(request)
            except ServerError as exc:
                delay = next(delays, None) if exc.retryable else None
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    async def _generate_once(self, request: GenerationRequest) -> GenerationResult:
        from tritonclient.utils import InferenceServerException

        kwargs = infer_options(request, self.protocol, self.timeout_s)
        schema = await self.schema()
        inputs = build_inputs(self._types, request.tensors(schema))
        outputs = build_outputs(self._types, schema.output, schema.progress)
        started = time.perf_counter()
        try:
            if schema.decoupled:
                result = await self._stream_once(stream_request(self.model, inputs, outputs, kwargs, schema.progress),
                                                 schema.output, request.on_progress)
            else:
                result = await self._bounded(self._client.infer(self.model, inputs, outputs=outputs, **kwargs))
        except InferenceServerException as exc:
            raise to_server_error(exc) from None
        return parse_result(result, request, time.perf_counter() - started, schema.output)

    async def _stream_once(self, request: dict, output: str, on_progress=None):
        """A decoupled model's final response, over a stream opened for this request (cancelling the
        task cancels the stream, and Triton the request); progress messages go to ``on_progress``,
        and silence after the first one ends the wait."""
        import grpc

        if self.protocol != "grpc":
            raise decoupled_over_http(self.model)
        progress = "parameters" in request

        async def one_request():
            yield request

        responses = self._client.stream_infer(one_request(), stream_timeout=self.timeout_s, headers=STREAM_HEADERS)
        accepted, answered = False, False
        try:
            while True:
                try:  # before the model accepts it, the request is Triton's to answer (queue, restart)
                    if accepted:
                        result, error = await asyncio.wait_for(responses.__anext__(), self.progress_timeout_s)
                    else:
                        result, error = await responses.__anext__()
                except asyncio.TimeoutError:
                    raise stalled_error(self.progress_timeout_s) from None
                except StopAsyncIteration:
                    raise ServerError("the stream closed without a response", "StatusCode.UNAVAILABLE") from None
                except grpc.aio.AioRpcError as exc:  # the stream ended with the error's status (STREAM_HEADERS)
                    raise ServerError(exc.details() or str(exc.code()), str(exc.code())) from None
                answered = error is not None  # an error ends the request as a final answer does
                final = final_or_none(result, error, progress, output, on_progress)
                if final is not None:
                    answered = True
                    return final
                accepted = True
        finally:
            if not answered:  # cancel only what is abandoned (see DiffusionClient._stream_once)
                responses.cancel()
            else:  # let the stream end: grpc.aio cancels a call still open when it is garbage-collected
                await _drain(responses)

    async def generate_many(
        self,
        requests: Sequence[GenerationRequest],
        concurrency: int = 8,
        on_result: Optional[Callable[[int, object], None]] = None,
    ) -> list:
        """Results in request order; a failed request's slot holds its exception (``ServerError``
        for whatever the server or the deadline said) and the others go on."""
        semaphore = asyncio.Semaphore(concurrency)

        async def one(index: int, request: GenerationRequest):
            async with semaphore:
                try:
                    outcome = await self.generate(request)
                except Exception as exc:  # noqa: BLE001 - reported in the request's slot
                    outcome = exc
            if on_result:
                on_result(index, outcome)
            return outcome

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncDiffusionClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
