#!/usr/bin/env bash
# Bring the CPU compose stack up for real and check it serves images, then tear it all down.
#
#   ./scripts/compose_smoke.sh            (as root, or with sudo; Debian/Ubuntu host)
#
# On a machine like this one (no Docker registry, no running daemon) it:
#   1. installs docker.io / docker-compose / debootstrap with apt-get if missing, starts dockerd;
#   2. uses BASE_IMAGE if present or pullable, else builds a Debian bookworm base image from
#      Debian packages (debootstrap | docker import) with the packages the Dockerfile needs;
#   3. fills docker/wheelhouse/ with `pip download` and builds offline (PIP_OFFLINE=1);
#   4. `compose --profile cpu up -d` with batching overrides from the environment, waits for the
#      health check, sends text-to-image and image-to-image requests with the project's client,
#      checks images, seeds, batching and the overrides, runs the locust service briefly;
#   5. `compose down -v` and stops the daemon it started.
# Exit codes: 0 passed, 1 failed, 77 no Docker engine can run on this machine (skipped).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { printf '\033[1m[compose-smoke %s]\033[0m %s\n' "$(date +%T)" "$*"; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
WORK="$ROOT/.cache/compose-smoke"
mkdir -p "$WORK"
STARTED_DOCKERD=""
PROJECT="tdsmoke$$"
BASE_IMAGE=${BASE_IMAGE:-debian:bookworm-slim}
LOCAL_BASE="local/debian:bookworm-nginx"  # rebuilt when the package list changes
T0=$(date +%s)

./scripts/setup.sh >/dev/null   # the host-side client and pip (idempotent, seconds when done)
VPY="$ROOT/.venv/bin/python"

# --- 1. Docker engine and compose ----------------------------------------------------------------
apt_install() { $SUDO apt-get install -y -qq "$@" >/dev/null 2>&1 || { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq "$@" >/dev/null; }; }
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing docker.io and debootstrap (apt-get)"
  apt_install docker.io debootstrap
fi
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (log: $WORK/dockerd.log)"
  $SUDO sh -c "nohup dockerd >'$WORK/dockerd.log' 2>&1 & echo \$! >'$WORK/dockerd.pid'"
  STARTED_DOCKERD=1
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  if ! docker info >/dev/null 2>&1; then
    log "dockerd did not start on this machine; last lines of its log:"
    tail -5 "$WORK/dockerd.log" || true
    exit 77
  fi
fi
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  command -v docker-compose >/dev/null || { log "installing docker-compose (apt-get)"; apt_install docker-compose; }
  COMPOSE=(docker-compose)
fi
log "engine $(docker version --format '{{.Server.Version}}'), $("${COMPOSE[@]}" version | head -1)"

DC=("${COMPOSE[@]}" -p "$PROJECT" --profile cpu --profile load --profile replicas)
cleanup() {
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 77 ]; then
    log "FAILED (exit $rc); container logs:"
    "${DC[@]}" logs --no-color --tail 60 2>/dev/null || true
  fi
  "${DC[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  if [ -n "$STARTED_DOCKERD" ]; then
    log "stopping the dockerd this script started"
    $SUDO kill "$(cat "$WORK/dockerd.pid")" 2>/dev/null || true
  fi
  log "total $(( $(date +%s) - T0 )) s"
}
trap cleanup EXIT

# --- 2. base image ---------------------------------------------------------------------------------
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && ! timeout 60 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
  if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    log "no registry: building $LOCAL_BASE from Debian packages (debootstrap)"
    rootfs="$WORK/rootfs"
    $SUDO rm -rf "$rootfs"
    $SUDO debootstrap --variant=minbase \
      --include=python3,python3-venv,libpython3.11,libb64-0d,curl,ca-certificates,nginx \
      bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    $SUDO rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    $SUDO tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' - "$LOCAL_BASE" >/dev/null
    $SUDO rm -rf "$rootfs"
  fi
  BASE_IMAGE="$LOCAL_BASE"
fi
export BASE_IMAGE
log "base image: $BASE_IMAGE"

# --- 3. offline wheelhouse + image -----------------------------------------------------------------
source scripts/pins.sh
wheel_stamp=$(cat requirements.txt scripts/pins.sh | sha256sum | cut -c1-16)
if [ "$(cat docker/wheelhouse/.stamp 2>/dev/null)" != "$wheel_stamp" ]; then
  log "filling docker/wheelhouse (pip download; pip's cache makes this quick on a second machine run)"
  "$VPY" -m pip download -q --disable-pip-version-check -d docker/wheelhouse -r requirements.txt \
    "$TRITONSERVER_WHEEL" "setuptools>=64" wheel 2>&1 | { grep -v "is ignored: it is neither" || true; }
  "$VPY" -m pip download -q --disable-pip-version-check -d docker/wheelhouse "${PERF_ANALYZER_WHEEL_ARGS[@]}" \
    "$PERF_ANALYZER_WHEEL" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  echo "$wheel_stamp" > docker/wheelhouse/.stamp
