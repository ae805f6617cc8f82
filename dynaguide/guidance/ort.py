"""ONNX plumbing shared by the learned guides: export, preprocessing, ONNX Runtime sessions.

* :func:`export_onnx` exports a module whose single input is an image tensor
  ``(1, 3, H, W)`` with dynamic ``H`` and ``W``: first with the dynamo exporter
  (``torch.onnx.export(..., dynamo=True)``), then, if that fails or silently fixes the
  image size, with the legacy TorchScript exporter; the reason for every fallback is
  logged on the ``dynaguide.export`` logger and kept in the returned :class:`ExportReport`.
  Metadata (``dynaguide.*`` keys) is written into the model so an ``.onnx`` file is
  self-describing.
* :class:`ImagePreprocessor` reproduces the Hugging Face image processors' PIL path:
  resize (PIL, on the ``uint8`` image), rescale, normalise.
* :class:`OrtSession` wraps an ``onnxruntime.InferenceSession`` with the provider order
  CUDA -> CPU (only those available) and runs it through I/O binding, so outputs that
  feed another session can stay on the device.

Nothing here imports ``onnx`` or ``onnxruntime`` at module import time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaguide.errors import ModelFileError, first_line

logger = logging.getLogger("dynaguide.export")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METADATA_PREFIX = "dynaguide."
#: Largest network input side accepted from a model's metadata or configuration: beyond it
#: a preprocessed image alone would take gigabytes (SegFormer and ViTs run at 224-1024).
MAX_INPUT_SIDE = 4096
_RESAMPLE_FILTERS = (0, 1, 2, 3, 4, 5)  # PIL: nearest, lanczos, bilinear, bicubic, box, hamming

_INSTALL_HINT = (
    "install it with `pip install 'dynaguide[cpu]'` (onnxruntime) or "
    "`pip install 'dynaguide[cuda]'` "
    "(onnxruntime-gpu); never both"
)


def require_onnxruntime() -> Any:
    """Import and return ``onnxruntime`` with an actionable error when it is missing.

    Raises
    ------
    ImportError
        If neither ``onnxruntime`` nor ``onnxruntime-gpu`` is installed.
    """
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"onnxruntime is needed to run ONNX guides; {_INSTALL_HINT}") from exc
    return onnxruntime


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


def check_rgb_image(image: Any, name: str) -> np.ndarray:
    """Return ``image`` if it is a non-empty (H, W, 3) uint8 array, else raise ValueError."""
    if not (
        isinstance(image, np.ndarray)
        and image.ndim == 3
        and image.shape[2] == 3
        and image.dtype == np.uint8
    ):
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(
            f"{name} expects an (H, W, 3) uint8 RGB array, got shape {shape} dtype {dtype}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} got an empty image of shape {image.shape}")
    return image


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
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return base
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"cannot read {str(path)!r}: {exc}") from exc
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


@dataclass
class ExportReport:
    """What :func:`export_onnx` (and the verifying wrappers) did.

    Attributes
    ----------
    path : Path
        The written ``.onnx`` file.
    exporter : {"dynamo", "torchscript"}
        The exporter that produced the file.
    dynamic : bool
        Whether the image height and width are dynamic in the exported graph.
    fallback_reason : str or None
        Why the dynamo exporter's result was not used, if it was not.
    seconds : float
        Export wall time.
    max_abs_diff : float or None
        Largest absolute difference ORT vs torch on the verification input.
    verify_shape : tuple or None
        Shape of the verification input (different from the export input).
    """

    path: Path
    exporter: str
    dynamic: bool
    fallback_reason: str | None = None
    seconds: float = 0.0
    max_abs_diff: float | None = None
    verify_shape: tuple[int, ...] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One human-readable line."""
        parts = [f"wrote {self.path}", f"exporter={self.exporter}", f"dynamic_hw={self.dynamic}"]
        parts.append(f"export {self.seconds:.1f}s")
        if self.max_abs_diff is not None:
            parts.append(
                f"max|onnxruntime - torch|={self.max_abs_diff:.3g} "
                f"on input {list(self.verify_shape or ())}"
            )
        if self.fallback_reason:
            parts.append(f"fallback: {self.fallback_reason}")
        return ", ".join(parts)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def _input_is_dynamic(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return len(dims) == 4 and all(
        d.dim_param and not d.HasField("dim_value") for d in (dims[2], dims[3])
    )


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def export_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    input_name: str,
    output_names: Sequence[str],
    min_hw: int = 1,
    metadata: Mapping[str, str] | None = None,
    opset: int | None = None,
    legacy_opset: int = 18,
) -> ExportReport:
    """Export an image model to ONNX with dynamic height and width.

    Parameters
    ----------
    module : torch.nn.Module
        Module called as ``module(example)``; it is exported in eval mode.
    example : Tensor (1, 3, H, W)
        Export input. Choose H != W and sizes unlike any size the model special-cases.
    path : path
        Output ``.onnx``. Models under 1.5 GiB are written as one file (no ``.data``).
    input_name : str
        Name of the graph input.
    output_names : sequence of str
        Names of the graph outputs.
    min_hw : int
        Smallest height/width the dynamic dimensions accept.
    metadata : mapping, optional
        Extra ``metadata_props`` written into the model.
    opset : int, optional
        Opset for the dynamo exporter (its default when None).
    legacy_opset : int
        Opset for the TorchScript fallback.

    Returns
    -------
    ExportReport

    Raises
    ------
    ValueError
        If ``example`` is not a (1, C, H, W) tensor.
    RuntimeError
        If both exporters fail.
    """
    if not (isinstance(example, torch.Tensor) and example.ndim == 4 and example.shape[0] == 1):
        raise ValueError(
            f"example must be a (1, C, H, W) tensor, got {getattr(example, 'shape', type(example))}"
        )
    import onnx

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    single_file = _param_bytes(module) < 1.5 * 2**30
    t0 = time.perf_counter()
    exporter, dynamic, reason = "dynamo", True, None
    try:
        from torch.export import Dim

        dims = {2: Dim("height", min=min_hw, max=65536), 3: Dim("width", min=min_hw, max=65536)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(out),
                dynamo=True,
                input_names=[input_name],
                output_names=list(output_names),
                dynamic_shapes={_forward_arg_name(module): dims},
                opset_version=opset,
                external_data=not single_file,
                verbose=False,
            )
        if not _input_is_dynamic(out):
            reason = (
                "the dynamo exporter fixed the image size (a size-dependent branch was specialised)"
            )
    except Exception as exc:  # any exporter failure triggers the fallback, with its reason logged
        reason = f"the dynamo exporter failed: {first_line(exc)}"
        _remove(out)
    if reason is not None:
        logger.warning("ONNX export to %s: %s; trying the TorchScript exporter", out, reason)
        tmp = out.with_name(out.stem + ".torchscript.onnx")
        try:
            with warnings.catch_warnings(), _native_output_silenced():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    input_names=[input_name],
                    output_names=list(output_names),
                    dynamic_axes={input_name: {2: "height", 3: "width"}},
                    opset_version=legacy_opset,
                )
            _remove(out)
            tmp.replace(out)
            exporter, dynamic = "torchscript", _input_is_dynamic(out)
        except Exception as exc:
            _remove(tmp)
            legacy = first_line(exc)
            if not out.exists():
                raise RuntimeError(
                    f"ONNX export failed with both exporters: {reason}; torchscript: {legacy}"
                ) from exc
            logger.warning(
                "ONNX export to %s: the TorchScript exporter failed too (%s); "
                "keeping the dynamo export with a "
                "fixed input size %s",
                out,
                legacy,
                tuple(example.shape[2:]),
            )
            reason = f"{reason}; torchscript exporter: {legacy}"
            dynamic = False
    model = onnx.load(str(out))
    meta = dict(metadata or {})
    meta[METADATA_PREFIX + "exporter"] = exporter
    meta[METADATA_PREFIX + "dynamic_hw"] = json.dumps(dynamic)
    if not dynamic:
        meta[METADATA_PREFIX + "input_size"] = json.dumps(list(example.shape[2:]))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **meta})
    _remove(out)
    onnx.save(model, str(out), save_as_external_data=not single_file, location=out.name + ".data")
    return ExportReport(
        path=out,
        exporter=exporter,
        dynamic=dynamic,
        fallback_reason=reason,
        seconds=time.perf_counter() - t0,
        metadata=meta,
    )


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """Send file descriptors 1 and 2 to a scratch file for a block.

    The TorchScript exporter always logs the whole IR graph from C++ when it fails (its
    log switch tests a function object for truth), which would flood the terminal.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 1)
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, dup in zip((1, 2), saved, strict=True):
                os.dup2(dup, fd)
                os.close(dup)


def _shape_of(value: Any) -> list[int]:
    shape = getattr(value, "shape", ())
    return list(shape() if callable(shape) else shape)  # OrtValue.shape is a method


def _forward_arg_name(module: torch.nn.Module) -> str:
    import inspect

    params = [p for p in inspect.signature(module.forward).parameters.values() if p.name != "self"]
    if not params:
        raise ValueError(f"{type(module).__name__}.forward takes no input")
    return params[0].name


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (weights are not loaded).

    Raises
    ------
    ModelFileError
        The file is not a readable ONNX model (the message names it).
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except MemoryError as exc:
        raise MemoryError(f"{path}: out of memory reading the ONNX model") from exc
    except Exception as exc:  # protobuf DecodeError, onnx errors, ...
        raise ModelFileError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    return {p.key: p.value for p in model.metadata_props}


def check_onnx_file(path: str | os.PathLike, *, what: str) -> Path:
    """Check that ``path`` names an existing ``.onnx`` file.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the name does not end in ``.onnx``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{what}: {str(p)!r} does not exist (expected a folder or an .onnx file)"
        )
    if p.suffix.lower() != ".onnx" or not p.is_file():
        raise ValueError(f"{what}: expected an .onnx file or a checkpoint folder, got {str(p)!r}")
    return p


