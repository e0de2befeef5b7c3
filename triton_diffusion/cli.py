"""``triton-diffusion``: build the tiny default models and serve the model repository."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from .launcher import DEFAULT_MODEL_REPOSITORY, DEFAULT_MODELS, ServerConfig, ServerError, StubWatchdog, TritonServer
from .overrides import BatchingOverrides, derived_repository, parse_sizes

ENV_PREFIX = "TRITON_DIFFUSION_"


def _env(name: str, default=None):
    """Flag defaults from the environment (``TRITON_DIFFUSION_<NAME>``), e.g. set by docker compose."""
    value = os.environ.get(ENV_PREFIX + name)
    return default if value is None or value == "" else value


def _serve(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    if "stable_diffusion_tiny" in args.models:
        from .tiny import ensure_tiny_model

        ensure_tiny_model()
    overrides = BatchingOverrides(
        max_batch_size=args.max_batch_size,
        preferred_batch_sizes=None if args.preferred_batch_sizes is None else parse_sizes(args.preferred_batch_sizes),
        max_queue_delay_us=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size,
    )
    repository, models = args.model_repository, list(args.models)
    if overrides.any() or args.fronts:
        repository = derived_repository(args.model_repository, args.models, overrides)
        if overrides.any():
            console.print(f"batching overrides {overrides} -> derived repository {repository}")
    if args.fronts:
        from .front import write_front

        fronts = [write_front(repository, model) for model in args.models if (repository / model).is_dir()]
        models += [front for front in fronts if front]  # decoupled (continuous) models get none
    config = ServerConfig(
        model_repository=repository,
        models=models,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        extra_args=args.tritonserver_args,
    )
    server = TritonServer(config)
    stop_requested = []
    watchdogs: list[StubWatchdog] = []

    def forward(signum, _frame):
        stop_requested.append(signum)
        for watchdog in watchdogs:  # stubs exiting on shutdown are not crashes
            watchdog.stop()
        console.print(f"[bold]received {signal.Signals(signum).name}: stopping tritonserver[/]")
        if server.process and server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    server.start()
    try:
        states = server.wait_ready(args.ready_timeout)
    except ServerError as exc:
        console.print(f"[red]error:[/] {exc}")
        server.stop()
        return 1
    table = Table(title="tritonserver models")
    for column in ("model", "state", "reason"):
        table.add_column(column)
    for name in config.models:
        entry = states.get(name, {"state": "UNKNOWN", "reason": "not in the model repository"})
        colour = "green" if entry.get("state") == "READY" else "red"
        table.add_row(name, f"[{colour}]{entry.get('state')}[/]", entry.get("reason", ""))
    console.print(table)
    console.print(
        f"listening: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}  (Ctrl-C stops)"
    )
    if args.exit_when_ready:
        server.stop()
        return 0 if all(states.get(m, {}).get("state") == "READY" for m in config.models) else 1
    if not args.no_watchdog:
        ready = [m for m in config.models if states.get(m, {}).get("state") == "READY"]
        watchdogs.append(StubWatchdog(server, ready, log=lambda message: console.print(message, markup=False)).start())
    while server.process.poll() is None:
        time.sleep(0.5)
    for watchdog in watchdogs:
        watchdog.stop()
    return 0 if stop_requested else server.process.returncode


def _build_tiny(args: argparse.Namespace) -> int:
    from .tiny import TINY_MODELS, ensure_tiny_model

    for name in TINY_MODELS:
        path = ensure_tiny_model(name, force=args.force)
        print(f"[setup] tiny model {name}: {path}")
    return 0


def _gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from .gateway import create_app

    app = create_app(args.triton, args.model, args.timeout_s)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="triton-diffusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start tritonserver on the model repository")
    models = lambda s: [m.strip() for m in s.split(",") if m.strip()]  # noqa: E731
    serve.add_argument("--model-repository", type=Path, default=Path(_env("MODEL_REPOSITORY", DEFAULT_MODEL_REPOSITORY)))
    serve.add_argument(
        "--models", type=models, default=models(_env("MODELS", ",".join(DEFAULT_MODELS))),
        help="comma-separated models to load (explicit model control); default: %(default)s",
    )
    serve.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", 8000)))
    serve.add_argument("--grpc-port", type=int, default=int(_env("GRPC_PORT", 8001)))
    serve.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", 8002)))
    serve.add_argument("--log-verbose", type=int, default=int(_env("LOG_VERBOSE", 0)))
    knobs = serve.add_argument_group(
        "batching overrides", f"change config.pbtxt's batching at start-up (env {ENV_PREFIX}<NAME> sets the default)"
    )
    optional_int = lambda name: None if _env(name) is None else int(_env(name))  # noqa: E731
    knobs.add_argument("--max-batch-size", type=int, default=optional_int("MAX_BATCH_SIZE"), help="env MAX_BATCH_SIZE")
    knobs.add_argument(
        "--preferred-batch-sizes", default=_env("PREFERRED_BATCH_SIZES"),
        help='e.g. "8,16"; "none" removes them (env PREFERRED_BATCH_SIZES)',
    )
    knobs.add_argument("--max-queue-delay-us", type=int, default=optional_int("MAX_QUEUE_DELAY_US"), help="env MAX_QUEUE_DELAY_US")
    knobs.add_argument("--max-queue-size", type=int, default=optional_int("MAX_QUEUE_SIZE"), help="env MAX_QUEUE_SIZE")
    serve.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the models")
    serve.add_argument("--exit-when-ready", action="store_true", help="stop once ready (a start-up check)")
    serve.add_argument("--no-watchdog", action="store_true", help="do not reload models whose stub process died")
    serve.add_argument("--fronts", action=argparse.BooleanOptionalAction, default=_env("FRONTS", "0") not in ("0", "false", "no"),
                       help="also serve <model>_any: takes any subset of the optional inputs and forwards to <model>, "
                            "so plain clients batch together; max_batch_size small stubs per model (env FRONTS)")
    serve.add_argument("tritonserver_args", nargs=argparse.REMAINDER, help="after --: passed to tritonserver")
    serve.set_defaults(func=_serve)
    gateway = sub.add_parser("gateway", help="OpenAI-compatible images API in front of a running Triton")
    gateway.add_argument("--triton", default=_env("GATEWAY_TRITON", "grpc://localhost:8001"), help="Triton's gRPC address")
    gateway.add_argument("--model", default=_env("GATEWAY_MODEL", DEFAULT_MODELS[0]), help="model used when a request names none")
    gateway.add_argument("--host", default=_env("GATEWAY_HOST", "0.0.0.0"))
    gateway.add_argument("--port", type=int, default=int(_env("GATEWAY_PORT", 9000)))
    gateway.add_argument("--timeout-s", type=float, default=None, help="per-image deadline (cancels the Triton request)")
    gateway.set_defaults(func=_gateway)
    build = sub.add_parser("build-tiny", help="build the tiny random-weight models into the cache")
    build.add_argument("--force", action="store_true")
    build.set_defaults(func=_build_tiny)
    args = parser.parse_args(argv)
    if getattr(args, "tritonserver_args", None) and args.tritonserver_args[0] == "--":
        args.tritonserver_args = args.tritonserver_args[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
