"""dynaguide: unsupervised image segmentation by per-image CNN refinement.

DFC (Kim et al., TIP 2020), DynaSeg and DynaGuide (Guermazi et al., IVC 2024 / 2025), with
fused kernels behind a plain PyTorch reference. Quick start::

    import dynaguide as dg
    seg = dg.segment("photo.jpg")          # default preset and guide
    seg.labels                             # (H, W) int32, compact 0..K-1
    seg.save("out/")

``import dynaguide`` itself imports nothing heavy: the names below are loaded on first use
(PEP 562), so ``dynaguide --help`` and tools that only read ``__version__`` never import
torch, scipy or scikit-image. Triton, ONNX Runtime and transformers are imported only by the
code paths that run them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynaguide._lazy import attach as _attach
from dynaguide._source_tree import check_not_source_tree as _check_not_source_tree
from dynaguide.build_info import package_version as _package_version

_check_not_source_tree()

__version__: str = _package_version()

#: public name -> the module that defines it (imported on first access).
_LAZY: dict[str, str] = {
    "Guide": "dynaguide.guidance",
    "RefineConfig": "dynaguide.config",
    "Segmentation": "dynaguide.segmentation",
    "available_guides": "dynaguide.guidance",
    "connected_components": "dynaguide.label_ops",
    "env_report": "dynaguide.backend",
    "get_guide": "dynaguide.guidance",
    "get_preset": "dynaguide.config",
    "label_colors": "dynaguide.segmentation",
    "load_segmentation": "dynaguide.loading",
    "presets": "dynaguide.config",
    "refine_batch": "dynaguide.batched_refine",
    "register_guide": "dynaguide.guidance",
    "relabel_compact": "dynaguide.label_ops",
    "relabel_sequential": "dynaguide.label_ops",
    "segment": "dynaguide.api",
    "segment_batch": "dynaguide.segment_many",
}

__all__ = [  # the names of _LAZY and the version (tests/test_packaging.py keeps them equal)
    "Guide",
    "RefineConfig",
    "Segmentation",
    "__version__",
    "available_guides",
    "connected_components",
    "env_report",
    "get_guide",
    "get_preset",
    "label_colors",
    "load_segmentation",
    "presets",
    "refine_batch",
    "register_guide",
    "relabel_compact",
    "relabel_sequential",
    "segment",
    "segment_batch",
]

if TYPE_CHECKING:  # what static checkers and IDEs see
    from dynaguide.api import segment
    from dynaguide.backend import env_report
    from dynaguide.batched_refine import refine_batch
    from dynaguide.config import RefineConfig, get_preset, presets
    from dynaguide.guidance import Guide, available_guides, get_guide, register_guide
    from dynaguide.label_ops import connected_components, relabel_compact, relabel_sequential
    from dynaguide.loading import load_segmentation
    from dynaguide.segment_many import segment_batch
    from dynaguide.segmentation import Segmentation, label_colors

__getattr__, __dir__ = _attach(__name__, _LAZY)
