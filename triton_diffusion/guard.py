"""The guard: what listens beyond loopback when Triton is exposed, so every request is bounded.

Triton 2.51 has no request-size limit of its own: its gRPC server accepts messages up to 2 GiB and
its HTTP server any body (``--http-max-input-size`` came in a later release). A tensor is copied
into the model's stub shared memory before the model can look at it, and that region never
shrinks. So when ``triton-diffusion serve --address`` is not loopback, tritonserver still binds
127.0.0.1 (on internal ports) and this process listens on the public address instead, passing
every call through unchanged (gRPC methods as raw bytes, with their metadata, deadline and
cancellation; HTTP requests and streamed responses) except:

- a gRPC message larger than the largest valid request is refused by gRPC itself
  (RESOURCE_EXHAUSTED) before it is read, and an HTTP body likewise (413);
- request bytes of unary calls and HTTP bodies in flight towards Triton are capped
  (``max_inflight_bytes``): past it a call is refused at once (gRPC RESOURCE_EXHAUSTED, HTTP 503)
  rather than queued in memory (a stream's messages pass straight on, each bounded);
- concurrent calls and HTTP header sizes are bounded, and an HTTP body must arrive within
  ``body_timeout_s``.

The admin key is not checked here: Triton checks it (``security.restriction_flags``); the
guard forwards the header like any other. Metrics (GET only) are passed through on their port.

    python -m triton_diffusion.guard --listen 0.0.0.0 --http 8000=127.0.0.1:18000 \\
        --grpc 8001=127.0.0.1:18001 --metrics 8002=127.0.0.1:18002 --grpc-max-message-bytes 16777216
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

log = logging.getLogger("triton_diffusion.guard")

MIB = 1024 * 1024
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
# HTTP/1.1 hop-by-hop headers: never forwarded (RFC 9110 7.6.1)
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length"}


# -- the limits (pure) --------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    grpc_message_bytes: int  # one gRPC message (a request of a stream counts alone)
    http_body_bytes: int  # one HTTP request body
    max_inflight_bytes: int = 1024 * MIB  # request bytes on their way to Triton, all calls together
    max_concurrent_calls: int = 512
    body_timeout_s: float = 60.0  # an HTTP body must arrive within this (slow senders hold memory)

    def describe(self) -> str:
        return (f"gRPC message <= {self.grpc_message_bytes / MIB:.1f} MiB, HTTP body <= {self.http_body_bytes / MIB:.1f} MiB, "
                f"<= {self.max_inflight_bytes / MIB:.0f} MiB in flight, <= {self.max_concurrent_calls} calls")


def largest_request_bytes(config: Mapping[str, Any]) -> int:
    """Tensor bytes of the largest request a model's config admits (``max_batch_size`` rows, each
    with the longest prompts and the largest source image it accepts)."""
    from .schema import INPUT_KINDS, PIXELS, TEXT, TEXT_BYTES, Schema
    from .settings import ModelSettings

    schema = Schema.from_model_config(config)
    settings = ModelSettings.from_model_config(config)
    rows = max(1, int(config.get("max_batch_size", 1) or 1))
    per_row = 0
    for name in schema.inputs:
        kind = INPUT_KINDS[name]
        if kind == TEXT:
            per_row += TEXT_BYTES.get(name, settings.limits.max_prompt_bytes) + 4  # BYTES elements carry a 4-byte length
        elif kind == PIXELS:
            per_row += settings.limits.max_input_image_pixels * 3
        else:
            per_row += 8
    return rows * per_row


def limits_for(configs: Iterable[Mapping[str, Any]], max_inflight_bytes: int = 1024 * MIB,
               floor_bytes: int = 4 * MIB) -> Limits:
    """Limits that admit the largest valid request of every model in ``configs`` (configs this
    backend cannot read, e.g. a front's, count as ``floor_bytes``). The HTTP body may be JSON, where
    a uint8 takes up to 4 characters ("255,")."""
    largest = floor_bytes
    for config in configs:
        try:
            largest = max(largest, largest_request_bytes(config))
        except ValueError:
            continue
    grpc = largest + MIB  # protobuf framing, input names, parameters
    return Limits(grpc_message_bytes=grpc, http_body_bytes=4 * largest + MIB,
                  max_inflight_bytes=max(max_inflight_bytes, 2 * grpc))


class ByteBudget:
    """Request bytes on their way to Triton; ``take`` refuses (returns False) past the budget."""

    def __init__(self, limit: int):
        self.limit, self.used, self.refused = limit, 0, 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            self.refused += 1
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


# -- gRPC -----------------------------------------------------------------------------------------
def _forwarded_metadata(context) -> list:
    return [(key, value) for key, value in (context.invocation_metadata() or ())
            if not key.startswith(":") and key not in ("user-agent", "grpc-timeout", "content-type", "te")]


class GrpcPassThrough:
    """A generic handler: every method of Triton's service, as raw bytes, to the upstream channel."""

    def __init__(self, upstream: str, limits: Limits, budget: ByteBudget):
        import grpc

        self.grpc = grpc
        self.limits, self.budget = limits, budget
        self.channel = grpc.aio.insecure_channel(upstream, options=[
            ("grpc.max_send_message_length", limits.grpc_message_bytes),
            ("grpc.max_receive_message_length", -1),  # responses (images, videos) are Triton's to size
        ])

    def handler(self):
        grpc = self.grpc
        outer = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                if details.method == STREAM_METHOD:
                    return grpc.stream_stream_rpc_method_handler(outer._stream(details.method))
                return grpc.unary_unary_rpc_method_handler(outer._unary(details.method))

        return Handler()

    async def _refuse_over_budget(self, context, size: int) -> None:
        await context.abort(self.grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the server is holding its limit of {self.limits.max_inflight_bytes / MIB:.0f} MiB of requests; "
                            f"retry later ({size} bytes refused)")

    def _unary(self, method: str):
        call = self.channel.unary_unary(method)

        async def forward(request: bytes, context):
            size = len(request)
            if not self.budget.take(size):
                await self._refuse_over_budget(context, size)
            try:
                response = await call(request, metadata=_forwarded_metadata(context), timeout=context.time_remaining())
            except self.grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
            finally:
                self.budget.give(size)
            return response

        return forward

    def _stream(self, method: str):
        call = self.channel.stream_stream(method)

        # A stream's messages are each bounded by the message limit and pass straight on (a stream
        # may live for hours: its bytes are not held here); Triton's queue limits bound the rest.
        async def forward(requests, context):
            upstream = call(requests, metadata=_forwarded_metadata(context), timeout=context.time_remaining())
            try:
                async for response in upstream:
                    yield response
            except self.grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
            finally:
                upstream.cancel()  # the client went away (or the stream ended): Triton cancels what is left

        return forward


async def start_grpc(listen: str, upstream: str, limits: Limits, budget: ByteBudget):
    import grpc

    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limits.grpc_message_bytes),
                 ("grpc.max_send_message_length", -1),
                 ("grpc.max_concurrent_streams", 256)],
        maximum_concurrent_rpcs=limits.max_concurrent_calls,
    )
    server.add_generic_rpc_handlers((GrpcPassThrough(upstream, limits, budget).handler(),))
    if not server.add_insecure_port(listen):
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    return server


