"""Guidance: global pseudo-labels that steer the per-image refinement.

``guidance=`` in :func:`dynaguide.segment` accepts ``None``/``"none"``, a registered name
(``kmeans``, ``felzenszwalb``, ``slic``, and the learned guides registered by
:mod:`dynaguide.guidance.segformer` / :mod:`dynaguide.guidance.diffseg`), a label array,
a :class:`Guide` instance, or any callable ``rgb_uint8 -> (H, W) labels``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from dynaguide.errors import GuideError
from dynaguide.guidance.align import IGNORE_INDEX, GuideAligner
from dynaguide.guidance.base import Guide, available_guides, get_guide, register_guide
from dynaguide.guidance.classic import FelzenszwalbGuide, KMeansGuide, SlicGuide

__all__ = [
    "IGNORE_INDEX",
    "FelzenszwalbGuide",
    "Guide",
    "GuideAligner",
    "KMeansGuide",
    "SlicGuide",
    "available_guides",
    "compute_guide_labels",
    "get_guide",
    "register_guide",
]

register_guide(
    "kmeans",
    KMeansGuide,
    description="k-means (k=5) on LAB colour: the released code's 'DiffSeg' guide",
)
register_guide(
    "felzenszwalb", FelzenszwalbGuide, description="Felzenszwalb graph segmentation (scikit-image)"
)
register_guide("slic", SlicGuide, description="SLIC superpixels (scikit-image)")


def _lazy_factory(module: str, attr: str) -> Callable[..., Any]:
    """A guide factory that imports ``module`` (and its ONNX plumbing) only when a guide
    is built, so ``import dynaguide`` stays light."""

    def factory(**options: Any) -> Any:
        return getattr(importlib.import_module(module), attr)(**options)

    factory.__qualname__ = factory.__name__ = f"{module}.{attr}"
    return factory


register_guide(
    "segformer",
    _lazy_factory("dynaguide.guidance.segformer", "segformer_guide_factory"),
    description="SegFormer class ids via ONNX Runtime "
    "(options: checkpoint=folder or .onnx, device, backend)",
)
register_guide(
    "diffseg",
    _lazy_factory("dynaguide.guidance.diffseg", "diffseg_guide_factory"),
    description="DiffSeg attention merging over ViT/DINO/DINOv2 self-attention "
    "via ONNX Runtime "
    "(options: checkpoint=folder or .onnx, tau, num_points, layers, size, refine)",
)
register_guide(
    "smooseg",
    _lazy_factory("dynaguide.smooseg.guide", "smooseg_guide_factory"),
    description="SmooSeg class ids from a trained head "
    "(options: checkpoint=checkpoint.pt, resolution, flip, device, backbone)",
)


def _call_guide(
    guide: Callable[[np.ndarray], Any], image: np.ndarray, label: str, name: str
) -> Any:
    """``guide(image)``; any failure becomes a :class:`GuideError` (or a MemoryError) naming
    the guide and the image, with the guide's exception as its cause."""
    try:
        return guide(image)
    except MemoryError as exc:
        raise MemoryError(f"guide {label!r} ran out of memory on {name}") from exc
    except Exception as exc:
        raise GuideError(
            f"guide {label!r} failed on {name}: {type(exc).__name__}: {exc}".strip()
        ) from exc


def compute_guide_labels(
    guidance: Any, image: np.ndarray, *, options: dict[str, Any] | None = None, name: str = "image"
) -> tuple[np.ndarray | None, str | None]:
    """Resolve ``guidance`` and return (labels (H, W) int32 or None, guide name or None).

    Parameters
    ----------
    guidance : None, str, array, Guide or callable
    image : ndarray (H, W, 3) uint8 RGB
        The image the labels must cover (already at refinement size).
    options : dict, optional
        Keyword options for a registered guide's factory.
    name : str
        Name of the input, for error messages.

    Raises
    ------
    ValueError, TypeError
        When the guidance or its output has the wrong type or shape.
    GuideError
        When the guide itself raised (the guide's exception is the ``__cause__``).
    """
    if guidance is None or (isinstance(guidance, str) and guidance.lower() == "none"):
        return None, None
    h, w = image.shape[:2]
    if isinstance(guidance, str):
        guide: Callable[[np.ndarray], np.ndarray] = get_guide(guidance, **(options or {}))
        label = guidance.lower()
    elif isinstance(guidance, np.ndarray) or (
        hasattr(guidance, "__array__") and not callable(guidance)
    ):
        guide = None  # type: ignore[assignment]
        label = "array"
    elif callable(guidance):
        guide = guidance
        label = getattr(guidance, "name", getattr(guidance, "__name__", type(guidance).__name__))
    else:
        raise TypeError(
            f"guidance for {name} must be None, a guide name, a label array or a callable, "
            f"got {type(guidance).__name__}"
        )
    raw = guidance if guide is None else _call_guide(guide, image, label, name)
    if type(raw).__module__.startswith("torch") and hasattr(raw, "detach"):
        raw = raw.detach().cpu().numpy() if raw.device.type != "meta" else raw
    try:
        labels = np.asarray(raw)
    except Exception as exc:
        raise TypeError(
            f"guide {label!r} for {name} gave a {type(raw).__name__} that is not a label array "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if labels.ndim == 3 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.shape != (h, w):
        raise ValueError(
            f"guide {label!r} for {name} gave labels of shape {labels.shape}, expected {(h, w)}"
        )
    if labels.dtype.kind not in "iub":
        if (
            labels.dtype.kind == "f"
            and np.all(np.isfinite(labels))
            and np.all(labels == np.round(labels))
        ):
            labels = labels.astype(np.int64)
        else:
            raise TypeError(
                f"guide {label!r} for {name} gave non-integer labels of dtype {labels.dtype}"
            )
    if labels.size and (
        labels.max() > np.iinfo(np.int32).max or labels.min() < np.iinfo(np.int32).min
    ):
        raise ValueError(f"guide {label!r} for {name} gave labels outside the int32 range")
    return labels.astype(np.int32), label
