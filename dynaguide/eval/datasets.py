"""Dataset readers for evaluation: the BSDS500 layout and a plain images/ + masks/ folder.

Both yield :class:`DatasetItem` objects (id, image path, annotations loaded lazily on
access) in sorted id order. Nothing is read from ``../shared`` at import time.

Policy for images without annotations: by default they are skipped with ONE warning
that lists them (``on_missing="warn"``); ``on_missing="error"`` raises instead.
Annotations without an image are ignored silently (they cannot be scored).
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "BSDS500Dataset",
    "DatasetError",
    "DatasetItem",
    "FolderDataset",
    "load_bsds_annotations",
    "load_mask",
    "open_dataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".npy")
OnMissing = Literal["warn", "error"]


class DatasetError(ValueError):
    """A dataset folder or file is missing, empty or corrupt (the message names it)."""


def _natural_key(key: str) -> tuple[int, str]:
    m = re.fullmatch(r"a(\d+)", key)
    return (int(m.group(1)), key) if m else (1 << 30, key)


def load_bsds_annotations(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """Read a BSDS ``<id>.npz``: keys ``a0, a1, ...`` (sorted numerically), uint16 (H, W).

    Raises
    ------
    DatasetError
        If the file is unreadable, holds no ``a<k>`` key, or the maps are not 2-D
        integer arrays of one shape.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = sorted((k for k in z.files if re.fullmatch(r"a\d+", k)), key=_natural_key)
            if not keys:
                raise DatasetError(f"{path}: no annotation keys a0, a1, ... (found {z.files})")
            maps = [np.asarray(z[k]) for k in keys]
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}: cannot read annotations ({exc})") from None
    for k, m in zip(keys, maps, strict=True):
        if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer):
            raise DatasetError(f"{path}: {k} is not a 2-D integer label map ({m.dtype}, {m.shape})")
        if m.shape != maps[0].shape:
            raise DatasetError(f"{path}: {k} has shape {m.shape}, {keys[0]} has {maps[0].shape}")
    return maps


