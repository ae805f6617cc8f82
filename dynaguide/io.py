"""Reading images and writing results.

Every image a user can pass goes through :func:`load_image`, which returns one canonical
form (RGB ``uint8``, shape (H, W, 3), C-contiguous) or raises an error that names the
input. Results are written with :func:`write_atomic` (temporary file in the target
folder, ``fsync``, ``os.replace``), so an interrupted run never leaves a half-written
file under a final name.

Error messages are built only when a check fails: the checks on the normal path
format nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "list_images",
    "load_image",
    "read_label_png",
    "save_json",
    "save_label_png",
    "save_rgb_png",
    "to_jsonable",
    "write_atomic",
]

#: File extensions (lower case, with the dot) that :func:`list_images` picks up.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_MIN_SIDE = 2
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded (corrupt, truncated, not an image,
    or refused by PIL as a possible decompression bomb). The message names the file."""


# --------------------------------------------------------------------------- loading


def load_image(source: Any, *, name: str | None = None) -> np.ndarray:
    """Load or convert an image to RGB ``uint8`` of shape (H, W, 3), C-contiguous.

    Parameters
    ----------
    source : str, os.PathLike, PIL.Image.Image, numpy.ndarray or torch.Tensor
        - **path**: decoded with PIL. The EXIF orientation is applied; for multi-frame
          files (GIF, TIFF) the first frame is used.
        - **bytes**: the encoded content of an image file (JPEG, PNG, ...), e.g. read
          from an object store; decoded exactly like a path.
        - **PIL image**: any mode (see the policy below), used as it is (no EXIF
          transpose: that is applied only when dynaguide opens the file itself).
        - **numpy array**: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), channels last, of
          dtype ``uint8``, ``uint16``, ``float16``, ``float32`` or ``float64``.
          Other dtypes (``bool``, signed integers, ...) raise ``TypeError``.
        - **torch tensor**: same dtypes (``bfloat16`` too), on any device. A 3-dim
          tensor whose *first* dimension is 1, 3 or 4 and whose *last* dimension is
          not is read as channels-first (C, H, W); every other 3-dim tensor is
          channels-last (H, W, C). A 4-dim tensor with a leading batch dimension of 1
          is squeezed first.
    name : str, optional
        Name of the input used in error messages (default: the path, or a
        description such as ``"array of shape (4, 4, 5)"``).

    Returns
    -------
    numpy.ndarray
        (H, W, 3) ``uint8``, C-contiguous. A new array: never a view of ``source``.

    Raises
    ------
    TypeError
        Unsupported input type or dtype.
    ValueError
        Bad shape, an image smaller than 2x2 (a one-pixel image cannot train the
        network's BatchNorm), NaN or infinite values, floats outside [0, 1].
    ImageReadError
        (a ``ValueError``) a file that cannot be decoded.
    FileNotFoundError
        A path that does not exist.

    Notes
    -----
    Conversion policy:

    - grayscale (H, W) / (H, W, 1), PIL modes ``L``, ``1``: replicated to 3 channels;
    - an alpha channel ((H, W, 4), PIL ``RGBA``, ``LA``, ``PA``) is **dropped**, not
      composited: the colour values are used as they are;
    - palette images (PIL ``P``) are expanded to their RGB colours;
    - 16-bit data (``uint16`` arrays, 16-bit PNGs, PIL ``I;16*`` and ``I`` modes) is
      scaled to 8 bits as ``round(v / 257)``, so 65535 maps to 255; PIL ``I`` images
      must lie in [0, 65535];
    - floats (arrays, tensors, PIL ``F``) must lie in [0, 1] and are mapped with
      ``round(v * 255)``;
    - other PIL modes (``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) are converted by PIL.

    Examples
    --------
    >>> import numpy as np
    >>> load_image(np.zeros((4, 5), np.float32)).shape
    (4, 5, 3)
    >>> load_image(np.full((2, 2, 3), 65535, np.uint16))[0, 0]
    array([255, 255, 255], dtype=uint8)
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _load_bytes(bytes(source), name)
    if isinstance(source, Image.Image):
        try:
            source.load()  # a lazily opened image decodes here
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageReadError(
                f"{_pil_label(source, name, None)}: cannot decode image: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return _from_pil(source, name, None)
    if isinstance(source, np.ndarray):
        return _from_array(source, name, "array")
    torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported
    if torch is not None and isinstance(source, torch.Tensor):
        return _from_array(_tensor_to_hwc(source, name), name, "tensor")
    raise TypeError(
        f"{_label(name, 'input')}: unsupported image type {type(source).__module__}."
        f"{type(source).__qualname__}; expected a path, image file bytes, PIL.Image.Image, "
        "numpy.ndarray or torch.Tensor"
    )


def _label(name: str | None, fallback: str) -> str:
    return name if name is not None else fallback


def _describe(arr: np.ndarray, kind: str) -> str:
    return f"{kind} of shape {tuple(arr.shape)} and dtype {arr.dtype}"


def _tensor_to_hwc(t: Any, name: str | None) -> np.ndarray:
    """Tensor -> channels-last numpy array (dtype checks happen in _from_array)."""
    import torch

    t = t.detach()
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(
            f"{_label(name, f'tensor of shape {tuple(t.shape)}')}: unsupported dtype {t.dtype}; "
            "expected uint8, uint16 or a floating dtype with values in [0, 1]"
        )
    return t.cpu().numpy()


def _from_array(arr: np.ndarray, name: str | None, kind: str) -> np.ndarray:
    """Validate and convert a channels-last array to RGB uint8 (always a new array)."""
    ndim = arr.ndim
    if ndim == 3:
        channels = arr.shape[2]
        if channels not in (1, 3, 4):
            raise ValueError(
                f"{_label(name, _describe(arr, kind))}: expected 1, 3 or 4 channels in the last "
                f"dimension, got shape {tuple(arr.shape)}"
                + (
                    "; channels-first arrays must be moved: np.moveaxis(a, 0, -1)"
                    if arr.shape[0] in (1, 3, 4)
                    else ""
                )
            )
    elif ndim != 2:
        raise ValueError(
            f"{_label(name, _describe(arr, kind))}: expected shape (H, W), (H, W, 1), (H, W, 3) "
            f"or (H, W, 4), got {ndim} dimension(s) {tuple(arr.shape)}"
        )
    h, w = arr.shape[0], arr.shape[1]
    if h < _MIN_SIDE or w < _MIN_SIDE:
        raise ValueError(
            f"{_label(name, _describe(arr, kind))}: image is "
            + ("empty" if h * w == 0 else f"{h}x{w} pixels")
            + f"; both sides must be at least {_MIN_SIDE} pixels (a single pixel row or column "
            "cannot train the network's BatchNorm layers)"
        )

    dtype = arr.dtype
    if dtype == np.uint8:
        out = arr
    elif dtype == np.uint16:
        out = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif dtype in _FLOAT_DTYPES:
        lo, hi = arr.min(), arr.max()  # NaN propagates through min/max
        if not (lo >= 0 and hi <= 1):
            raise ValueError(_float_range_message(arr, lo, hi, _label(name, _describe(arr, kind))))
        work = arr.astype(np.float32) if dtype == np.float16 else arr
        out = np.rint(work * 255.0).astype(np.uint8)
    else:
        raise TypeError(
            f"{_label(name, _describe(arr, kind))}: unsupported dtype {dtype}; expected uint8, "
            "uint16, or float16/32/64 with values in [0, 1]"
            + (
                ""
                if dtype == np.bool_
                else " (convert with a.astype(np.uint8) if values are 0..255)"
            )
        )

    if ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    elif out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    elif out.shape[2] == 4:
        out = out[:, :, :3]
    # a copy when `out` is still `arr` (or a view of it): the caller may mutate either
    if out is arr or out.base is not None or not out.flags.c_contiguous:
        out = np.array(out, dtype=np.uint8, order="C", copy=True)
    return out


def _float_range_message(arr: np.ndarray, lo: Any, hi: Any, label: str) -> str:
    n_nan = int(np.isnan(arr).sum())
    n_inf = int(np.isinf(arr).sum())
    if n_nan or n_inf:
        return (
            f"{label}: contains {n_nan} NaN and {n_inf} infinite value(s); "
            "a float image must be finite and lie in [0, 1]"
        )
    return (
        f"{label}: float values must lie in [0, 1], found range [{float(lo):.6g}, {float(hi):.6g}]"
        + ("; divide by 255 if it holds 0..255 values" if float(hi) <= 255 else "")
    )


def _load_path(path: Path, name: str | None) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{_label(name, str(path))}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{_label(name, str(path))}: is a directory, not an image file")
    return _decode_file(path, _label(name, str(path)), str(path), name)


def _load_bytes(data: bytes, name: str | None) -> np.ndarray:
    label = _label(name, f"image file content ({len(data)} bytes)")
    return _decode_file(io.BytesIO(data), label, None, label)


def _decode_file(
    file: Path | io.BytesIO, label: str, path: str | None, name: str | None = None
) -> np.ndarray:
    """Decode an image file (a path or an in-memory file) with EXIF orientation applied."""
    try:
        with Image.open(file) as im:
            im.load()  # decodes the first frame; the pixels stay valid after closing
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            f"{label}: refused by PIL as a possible decompression bomb ({exc}). "
            "If you trust this file, raise PIL.Image.MAX_IMAGE_PIXELS (None disables the check)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(
            f"{label}: not a readable image file (PIL cannot identify it)"
        ) from exc
    except (PermissionError, MemoryError):
        raise
    except Exception as exc:  # OSError (truncated), SyntaxError, struct.error, zlib.error, ...
        raise ImageReadError(f"{label}: cannot decode image: {type(exc).__name__}: {exc}") from exc
    try:
        im = ImageOps.exif_transpose(im)
    except Exception as exc:  # malformed EXIF must not make a readable image unusable
        warnings.warn(
            f"{label}: could not apply the EXIF orientation ({exc}); using the image as stored",
            stacklevel=4,
        )
    return _from_pil(im, name, path)


def _from_pil(im: Image.Image, name: str | None, path: str | None) -> np.ndarray:
    """PIL image of any mode -> RGB uint8 per the policy of :func:`load_image`."""
    mode = im.mode
    if mode in ("RGB", "L", "F"):
        arr = np.asarray(im)
    elif mode == "1":
        arr = np.asarray(im.convert("L"))
    elif mode == "LA":
        arr = np.asarray(im)[:, :, 0]  # alpha dropped
    elif mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.uint16)  # native byte order
    elif mode == "I":
        arr = np.asarray(im)
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > 65535:
                raise ValueError(
                    f"{_pil_label(im, name, path)}: 32-bit integer image (PIL mode 'I') with "
                    f"values in [{lo}, {hi}]; only [0, 65535] (16-bit data) is supported"
                )
        arr = arr.astype(np.uint16)
    else:  # P, PA, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV, ...: PIL knows the colours
        try:
            arr = np.asarray(im.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise TypeError(
                f"{_pil_label(im, name, path)}: PIL mode {mode!r} cannot be converted to RGB: {exc}"
            ) from exc
    return _from_array(arr, _label(name, path) if path is not None else name, "PIL image")


def _pil_label(im: Image.Image, name: str | None, path: str | None) -> str:
    if name is not None:
        return name
    if path is not None:
        return path
    return f"PIL image (mode {im.mode}, size {im.size[0]}x{im.size[1]})"


def list_images(folder: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Image files in ``folder``, sorted by path.

    Parameters
    ----------
    folder : str or os.PathLike
        Folder to scan.
    recursive : bool
        Also scan sub-folders.

    Returns
    -------
    list of Path
        Files whose extension (case-insensitive) is one of :data:`IMAGE_EXTENSIONS`;
        hidden files (name starting with ``.``, e.g. macOS ``._x.jpg``) are ignored.

    Raises
    ------
    FileNotFoundError
        ``folder`` does not exist.
    NotADirectoryError
        ``folder`` is a file.
    ValueError
        ``folder`` holds no image file.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    candidates = root.rglob("*") if recursive else root.iterdir()
    found = sorted(
        p
        for p in candidates
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if not found:
        raise ValueError(
            f"{root}: no image files found{' (searched recursively)' if recursive else ''}; "
            f"looked for extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    return found


# --------------------------------------------------------------------------- writing


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # not thread-safe, only reached where /proc is missing
    os.umask(old)
    return old


def write_atomic(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, which is flushed, ``fsync``-ed
    and renamed over ``path`` with :func:`os.replace`: readers see either the old file
    or the complete new one. Missing parent folders are created. The file gets the
    usual permissions (``0o666`` minus the umask).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    data : bytes-like
        Content.

    Returns
    -------
    Path
        ``path``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{path}: data must be bytes-like, got {type(data).__name__}")
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target}: is a directory")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)
    return target


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); silently skipped where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


def save_label_png(path: str | os.PathLike[str], labels: np.ndarray) -> Path:
    """Save a label map as a 16-bit grayscale PNG, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination ``.png``.
    labels : numpy.ndarray
        (H, W) integer array with values in [0, 65535].

    Returns
    -------
    Path
        ``path``. :func:`read_label_png` reads it back exactly.
    """
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"{path}: labels must be a 2-D (H, W) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{path}: labels must have an integer dtype, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{path}: labels array of shape {arr.shape} is empty")
    if arr.dtype != np.uint16:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"{path}: label values must fit in a 16-bit PNG ([0, 65535]), found range "
                f"[{lo}, {hi}]"
            )
        arr = arr.astype(np.uint16)
    return write_atomic(path, _png_bytes(Image.fromarray(np.ascontiguousarray(arr))))


def read_label_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label map written by :func:`save_label_png` (or any 8/16-bit single-channel
    PNG, palette indices included) as an (H, W) ``int32`` array."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            if mode not in ("L", "P", "I", "1") and not mode.startswith("I;16"):
                raise ImageReadError(
                    f"{p}: PIL mode {mode!r} is not a single-channel label map (expected a "
                    "16-bit or 8-bit grayscale or palette PNG)"
                )
            arr = np.asarray(im)
    except ImageReadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{p}: not a readable image file (PIL cannot identify it)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise ImageReadError(f"{p}: cannot decode label map: {type(exc).__name__}: {exc}") from exc
    return arr.astype(np.int32)


def save_rgb_png(path: str | os.PathLike[str], rgb: np.ndarray) -> Path:
    """Save an (H, W, 3) ``uint8`` RGB image as PNG, atomically; returns ``path``."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"{path}: expected an (H, W, 3) uint8 RGB array, got shape {arr.shape} and dtype "
            f"{arr.dtype}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{path}: RGB array of shape {arr.shape} is empty")
    return write_atomic(path, _png_bytes(Image.fromarray(np.ascontiguousarray(arr), mode="RGB")))


def to_jsonable(obj: Any, *, where: str = "object") -> Any:
    """Recursively convert ``obj`` to plain JSON types.

    numpy scalars and arrays become Python numbers and lists, dataclasses dicts (or
    their ``to_dict()``), paths strings, tuples and sets lists, torch tensors lists;
    non-finite floats become ``None`` (JSON has no NaN). Raises ``TypeError`` naming
    the offending key for anything else.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item(), where=where)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), where=where)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, where=f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, where=f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v, where=where) for v in obj), key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        return to_jsonable(to_dict() if callable(to_dict) else dataclasses.asdict(obj), where=where)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist(), where=where)
    raise TypeError(f"{where}: value of type {type(obj).__qualname__} is not JSON-serialisable")


def save_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON, atomically (see :func:`to_jsonable` for the
    conversions applied). Returns ``path``."""
    text = json.dumps(
        to_jsonable(obj, where=str(path)), indent=2, allow_nan=False, ensure_ascii=False
    )
    return write_atomic(path, (text + "\n").encode("utf-8"))
