"""SegFormer guidance through ONNX Runtime (SegFormer: Xie et al., NeurIPS 2021; used as a
guide by DynaGuide, IVC 2025).

The guide maps an RGB image to the argmax of a SegFormer's class logits:

1. preprocess exactly like ``SegformerImageProcessor`` (PIL resize of the uint8 image to
   the processor's ``size``, rescale by 1/255, normalise with its mean/std; all read from
   the checkpoint's ``preprocessor_config.json`` when present);
2. run the network (ONNX Runtime, provider order CUDA -> CPU; or torch eager);
3. resize the logits bilinearly (``align_corners=False``) to the image size and take the
   argmax, giving an (H, W) int32 map of class ids.

With ONNX Runtime, step 3 is a second, tiny ONNX graph (``Resize`` + ``ArgMax``); on a CUDA
session the logits are bound to device memory between the two graphs, so only the label
map is copied to the host.

Weights are only ever read from a local folder (``local_files_only=True``). The public
NVIDIA SegFormer checkpoints are under NVIDIA's non-commercial licence: check the licence
of the checkpoint you point the guide at.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaguide.errors import ModelFileError
from dynaguide.guidance.base import available_guides, register_guide
from dynaguide.guidance.ort import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    METADATA_PREFIX,
    ExportReport,
    ImagePreprocessor,
    OrtSession,
    check_onnx_file,
    check_rgb_image,
    export_onnx,
    load_pretrained,
    read_checkpoint_config,
    read_metadata,
    require_transformers,
    resolve_torch_device,
    temporary_onnx_path,
    verify_image_model,
)

__all__ = [
    "SEGFORMER_DEFAULTS",
    "SegFormerGuide",
    "export_segformer",
    "load_segformer",
    "logits_to_labels",
    "segformer_postprocess_model",
]

#: ``SegformerImageProcessor``'s defaults (used when a folder has no preprocessor_config.json).
SEGFORMER_DEFAULTS = ImagePreprocessor(size=(512, 512), mean=IMAGENET_MEAN, std=IMAGENET_STD)
_KIND = "segformer"
_BACKENDS = ("onnxruntime", "torch")


class _LogitsOnly(torch.nn.Module):
    """``pixel_values (1, 3, H, W) -> logits (1, C, ceil(H/4), ceil(W/4))``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits at a quarter of the input resolution."""
        return self.model(pixel_values=pixel_values).logits


def load_segformer(checkpoint: str | os.PathLike) -> torch.nn.Module:
    """Load ``SegformerForSemanticSegmentation`` from a local folder, in eval mode.

    Raises
    ------
    FileNotFoundError
        If the folder, its ``config.json`` or its weights are missing.
    ValueError
        If the folder is not a SegFormer checkpoint.
    """
    read_checkpoint_config(checkpoint, what="segformer checkpoint", model_types=("segformer",))
    transformers = require_transformers()
    model = load_pretrained(
        lambda: transformers.SegformerForSemanticSegmentation.from_pretrained(
            str(checkpoint), local_files_only=True
        ),
        f"segformer checkpoint {str(checkpoint)!r}",
    )
    return model.eval()


def logits_to_labels(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of (1, C, h, w) logits to ``size``, then argmax.

    Returns
    -------
    Tensor (H, W) int32
    """
    up = torch.nn.functional.interpolate(
        logits, size=tuple(size), mode="bilinear", align_corners=False
    )
    return up.argmax(dim=1)[0].to(torch.int32)


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


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


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
        METADATA_PREFIX + "kind": _KIND,
        METADATA_PREFIX + "num_labels": str(int(config.num_labels)),
        METADATA_PREFIX + "source_fingerprint": _fingerprint(folder),
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


