"""The record of the files dynaguide wrote into a folder, and per-output locks.

``dynaguide segment`` never overwrites a file it did not write and never reads its own
outputs as inputs. Both rules need to know which files are dynaguide's: before a result
file is renamed into place, one line ``{"name", "size", "sha256"}`` is appended to
``<folder>/.dynaguide/manifest.jsonl`` (append-only, one ``write`` per line, so concurrent
runs do not interleave lines). A file counts as written by dynaguide when its current size
and SHA-256 match an entry for its name: a file the user replaced, or one that was there
before, does not.

:class:`OutputLocks` lets concurrent runs into one folder work on distinct images: a run
holds a lock (a POSIX record lock on one byte of ``<folder>/.dynaguide/locks``, chosen by
the output stem) while it computes and writes one image's outputs; the operating system
releases it when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks, single-run safety only
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MANIFEST_DIR",
    "OutputLocks",
    "file_digest",
    "read_manifest",
    "record_written",
    "written_by_dynaguide",
]

#: Hidden folder, inside each output folder, holding the manifest and the lock file.
MANIFEST_DIR = ".dynaguide"
_MANIFEST = "manifest.jsonl"
_LOCKS = "locks"
_MAX_MANIFEST_BYTES = 256 * 2**20

Entries = dict[str, set[tuple[int, str]]]


def _digest(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file's current content."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def record_written(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Append ``path``'s coming content to its folder's manifest (call before writing it)."""
    target = Path(path)
    folder = target.parent / MANIFEST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps(
        {"name": target.name, "size": len(data), "sha256": _digest(data)}, ensure_ascii=False
    )
    fd = os.open(folder / _MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode("utf-8", "surrogateescape"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(folder: str | os.PathLike[str]) -> Entries:
    """The entries of ``folder``'s manifest: name -> {(size, sha256), ...} (empty if none).

    Unreadable lines (a torn last line after a crash) are ignored.
    """
    path = Path(folder) / MANIFEST_DIR / _MANIFEST
    entries: Entries = {}
    try:
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise ValueError(f"{path}: manifest larger than {_MAX_MANIFEST_BYTES} bytes")
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        try:
            rec: Any = json.loads(line)
            key = (int(rec["size"]), str(rec["sha256"]))
            entries.setdefault(str(rec["name"]), set()).add(key)
        except (ValueError, KeyError, TypeError):
            continue
    return entries


def written_by_dynaguide(path: str | os.PathLike[str], entries: Entries | None = None) -> bool:
    """Whether the file at ``path`` holds content dynaguide wrote there (see the module).

    ``entries`` is its folder's :func:`read_manifest` when the caller has it already.
    """
    p = Path(path)
    known = read_manifest(p.parent) if entries is None else entries
    versions = known.get(p.name)
    if not versions:
        return False
    try:
        size = p.stat().st_size
        if all(size != s for s, _ in versions):
            return False
        return file_digest(p) in versions
    except OSError:
        return False


class OutputLocks:
    """Non-blocking per-stem locks shared by every dynaguide run writing into ``folder``.

    Parameters
    ----------
    folder : path
        The output folder (its ``.dynaguide/locks`` file is created).
    """

    def __init__(self, folder: str | os.PathLike[str]):
        lock_dir = Path(folder) / MANIFEST_DIR
        lock_dir.mkdir(parents=True, exist_ok=True)
        self.path = lock_dir / _LOCKS
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    @staticmethod
    def _offset(stem: str) -> int:
        digest = hashlib.sha256(stem.casefold().encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:7], "big")  # < 2**56: a valid off_t everywhere

    def acquire(self, stem: str) -> bool:
        """Lock ``stem``; False when another process holds it."""
        if fcntl is None or self._fd is None:
            return True
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._offset(stem))
        except (BlockingIOError, PermissionError):
            return False
        return True

    def release(self, stem: str) -> None:
        """Unlock ``stem`` (a no-op when it is not held)."""
        if fcntl is not None and self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._offset(stem))

    def close(self) -> None:
        """Release every lock held through this object."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
