"""ONNX export of a ViT / DINO / DINOv2 checkpoint's patch features (SmooSeg's backbone).

:func:`export_vit_features` writes ``pixel_values (1, 3, H, W) -> features (1, D, H/p, W/p)``
(the last hidden state after the final LayerNorm, patch tokens only: see
:class:`dynaguide.smooseg.backbones.ViTPatchFeatures`) with dynamic height and width where
the exporters manage it, records the patch size, the feature size and the checkpoint's
normalisation in the model's metadata, and verifies ONNX Runtime against torch on fresh
random inputs of sizes other than the export size. :class:`dynaguide.smooseg.backbones.HFViTBackbone`
runs the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from dynaguide.export import ExportReport, ImagePreprocessor, export_onnx, verify_image_model

__all__ = ["KIND", "export_vit_features", "features_preprocessor"]

#: ``dynaguide.kind`` metadata of the exports.
KIND = "vit-features"
_PREFIX = "dynaguide."


def features_preprocessor(folder: str | os.PathLike) -> ImagePreprocessor:
    """The checkpoint's normalisation (mean, std, rescale factor); its size is not used."""
    from dynaguide.guidance.pretrained import read_checkpoint_config
    from dynaguide.guidance.vit_attention import VIT_MODEL_TYPES, vit_preprocessor

    cfg = read_checkpoint_config(folder, what="vit backbone", model_types=VIT_MODEL_TYPES)
    return vit_preprocessor(folder, cfg["model_type"])


def export_vit_features(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: tuple[int, int] | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    opset: int | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export a local ViT / DINO / DINOv2 folder's patch features to ONNX.

    Parameters
    ----------
    checkpoint : path
        Local Hugging Face folder (``config.json`` + weights).
    out : path
        Output ``.onnx``.
    size : (int, int), optional
        (height, width) of the export input, multiples of the patch size; default
        (6p, 9p). It becomes the fixed input size when the export cannot be dynamic.
    verify : bool
        Compare ONNX Runtime (CPU) with torch on fresh random inputs of other sizes.
    atol : float
        Tolerance on ``max |ort - torch|`` relative to ``max(1, max |torch|)``.
    opset : int, optional
        Opset of the dynamo exporter.
    seed : int
        Seed of the random inputs.

    Returns
    -------
    ExportReport
        With ``max_abs_diff`` and ``verify_shape`` when ``verify``.

    Raises
    ------
    FileNotFoundError, ValueError
        A missing folder, or a checkpoint that is not a ViT / DINOv2.
    RuntimeError
        ONNX Runtime and torch disagree beyond ``atol``.
    """
    from dynaguide.export.onnx_model import folder_fingerprint as _fingerprint

    from dynaguide.guidance.vit_attention import load_vit
    from dynaguide.smooseg.vit_backbone import ViTPatchFeatures

    folder = Path(checkpoint)
    pre = features_preprocessor(folder)
    module = ViTPatchFeatures(load_vit(folder)).eval()
    p = module.patch_size
    h, w = (6 * p, 9 * p) if size is None else (int(size[0]), int(size[1]))
    if h < p or w < p or h % p or w % p:
        raise ValueError(f"size {(h, w)} must be positive multiples of the patch size {p}")
    meta = {
        _PREFIX + "kind": KIND,
        _PREFIX + "model_type": str(module.model.config.model_type),
        _PREFIX + "patch_size": str(p),
        _PREFIX + "dim": str(module.dim),
        _PREFIX + "prefix_tokens": str(module.prefix),
        _PREFIX + "source_name": folder.resolve().name,
        _PREFIX + "source_fingerprint": _fingerprint(folder, KIND),
        **pre.to_metadata(),
    }
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(1, 3, h, w, generator=gen)
    report = export_onnx(
        module,
        example,
        out,
        input_name="pixel_values",
        output_names=["features"],
        min_hw=p,
        metadata=meta,
        opset=opset,
    )
    if verify:
        shapes = [(1, 3, 5 * p, 7 * p), (1, 3, 8 * p, 4 * p)] if report.dynamic else [(1, 3, h, w)]
        verify_image_model(report, module, shapes, atol=atol, seed=seed + 1)
    return report
