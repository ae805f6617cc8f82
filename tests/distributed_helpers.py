"""Shared by the tests of dynaguide.distributed: small images and the optional-import rule."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

#: Settings small enough for a 2-core machine: 32x32 images, 2 iterations, no guide.
FAST = {"guidance": None, "max_iter": 2, "seed": 0}


def require(module: str) -> Any:
    """Import ``module``; skip when it is missing, except on CI (CI=true), where it must be
    installed (the ``test`` extra includes it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} must be installed on CI (pip install '.[test]'): {exc}")
        pytest.skip(f"{module} is not installed (pip install 'dynaguide[ray]')")


def write_image(path: Path, seed: int, size: int = 32) -> Path:
    """A two-region RGB image with noise (so the refinement has something to find)."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:, : size // 2] = rng.integers(0, 128, 3)
    img[:, size // 2 :] = rng.integers(128, 256, 3)
    noise = rng.integers(-20, 21, img.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8)).save(path)
    return path


def write_folder(folder: Path, n: int, *, corrupt: str | None = None) -> list[Path]:
    """``n`` images ``img0.png``... in ``folder``, plus an undecodable ``corrupt`` file."""
    paths = [write_image(folder / f"img{i}.png", seed=i) for i in range(n)]
    if corrupt is not None:
        (folder / corrupt).write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return paths


def json_without_timing(path: Path) -> dict[str, Any]:
    """A result JSON minus the fields that differ between two runs (wall time) and the
    CLI's own resume bookkeeping (``run``: settings fingerprint and file digests)."""
    data = json.loads(path.read_text())
    data.pop("seconds")
    data.pop("run", None)
    return data
