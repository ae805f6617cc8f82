"""Refuse, at once and with advice, to run dynaguide from its source checkout.

The source directory ``dynaguide/`` is not the package that gets installed: the compiled
extension ``dynaguide._native`` is built by CMake, and ``dynaguide.kernels`` and
``dynaguide.export`` are the top-level ``kernels/`` and ``export/`` folders, mapped into
the package only by the build (``[tool.scikit-build.wheel.packages]`` in pyproject.toml).
Python started in the repository root finds the bare source directory first; rather than
run with those parts silently missing, ``import dynaguide`` raises :class:`ImportError`
saying how to install (as numpy does). An editable install (``pip install -e .``) maps the
parts in and passes the check.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["BUILT_PARTS", "SOURCE_TREE_MESSAGE", "check_not_source_tree", "missing_parts"]

#: The parts an installed dynaguide has and the bare source directory lacks.
BUILT_PARTS: tuple[str, ...] = ("dynaguide._native", "dynaguide.kernels", "dynaguide.export")

SOURCE_TREE_MESSAGE = (
    "you are importing dynaguide from its source tree ({root}), which lacks {missing} (they "
    "exist only in an installed package); install it with `pip install .` (or "
    "`pip install -e .` for development) and run Python from another directory, or with "
    "`python -P` so that the current directory is not searched first"
)


def missing_parts() -> list[str]:
    """The :data:`BUILT_PARTS` that the imported ``dynaguide`` package cannot find."""
    missing = []
    for name in BUILT_PARTS:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def _is_checkout(root: Path) -> bool:
    """Whether ``root`` (the folder above the package) is a dynaguide source checkout."""
    return (root / "CMakeLists.txt").is_file() and (root / "csrc").is_dir()


def check_not_source_tree() -> None:
    """Raise :class:`ImportError` when ``dynaguide`` was imported from a source checkout that
    lacks its built parts; do nothing for an installed (or editable-installed) package."""
    root = Path(__file__).resolve().parent.parent
    if not _is_checkout(root):
        return
    missing = missing_parts()
    if missing:
        raise ImportError(SOURCE_TREE_MESSAGE.format(root=root, missing=", ".join(missing)))
