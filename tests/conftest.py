"""Test-session setup.

Triton kernels run in the CPU interpreter when no GPU is present; the variable must be set
before triton is imported or any kernel is defined, hence here, first.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

# One thread per xdist worker (the workers already run in parallel): set before torch and
# the native extension's OpenMP runtime start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

# `python -m pytest` in the repository root puts the checkout first on sys.path, where
# `dynaguide/` is the bare source directory (no compiled extension, no kernels/export
# subpackages). The suite tests the INSTALLED package, so drop the checkout from the path.
_CHECKOUT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _CHECKOUT]

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dynaguide  # noqa: E402


def pytest_report_header(config):
    """Say which dynaguide is under test and which backends it has."""
    report = dynaguide.env_report()
    return [f"dynaguide {dynaguide.__version__} from {os.path.dirname(dynaguide.__file__)}"] + [
        f"  {k}: {v}" for k, v in report.items()
    ]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``-n N`` keep the tests marked ``xdist_group`` (the Ray cluster tests share one
    cluster per module) on one worker; every other test is spread as with ``--dist load``."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadGroupScheduling

    return LoadGroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped with that reason without one."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_global_seeds():
    """Tests that draw from the global generators (torch, numpy, random) draw the same
    numbers on every run."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
