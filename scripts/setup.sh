#!/usr/bin/env bash
# One command to set up everything on a fresh Debian machine (no GPU, no model hub needed):
#   .venv with the pinned serving stack, the real tritonserver (nvidia-pytriton wheel),
#   perf_analyzer, this package (editable), and the embedded tiny default model.
# Idempotent: a second run checks stamps and finishes in seconds.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
VENV="$ROOT/.venv"
STAMP_DIR="$VENV/.stamps"
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
source "$ROOT/scripts/pins.sh"

# --- Debian packages: perf_analyzer's libb64 (only if missing; needs root or sudo) -------------
if ! ldconfig -p 2>/dev/null | grep -q 'libb64.so.0d'; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "installing Debian package libb64-0d (perf_analyzer runtime)"
  if ! { $SUDO apt-get install -y -qq libb64-0d >/dev/null 2>&1 || \
         { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq libb64-0d >/dev/null; }; }; then
    log "WARNING: could not install libb64-0d; perf_analyzer will not run (serving and tests are unaffected)"
  fi
fi

# --- virtual environment -----------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
mkdir -p "$STAMP_DIR"
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install -q --disable-pip-version-check)
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

req_hash=$(cat requirements.txt pyproject.toml scripts/setup.sh scripts/pins.sh | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP_DIR/requirements" 2>/dev/null)" != "$req_hash" ]; then
  log "installing pinned requirements (torch CPU, diffusers, transformers, tritonclient, locust, ...)"
  quiet "${PIP[@]}" -r requirements.txt
  log "installing the real tritonserver 2.51 ($TRITONSERVER_WHEEL, binary only)"
  quiet "${PIP[@]}" --no-deps "$TRITONSERVER_WHEEL"
  log "installing perf_analyzer (from the $PERF_ANALYZER_WHEEL wheel)"
  tmp=$(mktemp -d)
  quiet "$VPY" -m pip download -q -d "$tmp" "${PERF_ANALYZER_WHEEL_ARGS[@]}" "$PERF_ANALYZER_WHEEL"
  "$VPY" - "$tmp"/tritonclient-*.whl "$VENV/lib/perf_analyzer" <<'PY'
import sys, zipfile, os
whl, dest = sys.argv[1], sys.argv[2]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("bin/perf_analyzer"))
    with open(os.path.join(dest, "perf_analyzer"), "wb") as f:
        f.write(z.read(name))
os.chmod(os.path.join(dest, "perf_analyzer"), 0o755)
PY
  rm -rf "$tmp"
  cat > "$VENV/bin/perf_analyzer" <<PA
#!/usr/bin/env bash
# perf_analyzer 2.50 links libcudart.so.12 (from nvidia-cuda-runtime-cu12) even when run on CPU.
CUDART=\$("$VPY" -c "import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], 'lib'))")
export LD_LIBRARY_PATH="\$CUDART\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$VENV/lib/perf_analyzer/perf_analyzer" "\$@"
PA
  chmod +x "$VENV/bin/perf_analyzer"
  log "installing this project (editable)"
  quiet "${PIP[@]}" --no-deps -e .
  echo "$req_hash" > "$STAMP_DIR/requirements"
else
  log "requirements up to date"
fi

# --- promtool (checks deploy/prometheus in the tests): from Debian's prometheus package, unpacked
#     into the venv rather than installed (no service, no daemon) ------------------------------------
if [ ! -x "$VENV/bin/promtool" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "fetching promtool from Debian's prometheus package"
  tmp=$(mktemp -d)
  if ( cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 || \
        { $SUDO apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } ) \
     && dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"; then
    cp "$tmp/x/usr/bin/promtool" "$VENV/bin/promtool"
  else
    log "WARNING: could not fetch Debian's prometheus package; the promtool checks will fail"
  fi
  rm -rf "$tmp"
fi

# --- embedded default: tiny random-weight Stable Diffusion pipeline -----------------------------
"$VENV/bin/triton-diffusion" build-tiny
log "done. Serve the embedded default with:  .venv/bin/triton-diffusion serve"
