"""Start the real ``tritonserver`` (from the nvidia-pytriton wheel) on this model repository.

Handles what a bare ``tritonserver`` command gets wrong outside NVIDIA's container: the Python
backend stub for the running interpreter, PATH so the stub finds this virtual environment,
LD_LIBRARY_PATH so it loads this interpreter's libpython, and a shared-memory prefix unique to
this server (two servers on one host must not share regions; the regions a dead stub leaves
behind are removed when the server stops).

Closed by default (``security.py``): tritonserver always binds 127.0.0.1. With an admin key its
model-repository, shared-memory, trace and logging APIs need it. Asked to listen beyond loopback
(``address``), it needs the key, and the guard (``guard.py``) listens there in its place and
bounds every request before it reaches Triton.
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

from . import security

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
DEFAULT_MODELS = ("tiny_shapes", "tiny_shapes_dit", "stable_diffusion_tiny")  # the first is the gateway's default


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


SHM_ROOT = Path("/dev/shm")


def remove_shared_memory(prefix: str) -> list[str]:
    """Remove the Python backend's shared-memory regions named ``prefix*`` (those of one server):
    Triton 2.51 never unlinks the region of a stub that died holding requests, not even on exit."""
    removed = []
    for path in SHM_ROOT.glob(prefix + "*") if prefix else ():
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
    return removed


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
    # Where the ports listen. Beyond loopback the guard listens there and tritonserver on
    # 127.0.0.1 (internal ports); that needs admin_key.
    address: str = security.LOOPBACK
    admin_key: Optional[str] = None  # puts Triton's admin APIs behind the key (security.py)
    max_inflight_mb: int = 1024  # the guard's cap on request bytes in flight to Triton

    @property
    def exposed(self) -> bool:
        return not security.is_loopback(self.address)


class StubWatchdog:
    """Bring back a model whose Python-backend stub process died, and free what the death left.

    Triton 2.51 keeps such a model READY but fails every request with "Stub process ... is not
    healthy" and does not restart the stub. Worse, if the stub died holding requests (mid-call in
    dynamic mode, or rows of a running batch in continuous mode), Triton keeps a reference to the
    model for each of them, forever: their clients (continuous mode) never get an answer, the
    version never finishes unloading, the dead stub stays a zombie, its shared memory stays mapped,
    and shutdown waits out its exit timeout (measured; Triton's own code marks decoupled restart
    as a TODO).

    So, ``grace_s`` after it sees a death, the watchdog unloads the model. If the unload completes
    within ``unload_timeout_s`` the stub held nothing: the model is loaded again with the config it
    was served with, and only it was affected. Otherwise nothing but a new tritonserver process
    can free that version: the server is restarted (``TritonServer.restart``), which also ends
    every connection still waiting on the dead stub with an error.

    A stub also goes away when Triton reloads the model (a config loaded through the API, Model
    Analyzer's candidates): Triton starts the new instances first and retires the old ones. So a
    vanished stub is a crash only while the model is READY *and* fewer stubs are alive than its
    served config has instances, and still so after ``grace_s``.
    """

    # A stub that held nothing unloads in 1.5-2 s here; other models get drain_timeout_s to finish
    # their running requests before the restart. Together (with the poll and the grace) they keep a
    # stranded client's error within 30 s: 1 + 2 + 5 + 15 s and the stop.
    def __init__(self, server: "TritonServer", models: Sequence[str], interval: float = 1.0, grace_s: float = 2.0,
                 unload_timeout_s: float = 5.0, drain_timeout_s: float = 15.0, log=print):
        import threading

        self.server, self.models, self.interval, self.grace_s, self.log = server, list(models), interval, grace_s, log
        self.unload_timeout_s, self.drain_timeout_s = unload_timeout_s, drain_timeout_s
        self.reloads: list[str] = []
        self.restarts: list[str] = []  # models whose death cost a server restart
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
            expected = self.stubs() if vanished else current  # a reload or restart starts new stubs
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
        self.log(f"[watchdog] stub of {model} died: recovering the model in {self.grace_s:.0f}s")
        # Still short after the grace period (and not stopping): a crash, not a reload in flight.
        return not self._stop.wait(self.grace_s) and self._short_of_stubs(model)

    def _recover(self, model: str) -> None:
        try:
            if self.server.unload_within(model, self.unload_timeout_s):
                self.server.load_model(model, self._served.get(model))
                self.reloads.append(model)
                self.log(f"[watchdog] {model} reloaded")
            else:
                self.log(f"[watchdog] {model} cannot unload: its dead stub held requests, which Triton 2.51 never "
                         "releases; restarting tritonserver to free them")
                self.server.restart(stuck=[model], drain_timeout=self.drain_timeout_s)
                self.restarts.append(model)
                self.log(f"[watchdog] tritonserver restarted ({model} READY: "
                         f"{self.server.model_states().get(model, {}).get('state') == 'READY'})")
        except Exception as exc:  # keep watching the other models
            self.log(f"[watchdog] recovering {model} failed: {exc}")

    @property
    def _served(self) -> dict:
        return self.server.last_unloaded_configs


class TritonServer:
    """A tritonserver process: ``with TritonServer(config) as server: ...``."""

    def __init__(self, config: ServerConfig, log_path: Optional[Path] = None):
        self.config = config
        self.log_path = log_path
        self.process: Optional[subprocess.Popen] = None
        self.guard: Optional[subprocess.Popen] = None
        self.shm_prefix = ""
        self.restarts = 0
        self.restarting = False  # a supervisor loop must not take the gap for an exit
        self.last_unloaded_configs: dict[str, dict] = {}
        self._log_file = None
        # tritonserver's own ports: the public ones, or internal loopback ones behind the guard
        self._ports = (config.http_port, config.grpc_port, config.metrics_port)

    # Where this host reaches tritonserver itself (loopback): what the launcher, the watchdog,
    # tests and benchmarks use. ``public_urls`` says where clients elsewhere connect.
    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self._ports[0]}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self._ports[1]}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self._ports[2]}/metrics"

    def public_urls(self) -> dict[str, str]:
        host = self.config.address if ":" not in self.config.address else f"[{self.config.address}]"
        return {"HTTP": f"{host}:{self.config.http_port}", "gRPC": f"{host}:{self.config.grpc_port}",
                "metrics": f"http://{host}:{self.config.metrics_port}/metrics"}

    def command(self) -> list[str]:
        home = triton_home()
        cfg = self.config
        http_port, grpc_port, metrics_port = self._ports
        cmd = [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={Path(cfg.model_repository).resolve()}",
            f"--backend-directory={home / 'backends'}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in cfg.models),
            # tritonserver listens on loopback only, always (the guard is what listens beyond it)
            f"--http-address={security.LOOPBACK}",
            f"--grpc-address={security.LOOPBACK}",
            f"--metrics-address={security.LOOPBACK}",
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
            f"--metrics-port={metrics_port}",
            # One model that cannot load must not take the server (or the other models) down.
            "--exit-on-error=false",
            "--strict-readiness=false",
            f"--log-verbose={cfg.log_verbose}",
            f"--backend-config=python,shm-default-byte-size={cfg.shm_default_bytes}",
            f"--backend-config=python,shm-growth-byte-size={cfg.shm_default_bytes}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *security.restriction_flags(cfg.admin_key),
            *cfg.extra_args,
        ]
        return cmd

    def printable_command(self) -> list[str]:
        return security.redact(self.command(), {"admin key": self.config.admin_key or ""})

    def start(self) -> "TritonServer":
        if self.running:
            raise RuntimeError(f"tritonserver (pid {self.process.pid}) is already running; stop it first")
        cfg = self.config
        security.check_exposure(cfg.address, cfg.admin_key, "Triton", "an admin key (--admin-key-file)")
        if cfg.exposed and self._ports == (cfg.http_port, cfg.grpc_port, cfg.metrics_port):
            self._ports = (free_port(), free_port(), free_port())
        install_python_stub(triton_home())
        self.shm_prefix = f"tdiff_{uuid.uuid4().hex[:12]}_"
        env = server_environment()
        env.update(cfg.env)
        stdout = None
        if self.log_path is not None and self._log_file is None:
            self._log_file = open(self.log_path, "ab")
        if self._log_file is not None:
            stdout = self._log_file
        self.process = subprocess.Popen(
            self.command(), env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None
        )
        if cfg.exposed and not (self.guard and self.guard.poll() is None):
            self._start_guard(stdout)
        return self

    def guard_limits(self):
        """The guard's limits: the largest valid request of every model this server loads."""
        from . import guard, model_config

        configs = []
        for model in self.config.models:
            path = Path(self.config.model_repository) / model / "config.pbtxt"
            try:
                configs.append(model_config.as_dict(model_config.load(path)))
            except Exception:  # noqa: BLE001 - a model that cannot be read cannot load either
                continue
        return guard.limits_for(configs, self.config.max_inflight_mb * guard.MIB)

    def _start_guard(self, stdout) -> None:
        cfg, limits = self.config, self.guard_limits()
        command = [sys.executable, "-m", "triton_diffusion.guard", "--listen", cfg.address,
                   "--http", f"{cfg.http_port}={self.http_url}", "--grpc", f"{cfg.grpc_port}={self.grpc_url}",
                   "--metrics", f"{cfg.metrics_port}=127.0.0.1:{self._ports[2]}",
                   "--grpc-max-message-bytes", str(limits.grpc_message_bytes),
                   "--http-max-body-bytes", str(limits.http_body_bytes),
                   "--max-inflight-bytes", str(limits.max_inflight_bytes),
                   "--max-concurrent-calls", str(limits.max_concurrent_calls)]
        self.guard = subprocess.Popen(command, env=server_environment(), stdout=stdout,
                                      stderr=subprocess.STDOUT if stdout else None)

    def _get(self, path: str, method: str = "GET", timeout: float = 2.0, body: Optional[dict] = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://{self.http_url}{path}", method=method, data=data,
                                         headers=security.admin_headers(self.config.admin_key))
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
            if self.guard is not None and self.guard.poll() is not None:
                raise ServerError(f"the guard exited with code {self.guard.returncode} {self._log_hint()}")
            if self.is_live() and self._guard_listens():
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
        finishes (a stuck unload is ``StubWatchdog``'s business).
        """
        config = self.served_config(model)
        self._get(f"/v2/repository/models/{model}/unload", method="POST", timeout=timeout)
        self.load_model(model, config, timeout)

    def unload_within(self, model: str, timeout: float) -> bool:
        """Unload ``model``; whether it finished unloading within ``timeout`` seconds. Its served
        config is kept in ``last_unloaded_configs`` for loading it again."""
        self.last_unloaded_configs[model] = self.served_config(model)
        deadline = time.monotonic() + timeout
        try:
            self._get(f"/v2/repository/models/{model}/unload", method="POST", timeout=timeout)
        except (OSError, ValueError):  # the call itself can block on a stuck unload
            pass
        while time.monotonic() < deadline:
            if self._states_or_empty().get(model, {}).get("state") not in ("READY", "UNLOADING"):
                return True
            time.sleep(0.2)
        return False

    def _guard_listens(self) -> bool:
        if self.guard is None:
            return True
        import socket

        host = "127.0.0.1" if self.config.address in ("0.0.0.0", "::") else self.config.address
        for port in (self.config.http_port, self.config.grpc_port, self.config.metrics_port):
            try:
                socket.create_connection((host, port), timeout=1).close()
            except OSError:
                return False
        return True

    def _log_hint(self) -> str:
        return f"(log: {self.log_path})" if self.log_path else "(see its output above)"

    def stop(self, timeout: float = 30.0, stop_guard: bool = True) -> Optional[int]:
        """SIGTERM (tritonserver drains in-flight requests), SIGKILL after ``timeout``; then the
        shared memory its stubs left behind is removed."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
            remove_shared_memory(self.shm_prefix)
        if stop_guard and self.guard is not None and self.guard.poll() is None:
            self.guard.terminate()
            try:
                self.guard.wait(10)
            except subprocess.TimeoutExpired:
                self.guard.kill()
                self.guard.wait()
        if stop_guard and self._log_file:
            self._log_file.close()
            self._log_file = None
        return code

    def restart(self, stuck: Sequence[str] = (), drain_timeout: float = 15.0, ready_timeout: float = 600.0) -> dict:
        """Stop tritonserver and start it again on the same ports, with the same models.

        The only way to free a model version Triton 2.51 will never finish unloading (a stub that
        died holding requests; see ``StubWatchdog``). The other models are unloaded first, which
        lets their running requests finish (at most ``drain_timeout``); then the process is
        stopped. That closes every connection still waiting on a stuck model, so each of its clients
        gets an error. The models come back with the configs they were served with. The guard keeps
        listening (a call in the gap gets UNAVAILABLE).
        """
        self.restarting = True
        try:
            return self._restart(stuck, drain_timeout, ready_timeout)
        finally:
            self.restarting = False

    def _restart(self, stuck: Sequence[str], drain_timeout: float, ready_timeout: float) -> dict:
        served = {}
        for model, entry in self._states_or_empty().items():
            if entry.get("state") == "READY" and model not in stuck:
                try:
                    served[model] = self.served_config(model)
                except OSError:
                    pass
        # Drain while the server is fully up (after SIGTERM Triton 2.51 answers its repository index
        # with "Server not ready", so a drain could not be watched): unloading a model completes
        # once its running requests are done; new ones get UNAVAILABLE meanwhile.
        for model in served:
            try:
                self._get(f"/v2/repository/models/{model}/unload", method="POST", timeout=5)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and any(
                self._states_or_empty().get(model, {}).get("state") in ("READY", "UNLOADING") for model in served):
            time.sleep(0.2)
        self.stop(timeout=1, stop_guard=False)
        self.restarts += 1
        self.start()
        states = self.wait_ready(ready_timeout)
        for model, config in served.items():
            if model not in self.config.models or self.served_config(model) != config:
                self.load_model(model, config)
        return states

    def _states_or_empty(self) -> dict[str, dict]:
        try:
            return self.model_states()
        except (OSError, ValueError):
            return {}

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "TritonServer":
        # ``with harness.serve(...) as server`` enters a server already started: it must not start a
        # second process (which would leave the first one running after the block)
        return self if self.running else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def reap_orphans(managed: Sequence[int]) -> list[int]:
    """Reap exited children that no ``Popen`` waits for. Only needed where this process is PID 1
    (a container's init): processes orphaned by a killed tritonserver (a stub that already died)
    are re-parented to it. ``managed`` PIDs are left to their ``Popen``."""
    reaped = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None or info.si_pid in managed:
            return reaped
        os.waitpid(info.si_pid, 0)
        reaped.append(info.si_pid)