class SegFormerGuide:
    """SegFormer class-id map as guidance.

    Parameters
    ----------
    checkpoint : path
        A local SegFormer checkpoint folder (exported to ONNX on construction when
        ``backend="onnxruntime"``) or an ``.onnx`` file written by :func:`export_segformer`
        / ``dynaguide export segformer``.
    backend : {"onnxruntime", "torch"}
        ``"torch"`` runs the transformers model eagerly (needs a folder): the reference.
    device : {"auto", "cpu", "cuda"}
        ``"auto"``: CUDA when available (ORT provider order CUDA -> CPU), else CPU.
    onnx_path : path, optional
        Where to write the export of a folder; reused when it exists and was exported from
        the same checkpoint files. By default a temporary file, removed once loaded.
    size : (int, int), optional
        Network input (height, width); defaults to the processor's ``size``.
    threads : int, optional
        ONNX Runtime intra-op threads.
    verify : bool
        Verify a fresh export against torch (see :func:`export_segformer`).

    Examples
    --------
    >>> guide = SegFormerGuide("segformer-b0-ade/")        # doctest: +SKIP
    >>> labels = guide(rgb_uint8)                          # doctest: +SKIP
    >>> dynaguide.segment(img, guidance=guide)             # doctest: +SKIP
    """

    name = "segformer"

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        backend: str = "onnxruntime",
        device: str = "auto",
        onnx_path: str | os.PathLike | None = None,
        size: tuple[int, int] | None = None,
        threads: int | None = None,
        verify: bool = True,
    ):
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a path, got {type(checkpoint).__name__}")
        path = Path(checkpoint)
        self.backend = backend
        self.export_report: ExportReport | None = None
        self._post: OrtSession | None = None
        self._session: OrtSession | None = None
        self._model: torch.nn.Module | None = None
        if path.is_dir():
            pre = ImagePreprocessor.from_pretrained(path, defaults=SEGFORMER_DEFAULTS)
            if backend == "torch":
                self._model = load_segformer(path).to(resolve_torch_device(device))
            else:
                read_checkpoint_config(
                    path, what="segformer checkpoint", model_types=("segformer",)
                )
                self._session = self._session_from_folder(path, onnx_path, device, threads, verify)
        elif backend == "torch":
            raise ValueError(f"backend='torch' needs a checkpoint folder, got {str(path)!r}")
        else:
            onnx_file = check_onnx_file(path, what="segformer guide")
            meta = read_metadata(onnx_file)
            kind = meta.get(METADATA_PREFIX + "kind", _KIND)
            if kind != _KIND:
                raise ValueError(
                    f"segformer guide: {str(path)!r} is a {kind!r} export, not a segformer one"
                )
            pre = ImagePreprocessor.from_metadata(
                meta, defaults=SEGFORMER_DEFAULTS, source=str(onnx_file)
            )
            sidecar = onnx_file.with_name("preprocessor_config.json")
            if METADATA_PREFIX + "preprocess" not in meta and sidecar.is_file():
                pre = ImagePreprocessor.from_pretrained(
                    onnx_file.parent, defaults=SEGFORMER_DEFAULTS
                )
            self._session = OrtSession(onnx_file, device=device, threads=threads)
        if size is not None:
            pre = pre.with_size(size, source="segformer guide: size")
        if self._session is not None:
            self._check_io(str(path))
            fixed = self._session.input_shapes[self._session.input_names[0]][2:]
            if all(isinstance(d, int) for d in fixed):
                pre = pre.with_size(fixed, source=str(path))
            self._post = OrtSession(
                segformer_postprocess_model(), device=device, name=f"{path} (logits to labels)"
            )
        self.preprocessor = pre

    def _check_io(self, source: str) -> None:
        """One image input of rank 4 and at least one output, or a clear error."""
        assert self._session is not None
        shapes = [self._session.input_shapes[n] for n in self._session.input_names]
        if len(shapes) != 1 or len(shapes[0]) != 4 or not self._session.output_names:
            raise ModelFileError(
                f"{source}: expected one (1, 3, H, W) input and a logits output, got inputs "
                f"{shapes} and outputs {self._session.output_names}"
            )

    def _session_from_folder(
        self, folder: Path, onnx_path: Any, device: str, threads: int | None, verify: bool
    ) -> OrtSession:
        if onnx_path is not None:
            target = Path(onnx_path)
            if target.is_file():
                meta = read_metadata(target)
                if meta.get(METADATA_PREFIX + "source_fingerprint") == _fingerprint(folder):
                    return OrtSession(target, device=device, threads=threads)
            self.export_report = export_segformer(folder, target, verify=verify)
            return OrtSession(target, device=device, threads=threads)
        target, cleanup = temporary_onnx_path("segformer")
        try:
            self.export_report = export_segformer(folder, target, verify=verify)
            return OrtSession(target.read_bytes(), device=device, threads=threads)
        finally:
            cleanup()

    @property
    def providers(self) -> list[str]:
        """ONNX Runtime providers in use (empty for the torch backend)."""
        return [] if self._session is None else list(self._session.providers)

    def logits(self, image: np.ndarray) -> np.ndarray:
        """Raw class logits (1, C, h, w) of an (H, W, 3) uint8 RGB image, on the host."""
        x = self.preprocessor(check_rgb_image(image, "segformer guide"))
        if self._model is not None:
            dev = next(self._model.parameters()).device
            with torch.inference_mode():
                return (
                    self._model(pixel_values=torch.from_numpy(x).to(dev))
                    .logits.float()
                    .cpu()
                    .numpy()
                )
        assert self._session is not None
        return self._session.run({self._session.input_names[0]: x})[self._session.output_names[0]]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) int32 class ids of an (H, W, 3) uint8 RGB image."""
        image = check_rgb_image(image, "segformer guide")
        h, w = image.shape[:2]
        x = self.preprocessor(image)
        if self._model is not None:
            dev = next(self._model.parameters()).device
            with torch.inference_mode():
                logits = self._model(pixel_values=torch.from_numpy(x).to(dev)).logits.float()
                return logits_to_labels(logits, (h, w)).cpu().numpy()
        assert self._session is not None and self._post is not None
        name = self._session.output_names[0]
        logits = self._session.run_bound({self._session.input_names[0]: x}, keep_on_device=(name,))
        out = self._post.run_bound({"logits": logits[name], "size": np.array([h, w], np.int64)})
        return out["labels"].numpy()[0]

    def __repr__(self) -> str:
        """Short description."""
        return (
            f"SegFormerGuide(backend={self.backend!r}, providers={self.providers}, "
            f"size={self.preprocessor.size})"
        )


def _segformer_factory(
    checkpoint: str | os.PathLike | None = None, **options: Any
) -> SegFormerGuide:
    """Registry factory: ``get_guide("segformer", checkpoint=PATH, **options)``."""
    if checkpoint is None:
        raise ValueError(
            "the 'segformer' guide needs checkpoint=<local SegFormer folder or .onnx file>, "
            "e.g. guidance_options={'checkpoint': 'segformer-b2-ade/'}"
        )
    return SegFormerGuide(checkpoint, **options)


if "segformer" not in available_guides():
    register_guide(
        "segformer",
        _segformer_factory,
        description="SegFormer class ids via ONNX Runtime "
        "(options: checkpoint=folder or .onnx, device, backend)",
    )