# --------------------------------------------------------------------------------------
# ONNX Runtime sessions
# --------------------------------------------------------------------------------------

_DEVICES = ("auto", "cpu", "cuda")


def select_providers(device: str = "auto") -> list[str]:
    """Execution providers in the order CUDA -> CPU, restricted to those installed.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}
        ``"auto"``: CUDA first when available, then CPU. ``"cuda"``: CUDA (then CPU for
        operators CUDA lacks); an error when ONNX Runtime has no CUDA provider.

    Raises
    ------
    ValueError
        For an unknown ``device`` or ``"cuda"`` without ``CUDAExecutionProvider``.
    """
    if device not in _DEVICES:
        raise ValueError(f"device must be one of {_DEVICES}, got {device!r}")
    ort = require_onnxruntime()
    available = ort.get_available_providers()
    order = (
        ["CPUExecutionProvider"]
        if device == "cpu"
        else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    providers = [p for p in order if p in available]
    if device == "cuda" and "CUDAExecutionProvider" not in providers:
        raise ValueError(
            "device='cuda' but ONNX Runtime has no CUDAExecutionProvider "
            f"(available: {available}); "
            "install onnxruntime-gpu (`pip install 'dynaguide[cuda]'`)"
        )
    return providers


class OrtSession:
    """An ONNX Runtime session run through I/O binding.

    Parameters
    ----------
    model : path or bytes
        ``.onnx`` file or serialised model.
    device : {"auto", "cpu", "cuda"}
        See :func:`select_providers`.
    threads : int, optional
        Intra-op threads (ORT's default when None).

    Attributes
    ----------
    providers : list of str
        Providers the session actually uses.
    device_type : {"cpu", "cuda"}
        Where bound outputs live.
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        *,
        device: str = "auto",
        threads: int | None = None,
        name: str | None = None,
    ):
        ort = require_onnxruntime()
        self.name = name or (str(model) if not isinstance(model, bytes) else "ONNX model")
        self._ort = ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be a positive int, got {threads!r}")
            options.intra_op_num_threads = threads
        src = model if isinstance(model, bytes) else str(model)
        providers = select_providers(device)
        try:
            self.session = ort.InferenceSession(src, sess_options=options, providers=providers)
        except MemoryError:
            raise
        except Exception as exc:  # InvalidProtobuf, InvalidGraph, Fail, NoSuchFile, ...
            raise ModelFileError(
                f"{self.name}: ONNX Runtime cannot load the model ({first_line(exc)})"
            ) from None
        self.providers: list[str] = self.session.get_providers()
        self.device_type = (
            "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shapes = {i.name: i.shape for i in self.session.get_inputs()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run and return every output as a host array."""
        values = self.run_bound(feeds, keep_on_device=())
        return {name: v.numpy() for name, v in values.items()}

    def run_bound(
        self, feeds: Mapping[str, Any], *, keep_on_device: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Run with I/O binding; return ``OrtValue`` outputs.

        Parameters
        ----------
        feeds : mapping name -> ndarray or OrtValue
            Host arrays are copied to the session's device once; ``OrtValue`` inputs
            (e.g. another session's device output) are bound without a copy.
        keep_on_device : sequence of str
            Outputs left in device memory (on a CUDA session); the others are bound to the host.

        Returns
        -------
        dict name -> OrtValue
        """
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise ValueError(
                f"missing ONNX inputs {sorted(missing)}; the model takes {self.input_names}"
            )
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            elif self.device_type == "cuda" and name not in self._host_inputs():
                binding.bind_ortvalue_input(
                    name, self._ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
                )
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            where = self.device_type if name in keep_on_device else "cpu"
            binding.bind_output(name, where, 0)
        try:
            self.session.run_with_iobinding(binding)
        except MemoryError:
            raise
        except Exception as exc:  # InvalidArgument (the model does not take this input), Fail
            shapes = {k: _shape_of(v) for k, v in feeds.items()}
            raise ModelFileError(
                f"{self.name}: ONNX Runtime failed on inputs {shapes} ({first_line(exc)}); "
                "is this the right model for this guide?"
            ) from None
        return dict(zip(self.output_names, binding.get_outputs(), strict=True))

    def _host_inputs(self) -> set[str]:
        # shape-like int64 inputs (e.g. an output size) are consumed on the host by ORT kernels
        return {i.name for i in self.session.get_inputs() if i.type == "tensor(int64)"}


def resolve_torch_device(device: str) -> torch.device:
    """Torch device for a guide's ``device`` option (``"auto"`` -> CUDA when available)."""
    if device not in _DEVICES:
        raise ValueError(f"device must be one of {_DEVICES}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    return torch.device(device)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b|`` with a shape check (inf when shapes differ)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return math.inf
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def verify_image_model(
    report: ExportReport,
    module: torch.nn.Module,
    shapes: list[tuple[int, ...]],
    *,
    atol: float,
    seed: int,
) -> None:
    """Run ORT (CPU) and torch on fresh random inputs; store the max abs difference in ``report``.

    Raises
    ------
    RuntimeError
        If ``max |ort - torch| > atol * max(1, max |torch|)`` on any input.
    """
    session = OrtSession(report.path, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    worst, worst_shape = 0.0, None
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.inference_mode():
            ref = module(x)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        got = session.run({session.input_names[0]: x.numpy()})
        for name, r in zip(session.output_names, refs, strict=True):
            r = r.detach().cpu().numpy()
            d = max_abs_diff(got[name], r)
            if d > atol * max(1.0, float(np.abs(r).max())):
                raise RuntimeError(
                    f"ONNX verification failed for {report.path}: output {name!r} "
                    f"differs from torch by {d:.3g} "
                    f"on an input of shape {list(shape)}"
                )
            if d >= worst:
                worst, worst_shape = d, tuple(shape)
    report.max_abs_diff = worst
    report.verify_shape = worst_shape


def temporary_onnx_path(stem: str) -> tuple[Path, Callable[[], None]]:
    """A fresh path in a private temporary folder and a function removing the folder."""
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="dynaguide-onnx-"))
    return folder / f"{stem}.onnx", lambda: shutil.rmtree(folder, ignore_errors=True)
