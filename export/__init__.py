"""ONNX export of the guidance models and the refine net; ONNX Runtime sessions.

Functions (each writes an ``.onnx`` with dynamic height and width where the exporters allow,
verifies it against torch on a fresh input of another size and returns an
:class:`ExportReport` with the largest absolute difference):

* :func:`export_segformer` -- a local SegFormer checkpoint folder, ``pixel_values -> logits``;
* :func:`export_vit_attention` -- a ViT / DINO / DINOv2 folder, ``pixel_values -> attention``
  (patch-token self-attention for DiffSeg-style merging);
* :func:`export_refine_net` -- a trained per-image refine net saved as
  ``{"config": ..., "state_dict": ...}``.

:class:`OrtSession` and :func:`select_providers` run the exports with ONNX Runtime
(provider order CUDA -> CPU, I/O binding). The command line is ``dynaguide export``
(:mod:`dynaguide.export.cli`). Importing this package imports neither ``onnx`` nor
``onnxruntime``.

Modules: :mod:`~dynaguide.export.onnx_model` (the exporter, verification, metadata),
:mod:`~dynaguide.export.ort_session` (ONNX Runtime sessions),
:mod:`~dynaguide.export.segformer`, :mod:`~dynaguide.export.vit_attention`,
:mod:`~dynaguide.export.refine` (one exporter per model) and :mod:`~dynaguide.export.cli`.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module of dynaguide.export that defines it; loaded on first access (PEP 562), so
# that ``import dynaguide.export`` stays light and the guides can import the session and
# export modules without an import cycle through this package.
_EXPORTS = {
    "ExportReport": "onnx_model",
    "export_onnx": "onnx_model",
    "read_metadata": "onnx_model",
    "verify_image_model": "onnx_model",
    "OrtSession": "ort_session",
    "select_providers": "ort_session",
    "export_refine_net": "refine",
    "load_refine_checkpoint": "refine",
    "export_segformer": "segformer",
    "export_vit_attention": "vit_attention",
}
# Defined in dynaguide.guidance (the guides' preprocessing), exported here too.
_FROM_GUIDANCE = {"ImagePreprocessor": "dynaguide.guidance.pretrained"}

__all__ = sorted([*_EXPORTS, *_FROM_GUIDANCE])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    elif name in _FROM_GUIDANCE:
        module = importlib.import_module(_FROM_GUIDANCE[name])
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
