"""The ``Guide`` protocol and the registry of named guides.

A guide turns an RGB image into a global pseudo-label map. Built-in weight-free guides
(``kmeans``, ``felzenszwalb``, ``slic``) register here on import of
:mod:`dynaguide.guidance`; learned guides (ONNX SegFormer, DiffSeg-style attention
merging) register from their own modules with factories that take a local checkpoint
path. Nothing heavy is imported until a guide is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Guide(Protocol):
    """Anything that maps an image to pseudo-labels.

    ``__call__`` receives an RGB ``uint8`` array of shape (H, W, 3) and returns an
    integer array of shape (H, W) (any label values; they are aligned to the CNN's
    channels by overlap later). A negative label means "no guidance for this pixel".
    """

    name: str

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Return an (H, W) integer label map for an (H, W, 3) uint8 RGB image."""
        ...


GuideFactory = Callable[..., Guide]
_REGISTRY: dict[str, tuple[GuideFactory, str]] = {}


def register_guide(
    name: str, factory: GuideFactory, *, description: str = "", overwrite: bool = False
) -> None:
    """Register ``factory(**options) -> Guide`` under ``name``.

    Raises
    ------
    ValueError
        If ``name`` is taken and ``overwrite`` is False.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"guide name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"guide factory for {name!r} must be callable, got {factory!r}")
    key = name.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"a guide named {name!r} is already registered")
    _REGISTRY[key] = (factory, description)


def available_guides() -> dict[str, str]:
    """Names of the registered guides and their one-line descriptions."""
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def get_guide(name: str, **options: Any) -> Guide:
    """Build the registered guide ``name`` with ``options``.

    Raises
    ------
    KeyError
        With the list of known names, if ``name`` is not registered.
    """
    if not isinstance(name, str):
        raise KeyError(f"unknown guide {name!r} (guide names are strings)")
    key = name.lower()
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise KeyError(f"unknown guide {name!r}; registered guides: {known}")
    return _REGISTRY[key][0](**options)


def check_rgb_image(image: Any, name: str) -> np.ndarray:
    """Return ``image`` if it is a non-empty (H, W, 3) uint8 array, else raise ValueError."""
    if not (
        isinstance(image, np.ndarray)
        and image.ndim == 3
        and image.shape[2] == 3
        and image.dtype == np.uint8
    ):
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(
            f"{name} expects an (H, W, 3) uint8 RGB array, got shape {shape} dtype {dtype}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} got an empty image of shape {image.shape}")
    return image
