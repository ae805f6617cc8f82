"""The data-safety rules of ``dynaguide segment IN OUT``: one output set per input.

An *output set* is the files written for one input image: those of the chosen formats
(:mod:`dynaguide.result_files`; by default ``<stem>.labels.png`` and
``<stem>.overlay.png``) and ``<stem>.json`` (written last). The
rules, each enforced here before any refinement starts or before a file is written:

* OUT must not be IN, nor lie inside a folder IN, and no planned output may be an input;
* stems are unique per output folder, case-insensitively (``a.png`` -> ``a``; inputs whose
  stems collide keep their extension, ``a.png`` / ``a.jpg``; names that would still collide,
  like ``a.png`` and ``A.PNG``, are an error before any work). They depend only on the
  input names, so they are the same in every run with the same inputs;
* a file dynaguide did not write is never overwritten (:mod:`dynaguide.manifest`), and the
  files it wrote are never read back as inputs;
* every output folder is created and probed for writing, and the temporary files of killed
  runs are removed, before the first image;
* the JSON of a set records the settings fingerprint, the dynaguide version, the input's
  size and modification time and the size and SHA-256 of the other files: ``--resume``
  accepts a set only when all of these match (:func:`verify_output_set`) and redoes it
  otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynaguide.errors import OutputSafetyError
from dynaguide.manifest import OutputLocks, read_manifest, record_written, written_by_dynaguide
from dynaguide.result_files import DEFAULT_FORMATS
from dynaguide.segmentation import Segmentation, check_stem
from dynaguide.writing import _temp_name, remove_stale_temporaries, to_jsonable, write_atomic

__all__ = [
    "PlannedImage",
    "foreign_outputs",
    "plan_outputs",
    "prepare_output_folders",
    "settings_fingerprint",
    "verify_output_set",
    "write_output_set",
]

_MAX_JSON_BYTES = 64 * 2**20
_STEM_BYTES = 200  # leaves room for ".segments.json" and a hash suffix under NAME_MAX


@dataclass(frozen=True)
class PlannedImage:
    """One input and where its output set goes."""

    source: Path
    folder: Path
    stem: str
    formats: tuple[str, ...] = DEFAULT_FORMATS

    @property
    def outputs(self) -> dict[str, Path]:
        """``{format: path, ..., "json": path}`` of the set."""
        return Segmentation.output_paths(self.folder, self.stem, self.formats)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _bounded(stem: str) -> str:
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) <= _STEM_BYTES:
        return stem
    tag = hashlib.sha1(raw).hexdigest()[:10]
    return raw[:_STEM_BYTES].decode("utf-8", "ignore") + "~" + tag


def _stems(paths: list[Path], extensions: tuple[str, ...]) -> dict[Path, str]:
    """Stem per path for one output folder, unique case-insensitively (see the module)."""
    short = {p: p.stem if p.suffix.lower() in extensions and p.stem else p.name for p in paths}
    chosen = dict(short)
    while True:
        groups: dict[str, list[Path]] = defaultdict(list)
        for p, stem in chosen.items():
            groups[stem.casefold()].append(p)
        clashing = [p for g in groups.values() if len(g) > 1 for p in g if chosen[p] != p.name]
        if not clashing:
            break
        for p in clashing:
            chosen[p] = p.name
    for group in groups.values():
        if len(group) > 1:
            names = ", ".join(repr(str(p)) for p in sorted(group))
            raise ValueError(
                f"inputs {names} would write the same output files (names that differ only in "
                "case); rename one of them or segment them into different OUT folders"
            )
    return {p: _bounded(stem) for p, stem in chosen.items()}


def plan_outputs(
    source: Path | list[Path],
    out: Path,
    *,
    recursive: bool,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
) -> list[PlannedImage]:
    """The output set of every input under ``source`` (a file, a folder, or a list of
    files that all write into ``out``), in ``out``.

    Raises
    ------
    ValueError
        OUT is IN or inside it, stems collide, or an output would be an input.
    FileNotFoundError, NotADirectoryError, OSError
        From listing ``source``.
    """
    from dynaguide.io import IMAGE_EXTENSIONS, list_images

    if isinstance(source, list):
        paths = list(source)
        by_folder: dict[Path, list[Path]] = {out: paths}
    elif source.is_dir():
        src_real, out_real = _real(source), _real(out)
        if out_real == src_real:
            raise ValueError(
                f"OUT {str(out)!r} is the input folder IN: outputs would be written among the "
                "inputs; choose another OUT"
            )
        if src_real in out_real.parents:
            raise ValueError(
                f"OUT {str(out)!r} lies inside the input folder IN {str(source)!r}; choose an "
                "OUT outside IN"
            )
        paths = list_images(source, recursive=recursive)
        by_folder = defaultdict(list)
        for p in paths:
            by_folder[out / p.relative_to(source).parent].append(p)
    else:
        paths = [source]
        by_folder = {out: [source]}
    plan = [
        PlannedImage(p, folder, stem, formats)
        for folder, group in by_folder.items()
        for p, stem in _stems(group, IMAGE_EXTENSIONS).items()
    ]
    plan.sort(key=lambda item: str(item.source))
    inputs = {_real(p) for p in paths}
    for item in plan:
        check_stem(item.stem)
        for path in item.outputs.values():
            if _real(path) in inputs:
                raise ValueError(
                    f"output {str(path)!r} of {str(item.source)!r} would overwrite an input; "
                    "choose another OUT"
                )
    return plan


def prepare_output_folders(plan: list[PlannedImage]) -> dict[Path, OutputLocks]:
    """Create every output folder, check it is writable, remove stale temporary files.

    Returns
    -------
    dict
        The :class:`~dynaguide.manifest.OutputLocks` of each folder.

    Raises
    ------
    OSError
        A folder cannot be created or written (the message names it).
    """
    locks: dict[Path, OutputLocks] = {}
    for folder in sorted({item.folder for item in plan}):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / _temp_name("write-probe")
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"probe")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
            remove_stale_temporaries(folder)
            locks[folder] = OutputLocks(folder)
        except OSError as exc:
            for lock in locks.values():
                lock.close()
            raise type(exc)(
                exc.errno, f"output folder {str(folder)!r} is not writable: {exc.strerror}"
            ) from None
    return locks


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``settings`` (what decides the results)."""
    text = json.dumps(to_jsonable(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _source_record(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def foreign_outputs(item: PlannedImage) -> list[Path]:
    """The existing files among ``item``'s outputs that dynaguide did not write."""
    existing = [p for p in item.outputs.values() if os.path.lexists(p)]
    if not existing:
        return []
    entries = read_manifest(item.folder)
    return [p for p in existing if p.is_symlink() or not written_by_dynaguide(p, entries)]


def write_output_set(
    seg: Segmentation,
    item: PlannedImage,
    *,
    fingerprint: str,
    settings: dict[str, Any],
    version: str,
) -> dict[str, Path]:
    """Write ``item``'s output set for ``seg``, the JSON last, each file atomically.

    Raises
    ------
    OutputSafetyError
        One of the targets exists and was not written by dynaguide.
    """
    foreign = foreign_outputs(item)
    if foreign:
        raise OutputSafetyError(
            f"{item.source}: refusing to overwrite {str(foreign[0])!r}, which dynaguide did not "
            "write; move it away or choose another OUT"
        )
    paths = item.outputs
    data = seg.output_bytes(formats=item.formats)
    files = {}
    for key in item.formats:
        record_written(paths[key], data[key])
        write_atomic(paths[key], data[key])
        files[key] = {
            "name": paths[key].name,
            "size": len(data[key]),
            "sha256": hashlib.sha256(data[key]).hexdigest(),
        }
    run = {
        "fingerprint": fingerprint,
        "settings": settings,
        "dynaguide_version": version,
        "source": _source_record(item.source),
        "files": files,
    }
    summary = json.loads(data["json"])
    summary["run"] = to_jsonable(run)
    blob = (json.dumps(summary, indent=2, allow_nan=False, ensure_ascii=False) + "\n").encode()
    record_written(paths["json"], blob)
    write_atomic(paths["json"], blob)
    return paths


def verify_output_set(item: PlannedImage, *, fingerprint: str, version: str) -> str | None:
    """Why ``item``'s existing output set cannot be kept by ``--resume``, or None if it can.

    A set is kept only when its JSON parses, was written by dynaguide, carries the same
    settings fingerprint and version, names this input with its current size and
    modification time, and both PNGs exist with the recorded size and SHA-256.
    """
    from dynaguide.manifest import file_digest

    paths = item.outputs
    jpath = paths["json"]
    try:
        if jpath.stat().st_size > _MAX_JSON_BYTES:
            return f"{jpath.name} is too large"
        summary = json.loads(jpath.read_bytes())
    except FileNotFoundError:
        return "not done"
    except (OSError, ValueError) as exc:
        return f"{jpath.name} is unreadable ({type(exc).__name__})"
    run = summary.get("run") if isinstance(summary, dict) else None
    if not isinstance(run, dict):
        return f"{jpath.name} has no run record"
    if run.get("fingerprint") != fingerprint:
        return "made with other settings"
    if run.get("dynaguide_version") != version:
        return f"made by dynaguide {run.get('dynaguide_version')}"
    try:
        if run.get("source") != _source_record(item.source):
            return "the input changed since"
    except OSError:
        return "the input cannot be read"
    files = run.get("files")
    if not isinstance(files, dict):
        return f"{jpath.name} lists no files"
    if set(files) != set(item.formats):
        return "made with other --format choices"
    for key in item.formats:
        rec = files.get(key)
        path = paths[key]
        if not isinstance(rec, dict) or rec.get("name") != path.name:
            return f"{jpath.name} does not list {path.name}"
        try:
            if file_digest(path) != (rec.get("size"), rec.get("sha256")):
                return f"{path.name} differs from the one recorded"
        except OSError:
            return f"{path.name} is missing or unreadable"
    if not written_by_dynaguide(jpath):
        return f"{jpath.name} was not written by dynaguide"
    return None
