"""Running LMCache 0.5.6 beside NenCache: `benchmarks/lmcache_side.py` in its own virtualenv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv-lmcache" / "bin" / "python"
SIDE = ROOT / "benchmarks" / "lmcache_side.py"
SETUP = ROOT / "benchmarks" / "setup_lmcache.sh"


def ensure_lmcache(install: bool) -> bool:
    """True when the LMCache virtualenv is ready (set it up first if `install`)."""
    if not VENV_PYTHON.exists() and install:
        subprocess.run(["bash", str(SETUP)], check=False)
    return VENV_PYTHON.exists()


def run_lmcache(backend: str, *, layers: int, kv_heads: int, head_dim: int, dtype: str, chunk_size: int,
                chunks: int, reps: int, extra: list[str] | None = None, timeout: float = 900) -> dict:
    """LMCache's figures for one backend as a dict (with an `error` key when it could not run)."""
    command = [str(VENV_PYTHON), str(SIDE), "--backend", backend, "--layers", str(layers), "--kv-heads", str(kv_heads),
               "--head-dim", str(head_dim), "--dtype", dtype, "--chunk-size", str(chunk_size), "--chunks", str(chunks),
               "--reps", str(reps), *(extra or [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"LMCache {backend} run timed out after {timeout:.0f}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"LMCache {backend} run failed (exit {done.returncode}): {' | '.join(tail)}"}
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(ensure_lmcache(install="--install" in sys.argv))
