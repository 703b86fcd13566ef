#!/usr/bin/env bash
# Create .venv-lmcache (repo root) with LMCache 0.5.6 on a CPU-only torch 2.13.0.
#
# Usage: bash benchmarks/setup_lmcache.sh [--force]
#
# lmcache==0.5.6 declares CUDA-only dependencies (cupy-cuda13x, cuda-python,
# cufile-python) and an unpinned `torch`. We install lmcache itself with
# --no-deps, then its remaining dependencies under a constraints file that pins
# torch to the CPU build, so pip can never swap in a multi-GB CUDA torch.
# The CUDA-only packages are skipped: LMCache imports them lazily and only on
# GPU code paths, which the benchmark (EngineType.MOCK connector) never takes.
set -euo pipefail

export LMCACHE_TRACK_USAGE=false

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv-lmcache"
PY="$VENV/bin/python"
MARKER="$VENV/.lmcache-setup-ok"
TORCH_VERSION="2.13.0"
LMCACHE_VERSION="0.5.6"
PYTHON="${PYTHON:-python3}"

# Dependencies of lmcache 0.5.6 (from its METADATA), minus the CUDA-only ones.
LMCACHE_DEPS=(
  aiofile aiofiles blake3 aiohttp awscrt cryptography fastapi httpx
  "huggingface_hub>=1.5.0" msgspec "numpy<=2.2.6" numba nvtx
  "opentelemetry-api>=1.20.0,<=1.40.0" "opentelemetry-sdk>=1.20.0"
  "opentelemetry-exporter-otlp>=1.20.0"
  "opentelemetry-exporter-prometheus>=0.50b0,<=0.61b0"
  "prometheus_client>=0.18.0,<=0.24.1" psutil py-cpuinfo pytest pyyaml
  "pyzmq>=25.0.0" "grpcio>=1.78.0" "grpcio-observability==1.78.0"
  "protobuf>=6.31.1,<7" redis safetensors "setuptools>=77.0.3,<81.0.0"
  "setuptools_scm>=8" sortedcontainers "transformers>=5.4" uvicorn httptools
  cachetools google-api-core google-cloud-bigtable
)

check_ok() {
  [[ -x "$PY" ]] || return 1
  LMCACHE_TRACK_USAGE=false "$PY" - "$TORCH_VERSION" "$LMCACHE_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import torch
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert not torch.version.cuda, "CUDA torch build"
assert version("lmcache") == sys.argv[2]
from lmcache.v1.cache_engine import LMCacheEngineBuilder  # noqa: F401
from lmcache.v1.config import LMCacheEngineConfig  # noqa: F401
EOF
}

if [[ "${1:-}" != "--force" && -f "$MARKER" ]] && check_ok; then
  echo "setup_lmcache: $VENV already set up (lmcache $LMCACHE_VERSION, torch $TORCH_VERSION CPU)"
  exit 0
fi

start=$(date +%s)
[[ -x "$PY" ]] || "$PYTHON" -m venv "$VENV"
rm -f "$MARKER"

PIP=("$PY" -m pip install --disable-pip-version-check --quiet)

# 1) torch CPU build. The local wheel cache (pip find-links) holds
#    torch 2.13.0+cpu on our machines; fall back to PyTorch's CPU index.
if ! "$PY" -c "import torch,sys; sys.exit(torch.__version__ != '${TORCH_VERSION}+cpu')" 2>/dev/null; then
  "${PIP[@]}" "torch==${TORCH_VERSION}+cpu" \
    || "${PIP[@]}" "torch==${TORCH_VERSION}+cpu" \
         --index-url https://download.pytorch.org/whl/cpu
fi
INSTALLED_TORCH="$("$PY" -c 'import torch; print(torch.__version__)')"
CONSTRAINTS="$VENV/torch-constraints.txt"
echo "torch==${INSTALLED_TORCH}" >"$CONSTRAINTS"

# 2) lmcache itself, without its (CUDA-pulling) dependency list.
"${PIP[@]}" --no-deps "lmcache==${LMCACHE_VERSION}"

# 3) Its CPU-usable dependencies, with torch held at the CPU build.
"${PIP[@]}" -c "$CONSTRAINTS" "${LMCACHE_DEPS[@]}"

if ! check_ok; then
  echo "setup_lmcache: import check failed in $VENV" >&2
  LMCACHE_TRACK_USAGE=false "$PY" -c "from lmcache.v1.cache_engine import LMCacheEngineBuilder" >&2 || true
  exit 1
fi
echo "lmcache==${LMCACHE_VERSION} torch==${INSTALLED_TORCH}" >"$MARKER"
echo "setup_lmcache: done in $(( $(date +%s) - start ))s ($VENV)"