# -- HTTP -----------------------------------------------------------------------------------------
def http_app(upstream: str, limits: Limits, budget: ByteBudget, methods: Optional[set] = None):
    """An aiohttp application forwarding every path to ``upstream`` (``host:port``)."""
    import aiohttp
    from aiohttp import web

    state: dict = {}
    calls = asyncio.Semaphore(limits.max_concurrent_calls)

    async def session() -> aiohttp.ClientSession:
        if "session" not in state:
            state["session"] = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                connector=aiohttp.TCPConnector(limit=limits.max_concurrent_calls), auto_decompress=False)
        return state["session"]

    def error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def forward(request: web.Request) -> web.StreamResponse:
        if methods is not None and request.method not in methods:
            return error(405, f"{request.method} is not allowed here")
        declared = request.content_length
        if declared is not None and declared > limits.http_body_bytes:
            return error(413, f"the body is {declared} bytes; the limit is {limits.http_body_bytes}")
        if calls.locked():
            return error(503, "too many requests in flight; retry later")
        async with calls:
            try:
                body = await asyncio.wait_for(request.read(), limits.body_timeout_s)
            except web.HTTPRequestEntityTooLarge:
                return error(413, f"the body exceeds the limit of {limits.http_body_bytes} bytes")
            except asyncio.TimeoutError:
                return error(408, f"the body did not arrive within {limits.body_timeout_s:g}s")
            if not budget.take(len(body)):
                return error(503, f"the server is holding its limit of {limits.max_inflight_bytes / MIB:.0f} MiB of "
                                  "requests; retry later")
            try:
                headers = {key: value for key, value in request.headers.items() if key.lower() not in _HOP_BY_HOP}
                client = await session()
                async with client.request(request.method, f"http://{upstream}{request.rel_url}", headers=headers,
                                          data=body if body else None, allow_redirects=False) as answer:
                    response = web.StreamResponse(status=answer.status, reason=answer.reason)
                    for key, value in answer.headers.items():
                        if key.lower() not in _HOP_BY_HOP:
                            response.headers[key] = value
                    if answer.content_length is not None:
                        response.content_length = answer.content_length
                    await response.prepare(request)
                    async for chunk in answer.content.iter_any():  # generate_stream: each event as it comes
                        await response.write(chunk)
                    await response.write_eof()
                    return response
            except aiohttp.ClientError as exc:
                return error(502, f"Triton is not reachable: {exc}")
            finally:
                budget.give(len(body))

    async def close(_app):
        if "session" in state:
            await state["session"].close()

    app = web.Application(client_max_size=limits.http_body_bytes)
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_cleanup.append(close)
    return app


