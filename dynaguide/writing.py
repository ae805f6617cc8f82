"""Writing results atomically, and reading label maps back.

Every file dynaguide writes goes through :func:`write_atomic`: the bytes go to a
temporary file in the target folder (named ``.dynaguide-<pid>-<token>.<name>.tmp``,
at most 255 bytes whatever the target's name), which is locked while it is written,
``fsync``-ed and renamed over the target with :func:`os.replace`. Readers see the old file
or the complete new one, never a half-written file. A process killed mid-write leaves its
temporary file behind; :func:`remove_stale_temporaries` deletes those (only dynaguide's own
names, only when no live writer holds them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dynaguide.errors import ImageReadError

try:  # POSIX: the writer holds an advisory lock on its temporary file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "encode_label_png",
    "encode_rgb_png",
    "is_temporary_name",
    "json_bytes",
    "read_label_png",
    "remove_stale_temporaries",
    "save_json",
    "save_label_png",
    "save_rgb_png",
    "to_jsonable",
    "write_atomic",
]

_TEMP_PREFIX = ".dynaguide-"
_TEMP_RE = re.compile(r"^\.dynaguide-(\d+)-[0-9a-f]{8}\..*\.tmp$", re.DOTALL)
_TEMP_NAME_BYTES = 96  # room for the prefix and suffix well under NAME_MAX (255)
#: A temporary file whose writer is alive is left alone for this long even when unlocked
#: (it may be between its creation and its lock).
_FRESH_SECONDS = 30.0


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


def _temp_name(target_name: str) -> str:
    short = target_name.encode("utf-8", "surrogateescape")[:_TEMP_NAME_BYTES]
    hint = short.decode("utf-8", "ignore") or "file"
    return f"{_TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.{hint}.tmp"


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` has the form of :func:`write_atomic`'s temporary files."""
    return _TEMP_RE.match(name) is not None


def write_atomic(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, which is flushed, ``fsync``-ed
    and renamed over ``path`` with :func:`os.replace`: readers see either the old file
    or the complete new one. Missing parent folders are created. The file gets the
    usual permissions (``0o666`` minus the umask). A target name of any length works
    (the temporary name is bounded).

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
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = parent / _temp_name(target.name)
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.replace(tmp, target)  # before the lock is released: cleaners never see it free
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed :func:`write_atomic` calls left in ``folder``.

    Only names of the form ``.dynaguide-<pid>-<token>.<name>.tmp`` are considered, and one
    is removed only when no process holds its lock and its writer process is gone (or the
    file is older than a few seconds). Other files are never touched.

    Returns
    -------
    list of Path
        The files removed.
    """
    root = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        path = root / entry.name
        if _remove_if_stale(path, int(match.group(1))):
            removed.append(path)
    return removed


def _remove_if_stale(path: Path, pid: int) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live writer holds it
        age = time.time() - os.fstat(fd).st_mtime
        writer_alive = pid == os.getpid() or _pid_alive(pid)
        if writer_alive and (fcntl is None or age < _FRESH_SECONDS):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        os.close(fd)


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


def encode_label_png(labels: np.ndarray, *, where: str = "labels") -> bytes:
    """A label map as 16-bit grayscale PNG bytes (see :func:`save_label_png`)."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"{where}: labels must be a 2-D (H, W) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{where}: labels must have an integer dtype, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{where}: labels array of shape {arr.shape} is empty")
    if arr.dtype != np.uint16 or not arr.dtype.isnative:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"{where}: label values must fit in a 16-bit PNG ([0, 65535]), found range "
                f"[{lo}, {hi}]"
            )
        arr = arr.astype(np.uint16)
    return _png_bytes(Image.fromarray(np.ascontiguousarray(arr)))


def encode_rgb_png(rgb: np.ndarray, *, where: str = "image") -> bytes:
    """An (H, W, 3) ``uint8`` RGB image as PNG bytes."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"{where}: expected an (H, W, 3) uint8 RGB array, got shape {arr.shape} and dtype "
            f"{arr.dtype}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{where}: RGB array of shape {arr.shape} is empty")
    return _png_bytes(Image.fromarray(np.ascontiguousarray(arr), mode="RGB"))


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
    return write_atomic(path, encode_label_png(labels, where=str(path)))


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
    return write_atomic(path, encode_rgb_png(rgb, where=str(path)))


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


def json_bytes(obj: Any, *, where: str = "object") -> bytes:
    """``obj`` as indented UTF-8 JSON bytes (conversions of :func:`to_jsonable`)."""
    text = json.dumps(to_jsonable(obj, where=where), indent=2, allow_nan=False, ensure_ascii=False)
    return (text + "\n").encode("utf-8")


def save_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON, atomically (see :func:`to_jsonable` for the
    conversions applied). Returns ``path``."""
    return write_atomic(path, json_bytes(obj, where=str(path)))
