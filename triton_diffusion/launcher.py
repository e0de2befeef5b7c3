"""Start the real ``tritonserver`` (from the nvidia-pytriton wheel) on this model repository.

Handles what a bare ``tritonserver`` command gets wrong outside NVIDIA's container: the Python
backend stub for the running interpreter, PATH so the stub finds this virtual environment,
LD_LIBRARY_PATH so it loads this interpreter's libpython, and a shared-memory prefix unique to
this server (two servers on one host must not share regions).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
DEFAULT_MODELS = ("tiny_shapes", "stable_diffusion_tiny")  # the first is the gateway's default


class ServerError(RuntimeError):
    """tritonserver could not be started or did not become ready."""


def triton_home() -> Path:
    """The tritonserver tree shipped in the nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("tritonserver not found: install nvidia-pytriton==0.7.0 (scripts/setup.sh does)")
    home = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (home / "bin" / "tritonserver").is_file():
        raise ServerError(f"no tritonserver binary under {home}")
    return home


def install_python_stub(home: Path) -> None:
    """Put the Python-backend stub built for this interpreter's version where the backend looks."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not source.is_file():
        raise ServerError(f"the tritonserver wheel has no Python-backend stub for Python {version}")
    target = home / "backends" / "python" / "triton_python_backend_stub"
    if not target.is_file() or target.stat().st_size != source.stat().st_size:
        shutil.copy2(source, target)
    target.chmod(0o755)


def server_environment(base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.executable).parent)
    # The stub's embedded interpreter finds the venv through python3 on PATH, not PYTHONPATH.
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def model_statistics(http_url: str, model: str) -> dict:
    """A model's entry of Triton's statistics API (counts, batch_stats, queue and compute times)."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=30) as response:
        return json.load(response)["model_stats"][0]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerConfig:
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    models: Sequence[str] = DEFAULT_MODELS
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_verbose: int = 0
    shm_default_bytes: int = 16 * 1024 * 1024
    extra_args: Sequence[str] = ()
    env: dict = field(default_factory=dict)  # added to the server's environment