else
  log "docker/wheelhouse is up to date ($(ls docker/wheelhouse/*.whl | wc -l) wheels)"
fi
export PIP_OFFLINE=1
t=$(date +%s)
log "building triton-diffusion:latest (offline, from the wheelhouse)"
"${DC[@]}" build triton-cpu >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
log "image built in $(( $(date +%s) - t )) s: $(docker image inspect triton-diffusion:latest --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"

# --- 4. up, health, requests -------------------------------------------------------------------------
free_port() { "$VPY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export HTTP_PORT=$(free_port) GRPC_PORT=$(free_port) METRICS_PORT=$(free_port) GATEWAY_PORT=$(free_port)
# keys of this run only (the compose file mounts them as secrets)
./scripts/make_keys.sh "$WORK/secrets" >/dev/null
export ADMIN_KEY_FILE="$WORK/secrets/admin_key" GATEWAY_API_KEYS_FILE="$WORK/secrets/gateway_api_keys"
# Batching knobs through the environment, checked below in the served config.
export MAX_QUEUE_DELAY_US=50000 PREFERRED_BATCH_SIZES=4 MAX_QUEUE_SIZE=32
t=$(date +%s)
log "compose up (cpu profile; host ports HTTP $HTTP_PORT, gRPC $GRPC_PORT, metrics $METRICS_PORT)"
"${DC[@]}" up -d triton-cpu >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; exit 1; }
container=$("${DC[@]}" ps -q triton-cpu)
for _ in $(seq 120); do
  health=$(docker inspect -f '{{.State.Health.Status}}' "$container")
  [ "$health" = healthy ] && break
  [ "$(docker inspect -f '{{.State.Running}}' "$container")" = true ] || { log "the container exited"; exit 1; }
  sleep 2
done
[ "$health" = healthy ] || { log "not healthy after 240 s (state: $health)"; exit 1; }
log "healthy in $(( $(date +%s) - t )) s (Docker health check on /v2/health/ready)"

for port in $("${DC[@]}" port triton-cpu 8000) $("${DC[@]}" port triton-cpu 8001) $("${DC[@]}" port triton-cpu 8002); do
  case "$port" in 127.0.0.1:*) ;; *) log "a host port is bound beyond loopback: $port"; exit 1 ;; esac
done
log "host ports bound to loopback (BIND_ADDRESS unset)"

"$VPY" - "$GRPC_PORT" "$HTTP_PORT" "$METRICS_PORT" "$ADMIN_KEY_FILE" <<'PY'
import json, sys, urllib.error, urllib.request
import numpy as np
from client import DiffusionClient, GenerationRequest, ServerError

grpc_port, http_port, metrics_port, key_file = sys.argv[1:5]
model = "stable_diffusion_tiny"
index = f"http://127.0.0.1:{http_port}/v2/repository/index"
try:
    urllib.request.urlopen(urllib.request.Request(index, method="POST"))
    raise AssertionError("the repository API answered without the admin key")
except urllib.error.HTTPError as exc:
    assert exc.code == 403, exc.code
key = open(key_file).read().strip()
with urllib.request.urlopen(urllib.request.Request(index, method="POST", headers={"admin-key": key})) as response:
    assert any(entry.get("state") == "READY" for entry in json.load(response))
print("[check] admin API: 403 without the key, 200 with it (Triton's restriction, through the guard)")
with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/{model}/config") as response:
    config = json.load(response)
batching = config["dynamic_batching"]
assert int(batching["max_queue_delay_microseconds"]) == 50000, batching
assert [int(s) for s in batching["preferred_batch_size"]] == [4], batching
assert int(batching["default_queue_policy"]["max_queue_size"]) == 32, batching
print("[check] batching overrides from the environment are in the served config:",
      {k: batching[k] for k in ("max_queue_delay_microseconds", "preferred_batch_size")},
      "max_queue_size", batching["default_queue_policy"]["max_queue_size"])

requests = [GenerationRequest(f"compose smoke {i}", seed=40 + i) for i in range(4)]
for url in (f"grpc://127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"):
    with DiffusionClient(url, model, timeout_s=120) as client:
        results = client.generate_many(requests, concurrency=4)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors
        assert [r.seed for r in results] == [40, 41, 42, 43]
        assert all(r.array.shape == (128, 128, 3) and r.array.std() > 1 for r in results)
        solo = client.generate(requests[2])
        assert np.abs(solo.array.astype(int) - results[2].array.astype(int)).max() <= 1, "batched != solo"
        edit = client.generate("compose smoke edit", seed=7, init_image=results[0].array, strength=0.6)
        assert edit.array.shape == (128, 128, 3)
        try:
            client.generate("bad size", height=100, width=128)
            raise AssertionError("a bad request was accepted")
        except ServerError as exc:
            rejection = f"{exc.status}: {exc}"
        assert "multiple of 8" in rejection, rejection
        print(f"[check] {url.split(':')[0]}: 4 batched text-to-image images, seeds {[r.seed for r in results]}, "
              f"solo replay equal, image-to-image ok, bad size rejected ({rejection[:70]})")