def load_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an index mask with its raw values (palette indices for 'P' PNGs, not colours).

    Accepts palette / grayscale / 16-bit PNG (or BMP, TIFF) and ``.npy``. Colour (RGB)
    masks are refused: their colours would have to be mapped to ids first.

    Raises
    ------
    DatasetError
        If the file is unreadable, not 2-D, or a colour image.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot read mask ({exc})") from None
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                    raise DatasetError(
                        f"{path}: colour ({im.mode}) mask; expected an index mask "
                        "(palette 'P', grayscale 'L' or 16-bit 'I;16' PNG)"
                    )
                a = np.array(im)
        except DatasetError:
            raise
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot read mask ({exc})") from None
    if a.ndim != 2:
        raise DatasetError(f"{path}: mask must be 2-D, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise DatasetError(f"{path}: mask must hold integers, got {a.dtype}")
    return a


@dataclass(frozen=True)
class DatasetItem:
    """One image of a dataset.

    Attributes
    ----------
    id : str
        The file stem, e.g. ``"101085"``.
    image_path : Path
    annotation_path : Path
        The ``.npz`` (BSDS) or mask file.
    kind : {"bsds500", "folder"}
    """

    id: str
    image_path: Path
    annotation_path: Path
    kind: str
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def annotations(self) -> list[np.ndarray]:
        """The GT label maps (read on first access, then kept): all annotators for
        BSDS, the single mask for a folder dataset. Raises :class:`DatasetError`."""
        if "annotations" not in self._cache:
            if self.kind == "bsds500":
                self._cache["annotations"] = load_bsds_annotations(self.annotation_path)
            else:
                self._cache["annotations"] = [load_mask(self.annotation_path)]
        return self._cache["annotations"]

    def load_image(self) -> np.ndarray:
        """The image as RGB uint8 (H, W, 3), EXIF orientation applied as
        :func:`dynaguide.segment` does. Raises :class:`DatasetError` if corrupt."""
        from dynaguide.io import load_image

        try:
            return load_image(self.image_path)
        except (OSError, ValueError, TypeError) as exc:
            raise DatasetError(f"{self.image_path}: cannot read image ({exc})") from None


class _Dataset:
    """Common behaviour: a sorted, indexable, sliceable list of items."""

    kind: str = ""
    #: which metric family scores it: "bsds" (multi-annotator) or "voc" (one mask)
    metric: str = ""

    def __init__(self, root: Path, items: list[DatasetItem], skipped: list[str]) -> None:
        self.root = root
        self.items = items
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[DatasetItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> DatasetItem:
        return self.items[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, n={len(self)})"

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: kind, root, number of items, skipped ids."""
        return {
            "kind": self.kind,
            "root": str(self.root),
            "n_items": len(self),
            "skipped_without_annotation": list(self.skipped),
        }


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}")
    if not path.is_dir():
        raise DatasetError(f"{what} is not a folder: {path}")


def _list_files(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith("."):
            if p.stem in out:
                raise DatasetError(
                    f"{folder}: two files share the id {p.stem!r}: {out[p.stem].name}, {p.name}"
                )
            out[p.stem] = p
    return out


def _pair(
    root: Path,
    images: dict[str, Path],
    annotations: dict[str, Path],
    kind: str,
    on_missing: OnMissing,
) -> tuple[list[DatasetItem], list[str]]:
    if on_missing not in ("warn", "error"):
        raise ValueError(f"on_missing must be 'warn' or 'error', got {on_missing!r}")
    if not images:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    missing = [i for i in images if i not in annotations]
    if missing:
        listed = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        msg = f"{root}: {len(missing)} image(s) without annotation: {listed}"
        if on_missing == "error":
            raise DatasetError(msg)
        warnings.warn(msg + " (skipped)", stacklevel=3)
    items = [
        DatasetItem(id=i, image_path=p, annotation_path=annotations[i], kind=kind)
        for i, p in sorted(images.items())
        if i in annotations
    ]
    if not items:
        raise DatasetError(f"{root}: no image has an annotation")
    return items, missing


class BSDS500Dataset(_Dataset):
    """A BSDS500 split: ``<root>/images/<id>.jpg`` and ``<root>/gt/<id>.npz``.

    Parameters
    ----------
    root : path
        The split folder, e.g. ``../shared/data/bsds500/val``.
    on_missing : {"warn", "error"}
        Images without ``gt/<id>.npz``: skipped with one warning listing them, or an
        error.

    Raises
    ------
    DatasetError
        Missing ``images/`` or ``gt/`` folder, no images, or (``on_missing="error"``)
        an image without annotation.
    """

    kind = "bsds500"
    metric = "bsds"

    def __init__(self, root: str | os.PathLike[str], *, on_missing: OnMissing = "warn") -> None:
        root = Path(root)
        _require_dir(root, "BSDS500 split folder")
        if not (root / "images").is_dir() or not (root / "gt").is_dir():
            splits = (
                [p.name for p in sorted(root.iterdir()) if (p / "images").is_dir()]
                if root.is_dir()
                else []
            )
            hint = f"; did you mean one of its splits: {', '.join(splits)}?" if splits else ""
            raise DatasetError(
                f"{root}: expected sub-folders images/ and gt/ (BSDS500 layout){hint}"
            )
        images = _list_files(root / "images", IMAGE_EXTENSIONS)
        gts = _list_files(root / "gt", (".npz",))
        items, skipped = _pair(root, images, gts, self.kind, on_missing)
        super().__init__(root, items, skipped)


class FolderDataset(_Dataset):
    """A plain folder: ``<root>/images/<stem>.<ext>`` with ``<root>/masks/<stem>.png``.

    Masks are index maps read raw (palette indices, e.g. VOC: 0 background, 1..20,
    255 void); scored with the VOC segment-best-IoU protocol.

    Parameters
    ----------
    root : path
    images, masks : str
        Sub-folder names (default ``images`` and ``masks``).
    on_missing : {"warn", "error"}
        Images without a mask: skipped with one warning listing them, or an error.
    """

    kind = "folder"
    metric = "voc"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        images: str = "images",
        masks: str = "masks",
        on_missing: OnMissing = "warn",
    ) -> None:
        root = Path(root)
        _require_dir(root, "dataset folder")
        _require_dir(root / images, "image folder")
        _require_dir(root / masks, "mask folder")
        imgs = _list_files(root / images, IMAGE_EXTENSIONS)
        msks = _list_files(root / masks, MASK_EXTENSIONS)
        items, skipped = _pair(root, imgs, msks, self.kind, on_missing)
        super().__init__(root, items, skipped)


def open_dataset(
    kind: str, root: str | os.PathLike[str], *, on_missing: OnMissing = "warn"
) -> BSDS500Dataset | FolderDataset:
    """Open a dataset by kind: ``"bsds500"``, ``"folder"`` or ``"auto"`` (by layout).

    Raises
    ------
    ValueError
        Unknown kind. :class:`DatasetError` for a bad folder.
    """
    if kind == "auto":
        r = Path(root)
        kind = "bsds500" if (r / "gt").is_dir() else "folder"
    if kind == "bsds500":
        return BSDS500Dataset(root, on_missing=on_missing)
    if kind == "folder":
        return FolderDataset(root, on_missing=on_missing)
    raise ValueError(f"unknown dataset kind {kind!r}; use 'bsds500', 'folder' or 'auto'")
