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

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaguide.errors import ModelFileError
from dynaguide.export.onnx_model import (
    METADATA_PREFIX,
    ExportReport,
    check_onnx_file,
    read_metadata,
    temporary_onnx_path,
)
from dynaguide.export.ort_session import OrtSession
from dynaguide.guidance.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocessor,
    check_rgb_image,
    load_pretrained,
    read_checkpoint_config,
    require_transformers,
    resolve_torch_device,
)

__all__ = [
    "SEGFORMER_DEFAULTS",
    "SegFormerGuide",
    "load_segformer",
    "logits_to_labels",
]

#: ``SegformerImageProcessor``'s defaults (used when a folder has no preprocessor_config.json).
SEGFORMER_DEFAULTS = ImagePreprocessor(size=(512, 512), mean=IMAGENET_MEAN, std=IMAGENET_STD)
SEGFORMER_KIND = "segformer"
_BACKENDS = ("onnxruntime", "torch")


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
            kind = meta.get(METADATA_PREFIX + "kind", SEGFORMER_KIND)
            if kind != SEGFORMER_KIND:
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
            from dynaguide.export.segformer import segformer_postprocess_model

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
        # dynaguide.export.segformer loads the model through this module: import it here
        from dynaguide.export.segformer import export_segformer, segformer_fingerprint

        if onnx_path is not None:
            target = Path(onnx_path)
            if target.is_file():
                meta = read_metadata(target)
                if meta.get(METADATA_PREFIX + "source_fingerprint") == segformer_fingerprint(
                    folder
                ):
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


def segformer_guide_factory(
    checkpoint: str | os.PathLike | None = None, **options: Any
) -> SegFormerGuide:
    """Registry factory: ``get_guide("segformer", checkpoint=PATH, **options)``."""
    if checkpoint is None:
        raise ValueError(
            "the 'segformer' guide needs checkpoint=<local SegFormer folder or .onnx file>, "
            "e.g. guidance_options={'checkpoint': 'segformer-b2-ade/'}"
        )
    return SegFormerGuide(checkpoint, **options)