class StubWatchdog:
    """Reload a model whose Python-backend stub process died.

    Triton 2.51 keeps such a model READY but fails every request with "Stub process ... is not
    healthy" and does not restart the stub; a plain load request is a no-op. Unloading and
    loading the model again starts a fresh stub. This thread does that ``grace_s`` after it sees
    the death, once Triton has failed the dead stub's in-flight execution.

    A stub also goes away when Triton reloads the model (a config loaded through the API, Model
    Analyzer's candidates): Triton starts the new instances first and retires the old ones. So a
    vanished stub is a crash only while the model is READY *and* fewer stubs are alive than its
    served config has instances, and still so after ``grace_s``. The reload keeps the served
    config (``TritonServer.reload_model``).
    """

    def __init__(self, server: "TritonServer", models: Sequence[str], interval: float = 1.0, grace_s: float = 2.0, log=print):
        import threading

        self.server, self.models, self.interval, self.grace_s, self.log = server, list(models), interval, grace_s, log
        self.reloads: list[str] = []
        self.polls = 0  # checks done so far (tests wait on it)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stub-watchdog", daemon=True)

    def stubs(self) -> dict[str, set[int]]:
        """Live stub PIDs per model (a stub's command line names its model's model.py)."""
        import psutil

        found: dict[str, set[int]] = {model: set() for model in self.models}
        try:
            children = psutil.Process(self.server.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return found
        for child in children:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                command = child.cmdline()
            except psutil.Error:
                continue
            if command and command[0].endswith("triton_python_backend_stub") and len(command) > 1:
                model = Path(command[1]).parent.parent.name
                if model in found:
                    found[model].add(child.pid)
        return found

    def start(self) -> "StubWatchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        expected = self.stubs()
        while not self._stop.wait(self.interval):
            current = self.stubs()
            vanished = [m for m in self.models if expected.get(m) and not expected[m] <= current.get(m, set())]
            for model in vanished:
                if self._crashed(model):
                    self._recover(model)
            expected = self.stubs() if vanished else current  # a reload starts new stubs
            self.polls += 1

    def _short_of_stubs(self, model: str) -> bool:
        """READY with fewer live stubs than instances: what a crash leaves. An unload or a stopping
        server is not READY; a reload's new stubs are alive."""
        try:
            if self.server.model_states().get(model, {}).get("state") != "READY":
                return False
            config = self.server.served_config(model)
        except OSError:  # the server itself is going away, or the model with it
            return False
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
        return len(self.stubs().get(model, ())) < instances

    def _crashed(self, model: str) -> bool:
        if not self._short_of_stubs(model):
            return False
        self.log(f"[watchdog] stub of {model} died: reloading the model in {self.grace_s:.0f}s")
        # Still short after the grace period (and not stopping): a crash, not a reload in flight.
        return not self._stop.wait(self.grace_s) and self._short_of_stubs(model)

    def _recover(self, model: str) -> None:
        try:
            self.server.reload_model(model)
            self.reloads.append(model)
            self.log(f"[watchdog] {model} reloaded")
        except Exception as exc:  # keep watching the other models
            self.log(f"[watchdog] reloading {model} failed: {exc}")


class TritonServer:
    """A tritonserver process: ``with TritonServer(config) as server: ...``."""

    def __init__(self, config: ServerConfig, log_path: Optional[Path] = None):
        self.config = config
        self.log_path = log_path
        self.process: Optional[subprocess.Popen] = None
        self._log_file = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config.metrics_port}/metrics"

    def command(self) -> list[str]:
        home = triton_home()
        cfg = self.config
        cmd = [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={Path(cfg.model_repository).resolve()}",
            f"--backend-directory={home / 'backends'}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in cfg.models),
            f"--http-port={cfg.http_port}",
            f"--grpc-port={cfg.grpc_port}",
            f"--metrics-port={cfg.metrics_port}",
            # One model that cannot load must not take the server (or the other models) down.
            "--exit-on-error=false",
            "--strict-readiness=false",
            f"--log-verbose={cfg.log_verbose}",
            f"--backend-config=python,shm-default-byte-size={cfg.shm_default_bytes}",
            f"--backend-config=python,shm-growth-byte-size={cfg.shm_default_bytes}",
            f"--backend-config=python,shm-region-prefix-name=tdiff_{uuid.uuid4().hex[:12]}_",
            *cfg.extra_args,
        ]
        return cmd

    def start(self) -> "TritonServer":
        if self.running:
            raise RuntimeError(f"tritonserver (pid {self.process.pid}) is already running; stop it first")
        install_python_stub(triton_home())
        env = server_environment()
        env.update(self.config.env)
        stdout = None
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")
            stdout = self._log_file
        self.process = subprocess.Popen(
            self.command(), env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None
        )
        return self

    def _get(self, path: str, method: str = "GET", timeout: float = 2.0, body: Optional[dict] = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://{self.http_url}{path}", method=method, data=data)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            return response.status, (json.loads(body) if body else None)

    def is_live(self) -> bool:
        try:
            return self._get("/v2/health/live")[0] == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def model_states(self) -> dict[str, dict]:
        """``{model: {"state": ..., "reason": ...}}`` from the repository index."""
        _, index = self._get("/v2/repository/index", method="POST", timeout=10)
        return {entry["name"]: entry for entry in index or []}

    def wait_ready(self, timeout: float = 300.0) -> dict[str, dict]:
        """Wait until the server answers and every requested model has left LOADING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} {self._log_hint()}")
            if self.is_live():
                states = self.model_states()
                pending = [m for m in self.config.models if states.get(m, {}).get("state") in (None, "LOADING")]
                if not pending:
                    return states
            time.sleep(0.5)
        raise ServerError(
            f"tritonserver was not ready within {timeout:.0f}s (models {list(self.config.models)}) {self._log_hint()}"
        )

    def served_config(self, model: str) -> dict:
        """The config Triton serves ``model`` with (after defaults and any config loaded through the API)."""
        return self._get(f"/v2/models/{model}/config", timeout=10)[1]

    def load_model(self, model: str, config: Optional[dict] = None, timeout: float = 120.0) -> None:
        """Load (or reload) ``model``; ``config`` replaces its config.pbtxt for this load, as
        ``tritonclient``'s ``load_model(config=...)`` and Model Analyzer do."""
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else None
        self._get(f"/v2/repository/models/{model}/load", method="POST", timeout=timeout, body=body)

    def reload_model(self, model: str, timeout: float = 120.0) -> None:
        """Unload then load ``model`` with the config it is served with now: a fresh stub process.

        The served config is kept, so a config loaded through the API survives (re-reading
        config.pbtxt would silently revert it). The load is sent at once, not after the unload
        finishes: the unload of a model whose stub died may never finish (Triton 2.51 keeps
        waiting on the dead instance), the load does.
        """
        config = self.served_config(model)
        self._get(f"/v2/repository/models/{model}/unload", method="POST", timeout=timeout)
        self.load_model(model, config, timeout)

    def _log_hint(self) -> str:
        return f"(log: {self.log_path})" if self.log_path else "(see its output above)"

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)  # tritonserver drains in-flight requests on SIGTERM
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._log_file:
            self._log_file.close()
        return self.process.returncode

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "TritonServer":
        # ``with harness.serve(...) as server`` enters a server already started: it must not start a
        # second process (which would leave the first one running after the block)
        return self if self.running else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
