"""SmooSeg as a DynaGuide guide: ``guidance="smooseg"`` with ``{"checkpoint": PATH}``.

The dataset-level SmooSeg classes of an image become the pseudo-labels that steer the
per-image refinement (:mod:`dynaguide.guidance`). The checkpoint and its backbone are loaded
once: the registry factory keeps the guides it built, keyed by the checkpoint's resolved
path, size, modification time and options, so the per-image ``get_guide`` calls of a run
reuse one predictor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SmooSegGuide"]

_CACHE: dict[tuple, SmooSegGuide] = {}
_CACHE_SIZE = 4


class SmooSegGuide:
    """Class ids of a trained SmooSeg head as guide labels.

    Parameters
    ----------
    checkpoint : path
        ``checkpoint.pt`` from ``dynaguide smooseg train``.
    resolution, flip, device, backbone
        As for :class:`dynaguide.smooseg.predict.SmooSegPredictor`.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        resolution: int = 320,
        flip: bool = True,
        device: str = "cpu",
        backbone: Any = None,
    ) -> None:
        from dynaguide.smooseg.predict import SmooSegPredictor

        self.predictor = SmooSegPredictor(
            checkpoint, backbone=backbone, resolution=resolution, flip=flip, device=device
        )
        self.name = "smooseg"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) int32 SmooSeg class ids of an (H, W, 3) uint8 RGB image."""
        return self.predictor(image)

    def __repr__(self) -> str:
        p = self.predictor
        return f"SmooSegGuide({str(p.path)!r}, K={p.n_classes}, backbone={p.backbone.name!r})"


def smooseg_guide_factory(
    checkpoint: str | os.PathLike | None = None, **options: Any
) -> SmooSegGuide:
    """Registry factory: ``get_guide("smooseg", checkpoint=PATH, **options)``, cached."""
    if checkpoint is None:
        raise ValueError(
            "the 'smooseg' guide needs checkpoint=<checkpoint.pt from dynaguide smooseg train>, "
            "e.g. guidance_options={'checkpoint': 'run/checkpoint.pt'}"
        )
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"smooseg guide: checkpoint {str(path)!r} does not exist")
    st = path.stat()
    hashable = all(isinstance(v, (str, int, float, bool, type(None))) for v in options.values())
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, tuple(sorted(options.items())))
    if hashable and key in _CACHE:
        return _CACHE[key]
    guide = SmooSegGuide(path, **options)
    if hashable:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = guide
    return guide
