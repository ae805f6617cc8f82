"""Where the images of a distributed run come from, and the id of each one.

A source is a local folder, one file, a list of paths or URIs, or a glob (``*``, ``?``,
``[...]`` within a path segment, ``**`` across segments) on a local path, a URI
(``s3://``, ``gs://``, ``hdfs://``, ...) or an explicit :class:`pyarrow.fs.FileSystem`.
Every image gets an id: its path relative to the source's root folder, without the image
extension (``sub/img001``), like the output names of ``dynaguide segment``; when two files
of one folder differ only by extension (``x.jpg``, ``x.png``) both keep it. Ids name the
outputs, so a re-run over the same source finds the same names.

Nothing here imports Ray; :mod:`pyarrow` is imported only for URIs and globs.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynaguide.io import IMAGE_EXTENSIONS, list_images

__all__ = ["SourceItem", "check_id", "has_glob", "is_uri", "list_source", "resolve_uri"]

_GLOB_CHARS = frozenset("*?[")
MAX_ID_LENGTH = 1024


@dataclass(frozen=True)
class SourceItem:
    """One input image: its ``id``, where a worker reads it (``path``: a local absolute
    path, or a path on the run's filesystem), and ``name``, the input as the user spelled
    it (it becomes the ``name`` of the result, as in ``dynaguide segment``)."""

    id: str
    path: str
    name: str


def is_uri(text: str) -> bool:
    """True for ``scheme://...`` strings (``C:\\...`` Windows paths are not URIs)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").isalnum()


def has_glob(text: str) -> bool:
    """True if ``text`` holds a glob character (``*``, ``?`` or ``[``)."""
    return any(c in _GLOB_CHARS for c in text)


def check_id(image_id: Any) -> str:
    """Validate an image id: a relative POSIX path of file names, no ``.``/``..`` parts.

    Raises
    ------
    ValueError
        With the reason, for an id that cannot name an output file safely.
    """
    if not isinstance(image_id, str) or not image_id:
        raise ValueError(f"image id must be a non-empty str, got {image_id!r}")
    if len(image_id) > MAX_ID_LENGTH:
        raise ValueError(
            f"image id is longer than {MAX_ID_LENGTH} characters: {image_id[:60]!r}..."
        )
    if "\\" in image_id or "\0" in image_id or image_id.startswith("/"):
        raise ValueError(f"image id {image_id!r} must be a relative POSIX path (no '\\', NUL)")
    if any(part in ("", ".", "..") for part in image_id.split("/")):
        raise ValueError(f"image id {image_id!r} has an empty, '.' or '..' path segment")
    return image_id


def resolve_uri(text: str, filesystem: Any = None) -> tuple[Any, str]:
    """(filesystem, path on it) for a URI, or for a path on an explicit ``filesystem``.

    A ``file://`` URI resolves to the local filesystem, returned as ``None``.
    """
    if filesystem is not None:
        if is_uri(text):
            raise ValueError(f"{text!r}: pass a path on the given filesystem, not a URI")
        return filesystem, text
    from pyarrow import fs as pafs

    try:
        found, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{text!r}: not a URI pyarrow can open: {exc}") from None
    if isinstance(found, pafs.LocalFileSystem):
        return None, path
    return found, path


def _ids(relative: list[str]) -> list[str]:
    """Ids of relative POSIX paths: extension dropped unless two files would collide."""
    stems = []
    for rel in relative:
        root, ext = posixpath.splitext(rel)
        stems.append(root if ext.lower() in IMAGE_EXTENSIONS and root else rel)
    counts = Counter(stems)
    return [rel if counts[stem] > 1 else stem for rel, stem in zip(relative, stems, strict=True)]


def _is_image_name(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and posixpath.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _match(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return (
        bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(pattern[1:], parts[1:])
    )


def _glob(fs: Any, pattern: str) -> tuple[str, list[str]]:
    """(root folder, sorted matching file paths) of a glob on a pyarrow filesystem."""
    from pyarrow import fs as pafs

    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if has_glob(p))
    root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "")
    rest = [p for p in parts[first:] if p]
    recursive = len(rest) > 1 or "**" in rest
    try:
        infos = fs.get_file_info(pafs.FileSelector(root or ".", recursive=recursive))
    except FileNotFoundError:
        raise FileNotFoundError(f"glob {pattern!r}: folder {root!r} does not exist") from None
    found = []
    for info in infos:
        if info.type != pafs.FileType.File or not _is_image_name(info.path):
            continue
        rel = posixpath.relpath(info.path, root) if root else info.path
        if _match(rest, rel.split("/")):
            found.append(info.path)
    return root, sorted(found)


def _list_fs(fs: Any, path: str, recursive: bool) -> tuple[str, list[str]]:
    from pyarrow import fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such file or folder")
    if info.type == pafs.FileType.File:
        return posixpath.dirname(path), [path]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and _is_image_name(i.path))
    return path, files


