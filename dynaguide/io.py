"""Reading images (the writers live in :mod:`dynaguide.writing` and are re-exported here).

Every image a user can pass goes through :func:`load_image`, which returns one canonical
form (RGB ``uint8``, shape (H, W, 3), C-contiguous) or raises an error that names the
input. Image files are checked against a pixel budget (:data:`MAX_DECODE_PIXELS`) from
their header, before any pixel is decoded. Results are written with :func:`write_atomic`
(temporary file in the target folder, ``fsync``, ``os.replace``), so an interrupted run
never leaves a half-written file under a final name.

Error messages are built only when a check fails: the checks on the normal path
format nothing. (Over 400 lines because every way an image comes in -- arrays, tensors,
PIL images, files and folders -- is checked here, in one place.)
"""

from __future__ import annotations

import errno
import io
import os
import stat
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dynaguide.errors import ImageReadError, ImageTooLargeError
from dynaguide.writing import (  # re-exported: the writers' historical home
    _umask,  # noqa: F401
    read_label_png,
    save_json,
    save_label_png,
    save_rgb_png,
    to_jsonable,
    write_atomic,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_DECODE_PIXELS",
    "ImageReadError",
    "ImageTooLargeError",
    "decode_budget",
    "list_images",
    "load_image",
    "read_label_png",
    "reduce_for_resize",
    "save_json",
    "save_label_png",
    "save_rgb_png",
    "to_jsonable",
    "write_atomic",
]

#: File extensions (lower case, with the dot) that :func:`list_images` picks up.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: Pixel budget of an image file (width x height, read from its header before decoding):
#: larger files raise :class:`ImageTooLargeError`. 64 megapixels hold any camera photo up
#: to 64 MP; the whole pipeline needs about 40 bytes per pixel at full size. The environment
#: variable ``DYNAGUIDE_MAX_DECODE_PIXELS`` (an integer, or ``none``) overrides it.
MAX_DECODE_PIXELS: int | None = 64_000_000
_BUDGET_ENV = "DYNAGUIDE_MAX_DECODE_PIXELS"

_MIN_SIDE = 2
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


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
        (a ``ValueError``) a file that cannot be decoded, a symbolic link loop.
    ImageTooLargeError
        (a ``ValueError``) a file (or lazily opened PIL image) with more pixels than
        :func:`decode_budget`, refused from its header before any pixel is decoded.
    FileNotFoundError
        A path that does not exist (or a broken symbolic link).

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
        if getattr(source, "fp", None) is not None:  # lazily opened: not decoded yet
            _check_budget(source, _pil_label(source, name, None))
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
    if t.device.type == "meta":
        raise TypeError(
            f"{_label(name, f'tensor of shape {tuple(t.shape)}')}: a meta tensor holds no data"
        )
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
    if not arr.dtype.isnative:  # big-endian data from a file or another machine
        arr = arr.astype(arr.dtype.newbyteorder("="))
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


def decode_budget() -> int | None:
    """The pixel budget of image files now: ``DYNAGUIDE_MAX_DECODE_PIXELS`` if set, else
    :data:`MAX_DECODE_PIXELS` (None: no budget)."""
    raw = os.environ.get(_BUDGET_ENV)
    if raw is None or not raw.strip():
        return MAX_DECODE_PIXELS
    if raw.strip().lower() == "none":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"{_BUDGET_ENV}={raw!r}: expected a positive integer number of pixels or 'none'"
        ) from None
    if value < 4:
        raise ValueError(f"{_BUDGET_ENV}={raw!r}: expected at least 4 pixels")
    return value


def _check_budget(im: Image.Image, label: str) -> None:
    """Refuse an image whose header announces more pixels than the budget (nothing decoded)."""
    budget = decode_budget()
    w, h = im.size
    if budget is not None and w * h > budget:
        raise ImageTooLargeError(
            f"{label}: {w}x{h} pixels ({w * h / 1e6:.1f} MP) exceed the pixel budget of "
            f"{budget} pixels ({budget / 1e6:.1f} MP); raise it with the environment variable "
            f"{_BUDGET_ENV} (or dynaguide.io.MAX_DECODE_PIXELS) if this file is trusted and "
            "memory allows"
        )