async def start_http(host: str, port: int, app):
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=256)
    await site.start()
    return runner


# -- the process ------------------------------------------------------------------------------------
def _route(text: str) -> tuple[int, str]:
    """``8000=127.0.0.1:18000`` -> (8000, "127.0.0.1:18000")."""
    port, _, upstream = text.partition("=")
    if not upstream:
        raise argparse.ArgumentTypeError(f"expected PORT=HOST:PORT, got {text!r}")
    return int(port), upstream


async def serve(listen: str, http: Optional[tuple], grpc_route: Optional[tuple], metrics: Optional[tuple],
                limits: Limits) -> None:
    budget = ByteBudget(limits.max_inflight_bytes)
    closers = []
    if grpc_route:
        address = f"[{listen}]:{grpc_route[0]}" if ":" in listen else f"{listen}:{grpc_route[0]}"
        server = await start_grpc(address, grpc_route[1], limits, budget)
        closers.append(lambda: server.stop(5))
    if http:
        runner = await start_http(listen, http[0], http_app(http[1], limits, budget))
        closers.append(runner.cleanup)
    if metrics:
        runner = await start_http(listen, metrics[0], http_app(metrics[1], limits, budget, methods={"GET", "HEAD"}))
        closers.append(runner.cleanup)
    print(f"guard listening on {listen}: {limits.describe()}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for close in closers:
        await close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triton_diffusion.guard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--http", type=_route)
    parser.add_argument("--grpc", type=_route)
    parser.add_argument("--metrics", type=_route)
    parser.add_argument("--grpc-max-message-bytes", type=int, required=True)
    parser.add_argument("--http-max-body-bytes", type=int, required=True)
    parser.add_argument("--max-inflight-bytes", type=int, default=1024 * MIB)
    parser.add_argument("--max-concurrent-calls", type=int, default=512)
    args = parser.parse_args(argv)
    limits = Limits(args.grpc_max_message_bytes, args.http_max_body_bytes, args.max_inflight_bytes, args.max_concurrent_calls)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.listen, args.http, args.grpc, args.metrics, limits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