with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/{model}/stats") as response:
    stats = json.load(response)["model_stats"][0]
print(f"[check] statistics: {stats['inference_count']} inferences in {stats['execution_count']} executions, "
      f"batches {sorted((int(b['batch_size']), int(b['compute_infer']['count'])) for b in stats['batch_stats'])}")
assert stats["execution_count"] < stats["inference_count"], "no request was batched"
with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
    assert "diffusion_images_total" in response.read().decode()
print("[check] metrics port serves the diffusion_* metrics")
PY

t=$(date +%s)
log "gateway-cpu: the OpenAI API with an API key"
"${DC[@]}" up -d gateway-cpu >"$WORK/gateway.log" 2>&1 || { cat "$WORK/gateway.log"; exit 1; }
gateway=$("${DC[@]}" ps -q gateway-cpu)
for _ in $(seq 60); do
  [ "$(docker inspect -f '{{.State.Health.Status}}' "$gateway")" = healthy ] && break
  sleep 2
done
"$VPY" - "$GATEWAY_PORT" "$GATEWAY_API_KEYS_FILE" <<'PY'
import sys
import openai
port, key = sys.argv[1], open(sys.argv[2]).read().split()[0]
try:
    openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-the-key", max_retries=0).images.generate(prompt="x")
    raise AssertionError("the gateway answered a wrong key")
except openai.AuthenticationError:
    pass
image = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0).images.generate(
    prompt="a red circle on a blue background", size="64x64", extra_body={"seed": 3, "steps": 4})
assert image.data[0].b64_json and image.data[0].seed == 3
print("[check] gateway: 401 for a wrong key, an image for the right one")
PY
log "gateway checked in $(( $(date +%s) - t )) s"

t=$(date +%s)
log "locust service (profile load): 4 users for 20 s against triton-cpu"
mkdir -p perf/out
LOCUST_DURATION=20s "${DC[@]}" run --rm locust >"$WORK/locust.log" 2>&1 || { tail -30 "$WORK/locust.log"; exit 1; }
# locust's final table: one line per request kind, then the aggregate
grep -E "[0-9]+\([0-9.]+%\)" "$WORK/locust.log" | tail -3
log "locust done in $(( $(date +%s) - t )) s, no failures"

# --- 5. replicas behind nginx; one is killed mid-load, the client's retries lose nothing ----------
"${DC[@]}" stop triton-cpu >/dev/null 2>&1   # its CPU cores go to the replicas
export HTTP_PORT=$(free_port) GRPC_PORT=$(free_port)
t=$(date +%s)
log "replicas profile: 2 CPU replicas behind nginx (host ports HTTP $HTTP_PORT, gRPC $GRPC_PORT)"
"${DC[@]}" up -d --scale triton-replica=2 lb >"$WORK/replicas.log" 2>&1 || { cat "$WORK/replicas.log"; exit 1; }
lb=$("${DC[@]}" ps -q lb)
for _ in $(seq 120); do
  [ "$(docker inspect -f '{{.State.Health.Status}}' "$lb")" = healthy ] && break
  sleep 2
done
replicas=$("${DC[@]}" ps -q triton-replica | tr '\n' ' ')
[ "$(echo $replicas | wc -w)" -eq 2 ] || { log "expected 2 replicas, got: $replicas"; exit 1; }
log "balancer healthy in $(( $(date +%s) - t )) s; replicas: $replicas"
"$VPY" - "$GRPC_PORT" $replicas <<'PY'
import subprocess, sys, threading
from client import DiffusionClient, GenerationRequest, RetryPolicy

grpc_port, victim = sys.argv[1], sys.argv[2]
total, kill_after = 24, 6
finished = []
enough_done = threading.Event()


def on_result(index, outcome):
    finished.append(index)
    if len(finished) >= kill_after:
        enough_done.set()


def kill_mid_load():
    enough_done.wait()
    subprocess.run(["docker", "kill", victim], check=True, capture_output=True)
    print(f"[check] killed replica {victim[:12]} after {len(finished)} of {total} requests had finished", flush=True)


requests = [GenerationRequest(f"replica smoke {i}", seed=100 + i) for i in range(total)]
killer = threading.Thread(target=kill_mid_load)
killer.start()
with DiffusionClient(f"grpc://127.0.0.1:{grpc_port}", "stable_diffusion_tiny", timeout_s=300,
                     retry=RetryPolicy(attempts=8, initial_backoff_s=0.5)) as client:
    results = client.generate_many(requests, concurrency=4, on_result=on_result)
killer.join()
failures = [r for r in results if isinstance(r, Exception)]
state = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}}", victim], capture_output=True, text=True).stdout.strip()
print(f"[check] {total - len(failures)}/{total} requests succeeded through the balancer, {len(failures)} lost, "
      f"{client.retries} retried attempts; killed replica now: {state}")
assert not failures, failures
assert [r.seed for r in results] == [100 + i for i in range(total)]
PY
log "replica failover done in $(( $(date +%s) - t )) s, no request lost"

log "PASSED"