def _items(root: str, paths: list[str], names: list[str]) -> list[SourceItem]:
    relative = [posixpath.relpath(p, root) if root else p for p in paths]
    return [
        SourceItem(i, p, n)
        for i, p, n in zip(_ids([r.lstrip("/") for r in relative]), paths, names, strict=True)
    ]


def _list_local(text: str, recursive: bool) -> list[SourceItem]:
    path = Path(text)
    if path.is_file():
        return [SourceItem(_ids([path.name])[0], os.path.abspath(path), text)]
    if not path.exists():
        raise FileNotFoundError(f"{text}: no such file or folder")
    files = list_images(path, recursive=recursive)
    rel = [p.relative_to(path).as_posix() for p in files]
    return [
        SourceItem(i, os.path.abspath(f), str(f)) for i, f in zip(_ids(rel), files, strict=True)
    ]


def list_source(
    source: str | os.PathLike[str] | list[Any] | tuple[Any, ...],
    *,
    filesystem: Any = None,
    recursive: bool = False,
) -> tuple[Any, list[SourceItem]]:
    """The images of ``source``: (filesystem or None for local paths, items sorted by path).

    Parameters
    ----------
    source : path, URI, glob, or a list/tuple of paths or URIs
        A folder lists its image files (:data:`dynaguide.io.IMAGE_EXTENSIONS`, hidden
        files skipped); ``recursive`` also lists its sub-folders. A glob keeps the image
        files it matches. List items are taken as they are (no glob expansion) and must
        all live on one filesystem.
    filesystem : pyarrow.fs.FileSystem, optional
        Read paths (and globs) on this filesystem instead of the local one / the URI's.
    recursive : bool

    Raises
    ------
    FileNotFoundError, ValueError, TypeError
        A missing path, an empty source, a mix of filesystems, a bad type.
    """
    if isinstance(source, (list, tuple)):
        return _list_many(list(source), filesystem)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a folder, file, glob, URI, list of paths or ray.data.Dataset, "
            f"got {type(source).__name__}"
        )
    text = os.fspath(source)
    if filesystem is None and not is_uri(text) and not has_glob(text):
        return None, _list_local(text, recursive)
    if filesystem is None and not is_uri(text):  # a local glob: through pyarrow as well
        from pyarrow import fs as pafs

        fs, path = pafs.LocalFileSystem(), os.path.abspath(text)
    else:
        fs, path = resolve_uri(text, filesystem)
        if fs is None:
            from pyarrow import fs as pafs

            fs = pafs.LocalFileSystem()
    root, paths = _glob(fs, path) if has_glob(path) else _list_fs(fs, path, recursive)
    if not paths:
        raise ValueError(f"{text}: no image files found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    local = filesystem is None and type(fs).__name__ == "LocalFileSystem"
    return (None if local else fs), _items(root, paths, paths)


def _list_many(sources: list[Any], filesystem: Any) -> tuple[Any, list[SourceItem]]:
    if not sources:
        raise ValueError("source list is empty")
    fs_found: Any = None
    paths: list[str] = []
    for item in sources:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"source list items must be paths or URIs, got {type(item).__name__}")
        text = os.fspath(item)
        if filesystem is None and not is_uri(text):
            fs, path = None, os.path.abspath(text)
        else:
            fs, path = resolve_uri(text, filesystem)
        if paths and (
            (fs is None) != (fs_found is None)
            or (fs is not None and fs_found is not None and not fs.equals(fs_found))
        ):
            raise ValueError(
                f"source list mixes filesystems ({text!r} differs from the first item); "
                "run each filesystem separately or pass filesystem="
            )
        fs_found = fs
        paths.append(path)
    if len(set(paths)) != len(paths):
        dup = next(p for p, c in Counter(paths).items() if c > 1)
        raise ValueError(f"source list names {dup!r} more than once")
    order = sorted(range(len(paths)), key=paths.__getitem__)
    paths = [paths[i] for i in order]
    names = [os.fspath(sources[i]) for i in order]
    parents = [posixpath.dirname(p) for p in paths]
    root = posixpath.commonpath(parents) if all(parents) else ""
    return fs_found, _items(root, paths, names)
