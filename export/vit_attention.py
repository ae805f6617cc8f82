"""ONNX export of a ViT / DINO / DINOv2 checkpoint's patch-token self-attention.

:func:`export_vit_attention` writes ``pixel_values -> attention`` (the chosen layers'
patch-token attention, for DiffSeg-style merging) with dynamic height and width where the
exporter allows, verified against torch on another size; the provider that runs it is
:class:`dynaguide.guidance.vit_attention.ViTAttention`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from dynaguide.export.onnx_model import (
    METADATA_PREFIX,
    ExportReport,
    export_onnx,
    folder_fingerprint,
    verify_image_model,
)

from dynaguide.guidance.pretrained import (
    read_checkpoint_config,
)
from dynaguide.guidance.vit_attention import (
    VIT_ATTENTION_KIND,
    VIT_MODEL_TYPES,
    PatchAttention,
    load_vit,
    vit_input_size,
    vit_preprocessor,
)

__all__ = ["export_vit_attention", "vit_fingerprint"]


def vit_fingerprint(folder: Path, extra: str) -> str:
    """Fingerprint of a ViT checkpoint folder and the exported layers (``extra``)."""
    return folder_fingerprint(folder, extra)


def export_vit_attention(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layers: Sequence[int] = (-1,),
    size: tuple[int, int] | None = None,
    verify: bool = True,
    atol: float = 1e-3,
    opset: int | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export a ViT / DINO / DINOv2 checkpoint's patch attention (:class:`PatchAttention`) to ONNX.

    The graph maps ``pixel_values (1, 3, H, W)`` (H, W multiples of the patch size) to
    ``attention (1, N, N)``. Height and width are dynamic when the exporters manage it
    (DINOv2 with registers interpolates its position embeddings with antialiased bicubic
    resizing, which neither exporter keeps dynamic: that export has a fixed input size,
    recorded in the metadata and used by :class:`ViTAttention`).

    Parameters
    ----------
    checkpoint : path
        Local checkpoint folder.
    out : path
        Output ``.onnx``.
    layers : sequence of int
        Layers averaged (baked into the export).
    size : (int, int), optional
        (height, width) of the export input, rounded to multiples of the patch size;
        default (8p, 12p). It becomes the model's fixed input size when the export cannot
        be dynamic, so pass the size you intend to run at.
    verify : bool
        Compare ONNX Runtime (CPU) with torch on fresh random inputs of other sizes.
    atol : float
        Tolerance on ``max |ort - torch|`` (attention values are <= 1).
    opset : int, optional
        Opset for the dynamo exporter.
    seed : int
        Seed of the random inputs.

    Returns
    -------
    ExportReport
    """
    folder = Path(checkpoint)
    cfg = read_checkpoint_config(folder, what="vit checkpoint", model_types=VIT_MODEL_TYPES)
    module = PatchAttention(load_vit(folder), layers).eval()
    p = module.patch_size
    pre = vit_preprocessor(folder, cfg["model_type"])
    meta = {
        METADATA_PREFIX + "kind": VIT_ATTENTION_KIND,
        METADATA_PREFIX + "model_type": cfg["model_type"],
        METADATA_PREFIX + "patch_size": str(p),
        METADATA_PREFIX + "prefix_tokens": str(module.prefix),
        METADATA_PREFIX + "layers": json.dumps(module.layers),
        METADATA_PREFIX + "source_fingerprint": vit_fingerprint(folder, json.dumps(module.layers)),
        **pre.to_metadata(),
    }
    gen = torch.Generator().manual_seed(seed)
    eh, ew = (8 * p, 12 * p) if size is None else vit_input_size(1, 1, size, p)
    example = torch.randn(1, 3, eh, ew, generator=gen)
    report = export_onnx(
        module,
        example,
        out,
        input_name="pixel_values",
        output_names=["attention"],
        min_hw=p,
        metadata=meta,
        opset=opset,
    )
    if verify:
        shapes = (
            [(1, 3, 7 * p, 10 * p), (1, 3, 12 * p, 9 * p)]
            if report.dynamic
            else [tuple(example.shape)]
        )
        verify_image_model(report, module, shapes, atol=atol, seed=seed + 1)
    return report
