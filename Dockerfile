# The serving image: the same pinned environment and launcher as ./scripts/setup.sh, on Debian.
#
# Why not the NGC tritonserver image: the project pins one stack (tritonserver 2.51 from the
# nvidia-pytriton wheel, its Python-backend stub, numpy<2, torch, diffusers) and tests it in CI on
# Debian; this image runs that same stack, so what CI tests is what the container serves. The
# PyPI torch wheel brings its own CUDA libraries; a GPU host needs only the NVIDIA driver and the
# container toolkit. BASE_IMAGE may be any Debian bookworm image (debian:bookworm-slim by default,
# or one made from Debian packages with debootstrap where no registry is reachable).
#
# Offline (air-gapped) builds: fill docker/wheelhouse/ (scripts/compose_smoke.sh shows how) and
# pass PIP_OFFLINE=1: pip then installs only from there. The base image must then already have
# APT_PACKAGES; otherwise they are installed with apt-get.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS runtime
# nginx: the load balancer of the compose "replicas" profile (the same image runs it)
ARG APT_PACKAGES="python3 python3-venv libpython3.11 libb64-0d curl ca-certificates nginx"
ENV DEBIAN_FRONTEND=noninteractive
RUN missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done); \
    if [ -n "$missing" ]; then \
      apt-get update && apt-get install -y --no-install-recommends $missing && rm -rf /var/lib/apt/lists/*; \
    fi

FROM runtime AS build
ARG PIP_OFFLINE=0
# PyPI's torch 2.13 is built for CUDA 13 (NVIDIA driver >= 580). For older drivers point this at
# a PyTorch index of another CUDA, e.g. https://download.pytorch.org/whl/cu128.
ARG TORCH_INDEX_URL=""
WORKDIR /app
COPY docker/wheelhouse/ /tmp/wheelhouse/
# The heavy, rarely changing part first, so that editing the sources rebuilds in seconds.
COPY requirements.txt ./
RUN if [ "$PIP_OFFLINE" = 1 ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wheelhouse; fi; \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi; \
    python3 -m venv .venv && .venv/bin/pip install -q --no-cache-dir --disable-pip-version-check -r requirements.txt
COPY . .
RUN if [ "$PIP_OFFLINE" = 1 ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wheelhouse; fi; \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi; \
    PIP_NO_CACHE_DIR=1 ./scripts/setup.sh \
    && .venv/bin/python -c "from triton_diffusion.launcher import install_python_stub, triton_home; install_python_stub(triton_home())"

# The final image: runtime packages + /app (sources, .venv, the tiny model); no wheelhouse.
FROM runtime
WORKDIR /app
COPY --from=build /app /app
ENV PATH=/app/.venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    PYTHONUNBUFFERED=1
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=30 \
  CMD curl -fsS http://localhost:${TRITON_DIFFUSION_HTTP_PORT:-8000}/v2/health/ready || exit 1
# Models and batching knobs come from TRITON_DIFFUSION_* variables (see docker-compose.yml).
# Closed by default: the ports listen on the container's loopback until TRITON_DIFFUSION_ADDRESS
# says otherwise, which needs an admin key (TRITON_DIFFUSION_ADMIN_KEY_FILE, e.g. a mounted secret):
#   docker run -p 127.0.0.1:8000:8000 -e TRITON_DIFFUSION_ADDRESS=0.0.0.0 \
#     -e TRITON_DIFFUSION_ADMIN_KEY_FILE=/run/secrets/admin_key -v $PWD/secrets/admin_key:/run/secrets/admin_key:ro ...
# The launcher is PID 1 here: it reaps the processes a restarted tritonserver leaves behind.
CMD ["triton-diffusion", "serve"]
