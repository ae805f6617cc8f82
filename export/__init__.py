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
"""

from __future__ import annotations

from dynaguide.export.refine import export_refine_net, load_refine_checkpoint

from dynaguide.guidance.diffseg import export_vit_attention
from dynaguide.guidance.ort import (
    ExportReport,
    ImagePreprocessor,
    OrtSession,
    export_onnx,
    read_metadata,
    select_providers,
    verify_image_model,
)
from dynaguide.guidance.segformer import export_segformer

__all__ = [
    "ExportReport",
    "ImagePreprocessor",
    "OrtSession",
    "export_onnx",
    "export_refine_net",
    "export_segformer",
    "export_vit_attention",
    "load_refine_checkpoint",
    "read_metadata",
    "select_providers",
    "verify_image_model",
]
