"""Which dynaguide this is: its version and the commit it was built from.

Both come from the installed package's build metadata, never from a git checkout that
happens to surround the running code: the version from the distribution metadata
(:func:`importlib.metadata.version`), the commit from ``dynaguide/_build_info.py``, which
CMakeLists.txt writes when the package is built (git HEAD of the source tree, ``+dirty``
with uncommitted changes to tracked files, ``"unknown"`` when the source had no git history,
e.g. a build from an sdist). Every JSON dynaguide or its benchmarks write records these two
through :func:`code_version`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

__all__ = ["UNKNOWN", "build_commit", "code_version", "package_version"]

#: What :func:`build_commit` and :func:`package_version` say when the metadata is missing.
UNKNOWN = "unknown"


def package_version() -> str:
    """The installed distribution's version (``"0.0.0+unknown"`` without an install)."""
    try:
        return version("dynaguide")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def build_commit() -> str:
    """The commit the installed package was built from, ``"<sha>[+dirty]"`` or ``"unknown"``."""
    try:
        info = importlib.import_module("dynaguide._build_info")
    except ImportError:
        return UNKNOWN
    commit = getattr(info, "COMMIT", UNKNOWN)
    return commit if isinstance(commit, str) and commit else UNKNOWN


def code_version() -> dict[str, str]:
    """``{"dynaguide": version, "git_commit": commit}`` for result files."""
    return {"dynaguide": package_version(), "git_commit": build_commit()}
