"""Run Triton Model Analyzer on this repository, in remote or local launch mode.

Model Analyzer is installed on demand into its own environment (``.cache/model-analyzer-venv``,
``triton-model-analyzer==1.58.0``): it pins packages the serving environment must not get.
The search itself is ``perf/model_analyzer.yaml``; this script adds what depends on the machine
(the tritonserver of ``scripts/setup.sh``, its backend directory and environment) and runs it.

    python perf/model_analyzer.py --mode remote     # against a running `triton-diffusion serve`
    python perf/model_analyzer.py --mode local      # Model Analyzer starts and stops tritonserver

Results: ``.cache/model-analyzer-results/results/metrics-model-inference.csv`` and HTML reports.

Against a server with an admin key (``TRITON_DIFFUSION_ADMIN_KEY`` or ``..._ADMIN_KEY_FILE`` set
here as for the server), the model loads and unloads Model Analyzer makes carry the key: it has no
header option of its own, so it runs under a shim that adds the key to tritonclient's
repository calls. In local mode the tritonserver it starts listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

from triton_diffusion import security
from triton_diffusion.launcher import free_port, install_python_stub, server_environment, triton_home

VENV = ROOT / ".cache" / "model-analyzer-venv"
VERSION = "1.58.0"


def model_analyzer() -> Path:
    """The model-analyzer command, installed into its own venv the first time."""
    command = VENV / "bin" / "model-analyzer"
    if not command.exists():
        print(f"installing triton-model-analyzer=={VERSION} into {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", f"triton-model-analyzer=={VERSION}"], check=True)
    return command


# tritonclient's repository calls with the admin key added (tests run this part alone)...
ADD_ADMIN_KEY = """
import os, sys
import tritonclient.grpc, tritonclient.http
key = os.environ["TRITON_DIFFUSION_ADMIN_KEY"]
for module, header in ((tritonclient.grpc, "%s"), (tritonclient.http, "%s")):
    for name in ("load_model", "unload_model", "get_model_repository_index"):
        original = getattr(module.InferenceServerClient, name)
        def keyed(self, *args, _original=original, _header=header, **kwargs):
            kwargs["headers"] = {**(kwargs.get("headers") or {}), _header: key}
            return _original(self, *args, **kwargs)
        setattr(module.InferenceServerClient, name, keyed)
""" % (security.GRPC_ADMIN_METADATA, security.ADMIN_HEADER)
# ... then Model Analyzer's own entry point
WITH_ADMIN_KEY = ADD_ADMIN_KEY + """
from model_analyzer.entrypoint import main
sys.argv[0] = "model-analyzer"
sys.exit(main())
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("remote", "local"), default="remote")
    parser.add_argument("--config", type=Path, default=ROOT / "perf" / "model_analyzer.yaml")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    env = server_environment()  # the venv first on PATH (perf_analyzer, the stub's interpreter), libpython
    if args.mode == "local":
        home = triton_home()
        install_python_stub(home)
        ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        config.update({
            "triton_launch_mode": "local",
            "triton_server_path": str(home / "bin" / "tritonserver"),
            "triton_server_flags": {"backend-directory": str(home / "backends"), "exit-on-error": "false",
                                    **{f"{api}-address": security.LOOPBACK for api in ("http", "grpc", "metrics")}},
            "triton_server_environment": {key: env[key] for key in ("PATH", "LD_LIBRARY_PATH", "HF_HUB_OFFLINE") if key in env},
            "triton_http_endpoint": f"localhost:{ports['http']}",
            "triton_grpc_endpoint": f"localhost:{ports['grpc']}",
            "triton_metrics_url": f"http://localhost:{ports['metrics']}/metrics",
        })
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    os.chdir(ROOT)
    command = [str(model_analyzer())]
    key = security.load_key(os.environ.get("TRITON_DIFFUSION_ADMIN_KEY"), os.environ.get("TRITON_DIFFUSION_ADMIN_KEY_FILE"),
                            "admin key")
    if key and args.mode == "remote":
        command = [str(VENV / "bin" / "python"), "-c", WITH_ADMIN_KEY]
        env["TRITON_DIFFUSION_ADMIN_KEY"] = key
    try:
        return subprocess.run([*command, "profile", "-f", handle.name, "--checkpoint-directory",
                               str(ROOT / ".cache" / "model-analyzer-checkpoints")], env=env).returncode
    finally:
        os.unlink(handle.name)


if __name__ == "__main__":
    sys.exit(main())