def _stat_error(path: Path, label: str) -> OSError | ImageReadError | None:
    """The error to raise for a path that cannot be opened as a file, or None if it can."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            return FileNotFoundError(f"{label}: broken symbolic link to {os.readlink(path)!r}")
        return FileNotFoundError(f"{label}: no such file")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return ImageReadError(f"{label}: symbolic link loop (the link points back to itself)")
        if exc.errno == errno.ENAMETOOLONG:
            return ImageReadError(f"{label}: file name too long")
        return type(exc)(exc.errno, f"{label}: {exc.strerror}")
    except ValueError as exc:  # embedded NUL byte
        return ImageReadError(f"{label}: invalid path ({exc})")
    if stat.S_ISDIR(st.st_mode):
        return ImageReadError(f"{label}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        return ImageReadError(f"{label}: not a regular file (device, socket or pipe)")
    return None


def _load_path(path: Path, name: str | None) -> np.ndarray:
    label = _label(name, str(path))
    problem = _stat_error(path, label)
    if problem is not None:
        raise problem
    return _decode_file(path, label, str(path), name)


def _load_bytes(data: bytes, name: str | None) -> np.ndarray:
    label = _label(name, f"image file content ({len(data)} bytes)")
    return _decode_file(io.BytesIO(data), label, None, label)


def _decode_file(
    file: Path | io.BytesIO, label: str, path: str | None, name: str | None = None
) -> np.ndarray:
    """Decode an image file (a path or an in-memory file) with EXIF orientation applied."""
    try:
        with Image.open(file) as im:
            _check_budget(im, label)
            im.load()  # decodes the first frame; the pixels stay valid after closing
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            f"{label}: refused by PIL as a possible decompression bomb ({exc}). "
            "If you trust this file, raise PIL.Image.MAX_IMAGE_PIXELS (None disables the check)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(
            f"{label}: not a readable image file (PIL cannot identify it)"
        ) from exc
    except PermissionError as exc:
        raise PermissionError(exc.errno, f"{label}: {exc.strerror}") from exc
    except MemoryError as exc:
        raise MemoryError(f"{label}: out of memory while decoding the image") from exc
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


def list_images(
    folder: str | os.PathLike[str], *, recursive: bool = False, skip_outputs: bool = True
) -> list[Path]:
    """Image files in ``folder``, sorted by path.

    Parameters
    ----------
    folder : str or os.PathLike
        Folder to scan.
    recursive : bool
        Also scan sub-folders.
    skip_outputs : bool
        Leave out the files dynaguide itself wrote there (label maps and overlays recorded
        in the folder's manifest, see :mod:`dynaguide.manifest`), so a folder of results is
        never read back as a folder of inputs.

    Returns
    -------
    list of Path
        Files whose extension (case-insensitive) is one of :data:`IMAGE_EXTENSIONS`;
        hidden files and folders (name starting with ``.``, e.g. macOS ``._x.jpg``) are
        ignored. Broken symbolic links are listed (loading them gives a clear error).

    Raises
    ------
    FileNotFoundError
        ``folder`` does not exist.
    NotADirectoryError
        ``folder`` is a file.
    ValueError
        ``folder`` holds no image file.
    """
    from dynaguide.manifest import read_manifest, written_by_dynaguide

    root = Path(folder)
    try:
        st = root.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: no such folder") from None
    except OSError as exc:  # a symbolic link loop, no permission, ...
        raise type(exc)(exc.errno, f"{root}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{root}: not a folder")
    candidates = root.rglob("*") if recursive else root.iterdir()
    found = sorted(
        p
        for p in candidates
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and (p.is_file() or (p.is_symlink() and not p.is_dir()))
    )
    if skip_outputs:
        manifests: dict[Path, Any] = {}
        kept = []
        for p in found:
            if p.parent not in manifests:
                manifests[p.parent] = read_manifest(p.parent)
            if not (manifests[p.parent] and written_by_dynaguide(p, manifests[p.parent])):
                kept.append(p)
        found = kept
    if not found:
        raise ValueError(
            f"{root}: no image files found{' (searched recursively)' if recursive else ''}; "
            f"looked for extensions {', '.join(IMAGE_EXTENSIONS)}"
            + (" (files dynaguide wrote itself are not inputs)" if skip_outputs else "")
        )
    return found


def reduce_for_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Shrink a large ``image`` by an integer box filter (``PIL.Image.reduce``) towards ``size``.

    Downscaling a big image with scikit-image's anti-aliased resize allocates several
    float64 copies of the whole image (24 bytes per pixel each). For images above 16 MP
    whose target is at least 4 times smaller per side, the image is first reduced by the
    largest integer factor that keeps it at least twice the target size, in ``uint8``; the
    final anti-aliased resize then works on the small image. Smaller images are returned as
    they are, so their results do not change.
    """
    h, w = image.shape[:2]
    th, tw = size
    factor = min(h // (2 * max(1, th)), w // (2 * max(1, tw)))
    if h * w <= 16_000_000 or factor < 2:
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).reduce(int(factor)))
