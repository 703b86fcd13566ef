"""The reuse model's counts on disk, beside the disk tier's chunks, so a restart keeps what was learned."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from nencache.policy.model import ReuseModel

log = logging.getLogger("nencache.policy")

STATE_FILE = "reuse-model.npz"  # not a chunk file: the disk tier's scan and `clear` leave it alone


def save_model(directory: Path, model: ReuseModel) -> None:
    """Write the model's counts atomically (temporary file, then rename)."""
    tmp = directory / f".{STATE_FILE}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **model.state())
        os.replace(tmp, directory / STATE_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def load_model(directory: Path, model: ReuseModel) -> bool:
    """Adopt the saved counts, if any; a damaged or foreign file is logged and ignored (the model starts fresh)."""
    path = directory / STATE_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            state = {name: data[name] for name in data.files}
    except FileNotFoundError:
        return False
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        log.warning("reuse model state %s cannot be read (%s); the model starts fresh", path, exc)
        return False
    if not model.load_state(state):
        log.warning("reuse model state %s was written by another model version; the model starts fresh", path)
        return False
    return True
