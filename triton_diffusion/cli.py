"""``triton-diffusion``: build the tiny default models and serve the model repository."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from . import security
from .launcher import (DEFAULT_MODEL_REPOSITORY, DEFAULT_MODELS, ServerConfig, ServerError, StubWatchdog, TritonServer,
                       reap_orphans)
from .overrides import BatchingOverrides, derived_repository, parse_sizes

ENV_PREFIX = "TRITON_DIFFUSION_"


def _env(name: str, default=None):
    """Flag defaults from the environment (``TRITON_DIFFUSION_<NAME>``), e.g. set by docker compose."""
    value = os.environ.get(ENV_PREFIX + name)
    return default if value is None or value == "" else value


def _admin_key(args: argparse.Namespace) -> "str | None":
    """From ``TRITON_DIFFUSION_ADMIN_KEY`` or ``--admin-key-file`` (never a flag value: ps shows those)."""
    return security.load_key(os.environ.get(ENV_PREFIX + "ADMIN_KEY"), args.admin_key_file, "admin key")


def _serve(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)  # log lines whole, for grep and tests
    try:
        admin_key = _admin_key(args)
        security.check_exposure(args.address, admin_key, "Triton", f"{ENV_PREFIX}ADMIN_KEY or --admin-key-file")
    except security.SecurityError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
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
    derived = None
    if overrides.any() or args.fronts:
        repository = derived = derived_repository(args.model_repository, args.models, overrides)
        if overrides.any():
            console.print(f"batching overrides {overrides} -> derived repository {repository}")
    try:
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
            address=args.address,
            admin_key=admin_key,
            max_inflight_mb=args.max_inflight_mb,
        )
        return _run(TritonServer(config), args, console)
    finally:
        if derived is not None:  # the derived repository lives as long as the server
            shutil.rmtree(derived, ignore_errors=True)


def _run(server: TritonServer, args: argparse.Namespace, console) -> int:
    """Start, report, supervise (watchdog, restarts, orphans when PID 1), stop cleanly."""
    from rich.table import Table

    config = server.config
    stop_requested = []
    watchdogs: list[StubWatchdog] = []

    def forward(signum, _frame):
        stop_requested.append(signum)
        for watchdog in watchdogs:  # stubs exiting on shutdown are not crashes
            watchdog._stop.set()
        console.print(f"[bold]received {signal.Signals(signum).name}: stopping tritonserver[/]")

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        server.start()
        states = server.wait_ready(args.ready_timeout)
    except (ServerError, security.SecurityError) as exc:
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
    urls = server.public_urls()
    console.print(f"listening: HTTP {urls['HTTP']}  gRPC {urls['gRPC']}  metrics {urls['metrics']}  (Ctrl-C stops)",
                  markup=False)
    if config.exposed:
        console.print(f"beyond loopback through the guard ({server.guard_limits().describe()}); tritonserver itself "
                      f"on 127.0.0.1:{server.http_url.rsplit(':', 1)[1]}", markup=False)
    console.print("admin APIs (model repository, shared memory, trace, logging): "
                  + ("need the admin key (header 'admin-key')" if config.admin_key else "open, loopback only"))
    if args.exit_when_ready:
        server.stop()
        return 0 if all(states.get(m, {}).get("state") == "READY" for m in config.models) else 1
    if not args.no_watchdog:
        ready = [m for m in config.models if states.get(m, {}).get("state") == "READY"]
        watchdogs.append(StubWatchdog(server, ready, log=lambda message: console.print(message, markup=False)).start())
    code = 0
    init = os.getpid() == 1
    while not stop_requested:
        if not server.restarting:
            if server.process.poll() is not None:
                console.print(f"[red]tritonserver exited with code {server.process.returncode}[/]")
                code = server.process.returncode or 1
                break
            if server.guard is not None and server.guard.poll() is not None:
                console.print(f"[red]the guard exited with code {server.guard.returncode}: stopping[/]")
                code = 1
                break
        if init:
            reap_orphans([p.pid for p in (server.process, server.guard) if p is not None])
        time.sleep(0.5)
    for watchdog in watchdogs:
        watchdog.stop()
    server.stop()
    return code


def _build_tiny(args: argparse.Namespace) -> int:
    from .tiny import TINY_MODELS, ensure_tiny_model

    for name in TINY_MODELS:
        path = ensure_tiny_model(name, force=args.force)
        print(f"[setup] tiny model {name}: {path}")
    return 0


def _gateway(args: argparse.Namespace) -> int:
    import uvicorn

    from .gateway import GatewaySettings, create_app

    models = tuple(m.strip() for m in (args.models or "").split(",") if m.strip())
    try:
        keys = security.load_keys(os.environ.get(ENV_PREFIX + "GATEWAY_API_KEYS"), args.api_key_file, "gateway API key")
        settings = GatewaySettings(
            triton_url=args.triton, default_model=args.model, timeout_s=args.timeout_s, api_keys=keys, models=models,
            max_body_bytes=args.max_body_mb * 1024 * 1024, max_images_in_flight=args.max_images_in_flight,
            docs=args.docs, host=args.host).check()
    except security.SecurityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings=settings)
    print(f"gateway on {args.host}:{args.port} -> {args.triton}; API key: "
          f"{'required' if keys else 'none (loopback only)'}; models: {', '.join(models) or 'any Triton serves'}",
          file=sys.stderr)
    # Bounded connections (past it uvicorn answers 503) and request headers (h11's default 16 KiB).
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                limit_concurrency=2 * args.max_images_in_flight + 64, timeout_keep_alive=30)
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
    access = serve.add_argument_group("access", "closed by default: loopback only; beyond it, the admin key and the guard")
    access.add_argument("--address", default=_env("ADDRESS", security.LOOPBACK),
                        help="where the HTTP, gRPC and metrics ports listen (env ADDRESS; default %(default)s). Beyond "
                             "loopback the guard listens there, bounds each request and forwards it to tritonserver on "
                             "127.0.0.1; it needs the admin key")
    access.add_argument("--admin-key-file", type=Path, default=_env("ADMIN_KEY_FILE"),
                        help=f"file holding the key Triton's model-repository, shared-memory, trace and logging APIs "
                             f"then require (HTTP header 'admin-key', gRPC metadata '{security.GRPC_ADMIN_METADATA}'); "
                             f"or env {ENV_PREFIX}ADMIN_KEY (env ADMIN_KEY_FILE)")
    access.add_argument("--max-inflight-mb", type=int, default=int(_env("MAX_INFLIGHT_MB", 1024)),
                        help="the guard: request MiB in flight to Triton before it refuses more (env MAX_INFLIGHT_MB)")
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
    gateway.add_argument("--models", default=_env("GATEWAY_MODELS"),
                         help="comma-separated models the gateway serves (env GATEWAY_MODELS); default: any model Triton serves")
    gateway.add_argument("--host", default=_env("GATEWAY_HOST", security.LOOPBACK),
                         help="listen address (env GATEWAY_HOST; default %(default)s); beyond loopback an API key is required")
    gateway.add_argument("--port", type=int, default=int(_env("GATEWAY_PORT", 9000)))
    gateway.add_argument("--api-key-file", type=Path, default=_env("GATEWAY_API_KEY_FILE"),
                         help=f"file of accepted API keys, one per line (env GATEWAY_API_KEY_FILE; or env "
                              f"{ENV_PREFIX}GATEWAY_API_KEYS, comma-separated); callers send 'Authorization: Bearer <key>'")
    gateway.add_argument("--timeout-s", type=float, default=None, help="per-image deadline (cancels the Triton request)")
    gateway.add_argument("--max-body-mb", type=int, default=int(_env("GATEWAY_MAX_BODY_MB", 25)),
                         help="largest request body (env GATEWAY_MAX_BODY_MB; default %(default)s)")
    gateway.add_argument("--max-images-in-flight", type=int, default=int(_env("GATEWAY_MAX_IMAGES_IN_FLIGHT", 64)),
                         help="images being made for all callers together; past it 429 (default %(default)s)")
    gateway.add_argument("--docs", action="store_true", default=_env("GATEWAY_DOCS", "0") not in ("0", "false", "no"),
                         help="serve /docs, /redoc and /openapi.json (env GATEWAY_DOCS)")
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
