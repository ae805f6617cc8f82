"""ONNX export of a SegFormer checkpoint and the guide's logits-to-labels graph.

* :func:`export_segformer` -- a local SegFormer checkpoint folder, ``pixel_values ->
  logits`` with dynamic height and width, verified against torch on another size; the
  ``.onnx`` carries the preprocessing and the source folder's fingerprint in its metadata.
* :func:`segformer_postprocess_model` -- the tiny second graph (``Resize`` + ``ArgMax``)
  that turns logits into an (H, W) label map inside ONNX Runtime.

The guide that runs them is :class:`dynaguide.guidance.segformer.SegFormerGuide`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from dynaguide.export.onnx_model import (
    METADATA_PREFIX,
    ExportReport,
    export_onnx,
    folder_fingerprint,
    verify_image_model,
)

from dynaguide.guidance.pretrained import ImagePreprocessor
from dynaguide.guidance.segformer import SEGFORMER_DEFAULTS, SEGFORMER_KIND, load_segformer

__all__ = ["export_segformer", "segformer_fingerprint", "segformer_postprocess_model"]


class _LogitsOnly(torch.nn.Module):
    """``pixel_values (1, 3, H, W) -> logits (1, C, ceil(H/4), ceil(W/4))``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits at a quarter of the input resolution."""
        return self.model(pixel_values=pixel_values).logits


def segformer_postprocess_model() -> bytes:
    """The ONNX graph ``(logits (1, C, h, w) float, size [2] int64) -> labels (1, H, W) int32``.

    ``Resize`` (linear, ``half_pixel``: torch's bilinear with ``align_corners=False``)
    to ``size``, ``ArgMax`` over the classes, ``Cast`` to int32.
    """
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Shape", ["logits"], ["shape"]),
        helper.make_node(
            "Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.INT64, [1], [0])
        ),
        helper.make_node(
            "Constant", [], ["two"], value=helper.make_tensor("two", TensorProto.INT64, [1], [2])
        ),
        helper.make_node("Slice", ["shape", "zero", "two"], ["nc"]),
        helper.make_node("Concat", ["nc", "size"], ["sizes"], axis=0),
        helper.make_node(
            "Resize",
            ["logits", "", "", "sizes"],
            ["resized"],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
        helper.make_node("ArgMax", ["resized"], ["argmax"], axis=1, keepdims=0),
        helper.make_node("Cast", ["argmax"], ["labels"], to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes,
        "segformer_postprocess",
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "classes", "h", "w"]),
            helper.make_tensor_value_info("size", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("labels", TensorProto.INT32, [1, "H", "W"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="dynaguide"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def segformer_fingerprint(folder: Path) -> str:
    """Fingerprint of a SegFormer checkpoint folder (its files' names, sizes and times)."""
    return folder_fingerprint(folder)


def export_segformer(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    verify: bool = True,
    atol: float = 1e-3,
    opset: int | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export a local SegFormer checkpoint to ONNX (``pixel_values -> logits``, dynamic H, W).

    Parameters
    ----------
    checkpoint : path
        Folder written by ``save_pretrained`` (``config.json`` + weights, optionally
        ``preprocessor_config.json``).
    out : path
        Output ``.onnx`` file. The preprocessing settings are stored in its metadata.
    verify : bool
        Compare ONNX Runtime (CPU) with torch on fresh random inputs of shapes different
        from the export input: the processor's size and an odd size.
    atol : float
        Tolerance on ``max |ort - torch| / max(1, max |torch|)``.
    opset : int, optional
        Opset for the dynamo exporter.
    seed : int
        Seed of the random export and verification inputs.

    Returns
    -------
    ExportReport
        With ``max_abs_diff`` over the verification inputs when ``verify``.

    Raises
    ------
    FileNotFoundError, ValueError
        For a missing or non-SegFormer folder.
    RuntimeError
        When verification exceeds ``atol``.
    """
    folder = Path(checkpoint)
    model = load_segformer(folder)
    pre = ImagePreprocessor.from_pretrained(folder, defaults=SEGFORMER_DEFAULTS)
    config = model.config
    meta = {
        METADATA_PREFIX + "kind": SEGFORMER_KIND,
        METADATA_PREFIX + "num_labels": str(int(config.num_labels)),
        METADATA_PREFIX + "source_fingerprint": segformer_fingerprint(folder),
        **pre.to_metadata(),
    }
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(1, 3, 128, 96, generator=gen)
    wrapper = _LogitsOnly(model).eval()
    report = export_onnx(
        wrapper,
        example,
        out,
        input_name="pixel_values",
        output_names=["logits"],
        min_hw=32,
        metadata=meta,
        opset=opset,
    )
    if verify:
        shapes = [(1, 3, *(pre.size or (512, 512)))]
        if report.dynamic:
            shapes.append((1, 3, 161, 241))
        else:
            shapes = [tuple(example.shape)]
        verify_image_model(report, wrapper, shapes, atol=atol, seed=seed + 1)
    return report
