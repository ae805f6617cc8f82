"""Loading the learned guides' Hugging Face checkpoints and preprocessing their input.

* :class:`ImagePreprocessor` reproduces the Hugging Face image processors' PIL path:
  resize (PIL, on the ``uint8`` image), rescale, normalise; it round-trips through an
  ONNX model's metadata.
* :func:`read_checkpoint_config`, :func:`load_pretrained` and :func:`require_transformers`
  read a local checkpoint folder with clear errors (no downloads).

Nothing here imports ``transformers``, ``onnx`` or ``onnxruntime`` at module import time.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaguide.errors import ModelFileError, first_line
from dynaguide.export.onnx_model import METADATA_PREFIX
from dynaguide.export.ort_session import DEVICES
from dynaguide.guidance.base import check_rgb_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Largest network input side accepted from a model's metadata or configuration: beyond it
#: a preprocessed image alone would take gigabytes (SegFormer and ViTs run at 224-1024).
MAX_INPUT_SIDE = 4096
_RESAMPLE_FILTERS = (0, 1, 2, 3, 4, 5)  # PIL: nearest, lanczos, bilinear, bicubic, box, hamming


def require_transformers() -> Any:
    """Import and return ``transformers`` with an actionable error when it is missing.

    Raises
    ------
    ImportError
        If ``transformers`` is not installed.
    """
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "transformers is needed to load Hugging Face checkpoints; "
            "install it with `pip install 'dynaguide[cpu]'` or `pip install transformers`"
        ) from exc
    return transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports (warnings stay visible) for a block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------------------


def load_pretrained(load: Callable[[], Any], what: str) -> Any:
    """``load()`` (a transformers ``from_pretrained`` call), quietly, with clear errors.

    Raises
    ------
    FileNotFoundError
        The weights are missing (transformers raises ``OSError``).
    ModelFileError
        The weights file is corrupt or foreign (safetensors, refused pickle, ...).
    """
    try:
        with quiet_transformers():
            return load()
    except OSError as exc:
        raise FileNotFoundError(f"{what}: cannot load weights: {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # a corrupt or foreign weights file
        raise ModelFileError(f"{what}: cannot load weights: {first_line(exc)}") from None


def read_checkpoint_config(
    folder: str | os.PathLike, *, what: str, model_types: Sequence[str]
) -> dict:
    """Read and check ``config.json`` of a local Hugging Face checkpoint folder.

    Parameters
    ----------
    folder : path
        The checkpoint folder (what ``save_pretrained`` wrote).
    what : str
        Name of the argument, for error messages.
    model_types : sequence of str
        Accepted ``model_type`` values.

    Returns
    -------
    dict
        The parsed ``config.json``.

    Raises
    ------
    FileNotFoundError
        If the folder or its ``config.json`` is missing.
    ValueError
        If ``config.json`` is unreadable or its ``model_type`` is not accepted.
    """
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what}: checkpoint folder {str(path)!r} does not exist (no downloads are made)"
        )
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{what}: {str(path)!r} is not a Hugging Face checkpoint folder (no config.json in it)"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ModelFileError(f"{what}: cannot read {str(cfg_path)!r}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelFileError(
            f"{what}: {str(cfg_path)!r} holds a JSON {type(cfg).__name__}, not an object"
        )
    model_type = cfg.get("model_type")
    if model_type not in model_types:
        raise ValueError(
            f"{what}: {str(path)!r} holds a {model_type!r} checkpoint; "
            f"expected model_type in {list(model_types)}"
        )
    return cfg


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def read_preprocessor_config(folder: str | os.PathLike) -> tuple[Any, Path] | None:
    """The parsed ``preprocessor_config.json`` of a checkpoint folder and its path, or None
    when the folder has none; ModelFileError when it cannot be read."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()), path
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read {str(path)!r}: {exc}") from None


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize, rescale and normalise an RGB ``uint8`` image like Hugging Face's PIL path.

    The operations and their order are those of ``SegformerImageProcessor`` (and the other
    ``BaseImageProcessor`` PIL backends): PIL resize of the ``uint8`` image to ``size``,
    ``float64 * rescale_factor`` cast to ``float32``, then ``(x - mean) / std`` in float32.

    Parameters
    ----------
    size : (int, int) or None
        Output (height, width); ``None`` keeps the image size.
    mean, std : 3-tuples of float
        Per-channel normalisation.
    rescale_factor : float
        Multiplier applied before normalisation (1/255 maps uint8 to [0, 1]).
    resample : int
        PIL resampling filter (2 = bilinear, 3 = bicubic).
    do_resize, do_rescale, do_normalize : bool
        Switches, as in the processor's configuration.
    """

    size: tuple[int, int] | None = (512, 512)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    rescale_factor: float = 1 / 255
    resample: int = 2
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self) -> None:
        """Validate the fields."""
        if self.size is not None and (
            not isinstance(self.size, (tuple, list))
            or len(self.size) != 2
            or any(
                isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
                for s in self.size
            )
        ):
            raise ValueError(
                f"size must be None or (height, width) positive ints, got {self.size!r}"
            )
        if self.size is not None and max(self.size) > MAX_INPUT_SIDE:
            raise ValueError(
                f"size {tuple(self.size)!r} is larger than {MAX_INPUT_SIDE} pixels per side"
            )
        values = (*self.mean, *self.std, self.rescale_factor)
        if (
            len(self.mean) != 3
            or len(self.std) != 3
            or any(s == 0 for s in self.std)
            or not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                for v in values
            )
        ):
            raise ValueError(
                f"mean/std must have 3 finite entries and std no zero, and rescale_factor must "
                f"be finite, got {self.mean!r} / {self.std!r} / {self.rescale_factor!r}"
            )
        if self.resample not in _RESAMPLE_FILTERS or isinstance(self.resample, bool):
            raise ValueError(
                f"resample must be a PIL filter {_RESAMPLE_FILTERS}, got {self.resample!r}"
            )

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, defaults: ImagePreprocessor | None = None
    ) -> ImagePreprocessor:
        """Read ``preprocessor_config.json`` of a checkpoint folder, else use ``defaults``.

        Keys read: ``size`` (``{"height", "width"}`` or an int), ``image_mean``, ``image_std``,
        ``rescale_factor``, ``resample``, ``do_resize``, ``do_rescale``, ``do_normalize``.
        """
        base = defaults or cls()
        found = read_preprocessor_config(folder)
        if found is None:
            return base
        cfg, path = found
        return base.updated(cfg, source=str(path))

    def updated(self, cfg: Mapping[str, Any], *, source: str = "config") -> ImagePreprocessor:
        """Copy with the Hugging Face processor keys present in ``cfg`` applied.

        Raises
        ------
        ModelFileError
            (a ``ValueError`` naming ``source``) unreadable or out-of-bounds settings.
        """
        if not isinstance(cfg, Mapping):
            raise ModelFileError(f"{source}: preprocessing settings must be a JSON object")
        size = self.size
        raw = cfg.get("size")
        try:
            if isinstance(raw, int) and not isinstance(raw, bool):
                size = (raw, raw)
            elif isinstance(raw, Mapping) and raw.get("height") and raw.get("width"):
                size = (int(raw["height"]), int(raw["width"]))
            elif raw is not None:
                raise ValueError(f"unsupported size {raw!r} (expected an int or height/width)")
            return ImagePreprocessor(
                size=size,
                mean=tuple(float(v) for v in cfg.get("image_mean", self.mean)),  # type: ignore[arg-type]
                std=tuple(float(v) for v in cfg.get("image_std", self.std)),  # type: ignore[arg-type]
                rescale_factor=float(cfg.get("rescale_factor", self.rescale_factor)),
                resample=int(cfg.get("resample", self.resample)),
                do_resize=bool(cfg.get("do_resize", self.do_resize)),
                do_rescale=bool(cfg.get("do_rescale", self.do_rescale)),
                do_normalize=bool(cfg.get("do_normalize", self.do_normalize)),
            )
        except (TypeError, ValueError, OverflowError) as exc:
            raise ModelFileError(f"{source}: invalid preprocessing settings: {exc}") from None

    def with_size(self, size: Any, *, source: str) -> ImagePreprocessor:
        """Copy with ``size`` (checked like the constructor's; errors name ``source``)."""
        try:
            fixed = None if size is None else tuple(int(s) for s in size)
            return ImagePreprocessor(**{**self.__dict__, "size": fixed})
        except (TypeError, ValueError, OverflowError) as exc:
            raise ModelFileError(f"{source}: invalid network input size {size!r}: {exc}") from None

    def to_metadata(self) -> dict[str, str]:
        """The fields as ONNX metadata strings (``dynaguide.preprocess``)."""
        d = {
            "size": list(self.size) if self.size is not None else None,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "rescale_factor": self.rescale_factor,
            "resample": self.resample,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
        }
        return {METADATA_PREFIX + "preprocess": json.dumps(d)}

    @classmethod
    def from_metadata(
        cls,
        meta: Mapping[str, str],
        *,
        defaults: ImagePreprocessor | None = None,
        source: str = "ONNX metadata",
    ) -> ImagePreprocessor:
        """Inverse of :meth:`to_metadata`; ``defaults`` when the key is absent.

        Raises
        ------
        ModelFileError
            Unreadable settings, or a size beyond :data:`MAX_INPUT_SIDE` (checked before
            anything is allocated); the message names ``source``.
        """
        base = defaults or cls()
        raw = meta.get(METADATA_PREFIX + "preprocess")
        if raw is None:
            return base
        try:
            d = json.loads(raw)
        except ValueError as exc:
            raise ModelFileError(
                f"{source}: unreadable {METADATA_PREFIX}preprocess: {exc}"
            ) from None
        if not isinstance(d, dict):
            raise ModelFileError(f"{source}: {METADATA_PREFIX}preprocess is not a JSON object")
        size = d.pop("size", None)
        return base.updated(d, source=source).with_size(size, source=source)

    def __call__(self, image: np.ndarray, *, size: tuple[int, int] | None = None) -> np.ndarray:
        """Preprocess one image.

        Parameters
        ----------
        image : ndarray (H, W, 3) uint8
        size : (int, int), optional
            Overrides :attr:`size` for this call.

        Returns
        -------
        ndarray (1, 3, h, w) float32
        """
        from PIL import Image

        image = check_rgb_image(image, "image preprocessing")
        target = size if size is not None else self.size
        if self.do_resize and target is not None and tuple(target) != image.shape[:2]:
            h, w = int(target[0]), int(target[1])
            image = np.asarray(Image.fromarray(image).resize((w, h), resample=self.resample))
        x = image.astype(np.float64) * self.rescale_factor if self.do_rescale else image
        x = np.asarray(x, dtype=np.float32)
        if self.do_normalize:
            x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def resolve_torch_device(device: str) -> torch.device:
    """Torch device for a guide's ``device`` option (``"auto"`` -> CUDA when available)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    return torch.device(device)
