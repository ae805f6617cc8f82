"""dynaguide: unsupervised image segmentation by per-image CNN refinement.

DFC, DynaSeg and DynaGuide (see ``SPEC``), with fused kernels behind a plain PyTorch
reference. Quick start::

    import dynaguide as dg
    seg = dg.segment("photo.jpg")          # default preset and guide
    seg.labels                             # (H, W) int32, compact 0..K-1
    seg.save("out/")

Nothing heavy (Triton, ONNX Runtime, transformers) is imported here.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from dynaguide.api import segment
from dynaguide.backend import env_report
from dynaguide.batched_refine import refine_batch
from dynaguide.config import RefineConfig, get_preset, presets
from dynaguide.guidance import Guide, available_guides, get_guide, register_guide
from dynaguide.label_ops import connected_components, relabel_compact, relabel_sequential
from dynaguide.segment_many import segment_batch
from dynaguide.segmentation import Segmentation, label_colors

try:
    __version__ = version("dynaguide")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = [
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
    "presets",
    "refine_batch",
    "register_guide",
    "relabel_compact",
    "relabel_sequential",
    "segment",
    "segment_batch",
]
