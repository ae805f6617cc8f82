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

from typing import TYPE_CHECKING

from dynaguide._lazy import attach as _attach

#: public name -> the module that defines it (imported on first access, so that
#: ``import dynaguide.export`` stays light and the guides can import the session and export
#: modules without an import cycle through this package).
_LAZY: dict[str, str] = {
    "ExportReport": "dynaguide.export.onnx_model",
    "ImagePreprocessor": "dynaguide.guidance.pretrained",
    "OrtSession": "dynaguide.export.ort_session",
    "export_onnx": "dynaguide.export.onnx_model",
    "export_refine_net": "dynaguide.export.refine",
    "export_segformer": "dynaguide.export.segformer",
    "export_vit_attention": "dynaguide.export.vit_attention",
    "export_vit_features": "dynaguide.export.vit_features",
    "load_refine_checkpoint": "dynaguide.export.refine",
    "read_metadata": "dynaguide.export.onnx_model",
    "select_providers": "dynaguide.export.ort_session",
    "verify_image_model": "dynaguide.export.onnx_model",
}

__all__ = [  # the names of _LAZY
    "ExportReport",
    "ImagePreprocessor",
    "OrtSession",
    "export_onnx",
    "export_refine_net",
    "export_segformer",
    "export_vit_attention",
    "export_vit_features",
    "load_refine_checkpoint",
    "read_metadata",
    "select_providers",
    "verify_image_model",
]

if TYPE_CHECKING:  # what static checkers and IDEs see
    from dynaguide.export.onnx_model import (
        ExportReport,
        export_onnx,
        read_metadata,
        verify_image_model,
    )
    from dynaguide.export.ort_session import OrtSession, select_providers
    from dynaguide.export.refine import export_refine_net, load_refine_checkpoint
    from dynaguide.export.segformer import export_segformer
    from dynaguide.export.vit_attention import export_vit_attention
    from dynaguide.export.vit_features import export_vit_features

    from dynaguide.guidance.pretrained import ImagePreprocessor

__getattr__, __dir__ = _attach(__name__, _LAZY)
