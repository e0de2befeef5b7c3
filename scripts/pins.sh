# Pins installed outside requirements.txt; sourced by setup.sh and compose_smoke.sh (wheelhouse).
# tritonserver 2.51 + its Python backend + per-Python stubs; installed --no-deps.
TRITONSERVER_WHEEL="nvidia-pytriton==0.7.0"
# Only its perf_analyzer binary is used (later tritonclient wheels no longer ship it).
PERF_ANALYZER_WHEEL="tritonclient==2.50.0"
PERF_ANALYZER_WHEEL_ARGS=(--no-deps --only-binary=:all: --platform manylinux1_x86_64 --python-version 3 --implementation py)
