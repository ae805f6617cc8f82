"""The output folder of a distributed run: results, the manifest of done ids, errors.

Layout of ``OUT``::

    OUT/<id>.labels.png, <id>.overlay.png, <id>.json     output_format="files"
    OUT/segments/part-<digest>.parquet                    output_format="parquet"
    OUT/errors.jsonl              one JSON line per input that failed (rewritten per run)
    OUT/.dynaguide/settings.json  the settings of the first run (a re-run must match)
    OUT/.dynaguide/done/<key>.json    files format: one marker per finished id
    OUT/.dynaguide/errors/<key>.json  one record per failed id (removed when it succeeds)
    OUT/.dynaguide/attempts/          batches in progress (see dynaguide.distributed.worker)

Every file is written whole or not at all: on the local filesystem through a temporary
file and :func:`os.replace` (:func:`dynaguide.io.write_atomic`); on an object store
(S3, GCS) one PUT, which is atomic there. One small file per id makes the manifest
append-safe: workers never rewrite a shared file, so a killed worker or driver can lose at
most the id it was writing. In the Parquet format each part file is the manifest of the ids
it holds, committed by its one atomic write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import time
from typing import Any
from urllib.parse import quote

from dynaguide.io import write_atomic

__all__ = ["OutputStore", "id_key"]

MANIFEST_DIR = ".dynaguide"
SEGMENTS_DIR = "segments"
ERRORS_FILE = "errors.jsonl"
_MAX_KEY = 200


def id_key(image_id: str) -> str:
    """A flat, reversible file name for an id (percent-encoded; long ids get a hash)."""
    key = quote(image_id, safe="")
    if len(key) <= _MAX_KEY:
        return key
    digest = hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:20]
    return f"{key[:150]}~{digest}"


class OutputStore:
    """``OUT`` on the local filesystem (``filesystem=None``) or on a pyarrow filesystem.

    Parameters
    ----------
    root : str
        The output folder (a local path, or a path on ``filesystem``).
    filesystem : pyarrow.fs.FileSystem, optional
    """

    def __init__(self, root: str, filesystem: Any = None):
        self.root = os.path.abspath(root) if filesystem is None else root.rstrip("/")
        self.filesystem = filesystem

    @property
    def is_local(self) -> bool:
        """Whether ``OUT`` is a local (or mounted shared) folder."""
        return self.filesystem is None

    def path(self, relative: str) -> str:
        """Absolute path (on the store's filesystem) of ``relative`` (POSIX) under OUT."""
        if self.is_local:
            return os.path.join(self.root, *relative.split("/"))
        return posixpath.join(self.root, relative)

    # ------------------------------------------------------------------ files

    def write_bytes(self, relative: str, data: bytes) -> str:
        """Write ``data`` to ``relative`` atomically; returns the full path."""
        target = self.path(relative)
        if self.is_local:
            write_atomic(target, data)
            return target
        self.filesystem.create_dir(posixpath.dirname(target), recursive=True)
        with self.filesystem.open_output_stream(target) as fh:
            fh.write(data)
        return target

    def read_bytes(self, relative: str) -> bytes:
        """Content of ``relative``."""
        if self.is_local:
            with open(self.path(relative), "rb") as fh:
                return fh.read()
        with self.filesystem.open_input_stream(self.path(relative)) as fh:
            return fh.read()

    def exists(self, relative: str) -> bool:
        """Whether the file ``relative`` exists."""
        if self.is_local:
            return os.path.isfile(self.path(relative))
        from pyarrow import fs as pafs

        return self.filesystem.get_file_info(self.path(relative)).type == pafs.FileType.File

    def delete(self, relative: str) -> None:
        """Remove the file ``relative`` if it exists."""
        target = self.path(relative)
        if self.is_local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            return
        with contextlib.suppress(FileNotFoundError):
            self.filesystem.delete_file(target)

    def list_files(self, relative: str) -> list[str]:
        """Names of the (non-hidden) files directly in folder ``relative``; [] if missing."""
        folder = self.path(relative)
        if self.is_local:
            try:
                with os.scandir(folder) as it:
                    names = [e.name for e in it if e.is_file()]
            except FileNotFoundError:
                return []
        else:
            from pyarrow import fs as pafs

            try:
                infos = self.filesystem.get_file_info(pafs.FileSelector(folder))
            except FileNotFoundError:
                return []
            names = [posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File]
        return sorted(n for n in names if not n.startswith("."))

    def write_json(self, relative: str, obj: Any) -> str:
        """Write ``obj`` as JSON atomically."""
        return self.write_bytes(relative, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))

    def read_json(self, relative: str) -> Any:
        """Parse the JSON file ``relative``."""
        return json.loads(self.read_bytes(relative).decode("utf-8"))

    # ------------------------------------------------------------------ manifest

    @staticmethod
    def done_marker(image_id: str) -> str:
        """Relative path of the done marker of ``image_id`` (files format)."""
        return f"{MANIFEST_DIR}/done/{id_key(image_id)}.json"

    @staticmethod
    def error_record(image_id: str) -> str:
        """Relative path of the error record of ``image_id``."""
        return f"{MANIFEST_DIR}/errors/{id_key(image_id)}.json"

    def mark_done(self, image_id: str, info: dict[str, Any], *, had_error: bool = True) -> None:
        """Record ``image_id`` as finished (after its outputs are written) and drop its
        error record (``had_error=False``: known to have none, saves a request)."""
        self.write_json(self.done_marker(image_id), {"id": image_id, "time": time.time(), **info})
        if had_error:
            self.delete(self.error_record(image_id))

    def is_done(self, image_id: str) -> bool:
        """Whether the done marker of ``image_id`` exists (files format)."""
        return self.exists(self.done_marker(image_id))

    def record_error(self, image_id: str, source: str | None, reason: str, **info: Any) -> None:
        """Record why ``image_id`` failed."""
        record = {"id": image_id, "source": source, "reason": reason, "time": time.time(), **info}
        self.write_json(self.error_record(image_id), record)

    def done_keys(self, output_format: str) -> set[str]:
        """:func:`id_key` of every finished id, read from the manifest of ``output_format``."""
        if output_format == "files":
            return {n[: -len(".json")] for n in self.list_files(f"{MANIFEST_DIR}/done")}
        import pyarrow.dataset as pds

        parts = [n for n in self.list_files(SEGMENTS_DIR) if n.endswith(".parquet")]
        if not parts:
            return set()
        files = [self.path(f"{SEGMENTS_DIR}/{n}") for n in parts]
        if self.is_local:
            table = pds.dataset(files, format="parquet").to_table(columns=["id"])
        else:
            table = pds.dataset(files, format="parquet", filesystem=self.filesystem).to_table(
                columns=["id"]
            )  # the parts are read by a thread pool
        return {id_key(i) for i in table.column("id").to_pylist()}

    def error_keys(self) -> set[str]:
        """:func:`id_key` of every id with an error record."""
        return {n[: -len(".json")] for n in self.list_files(f"{MANIFEST_DIR}/errors")}

    def clear_attempts(self) -> None:
        """Remove the workers' attempt counts (call before a run starts, when no worker of
        an earlier run is alive)."""
        folder = self.path(f"{MANIFEST_DIR}/attempts")
        if self.is_local:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            self.filesystem.delete_dir_contents(folder, missing_dir_ok=True)

    def errors(self) -> list[dict[str, Any]]:
        """The current error records, sorted by id."""
        records = []
        for name in self.list_files(f"{MANIFEST_DIR}/errors"):
            try:
                records.append(self.read_json(f"{MANIFEST_DIR}/errors/{name}"))
            except (OSError, ValueError):  # removed or being replaced meanwhile
                continue
        return sorted(records, key=lambda r: str(r.get("id")))

    def write_errors_file(self) -> tuple[str, int]:
        """Rewrite ``OUT/errors.jsonl`` from the error records; (its path, line count)."""
        records = self.errors()
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        return self.write_bytes(ERRORS_FILE, text.encode("utf-8")), len(records)

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Store ``settings`` on the first run; on a re-run insist they are the same.

        Raises
        ------
        ValueError
            When OUT holds results made with other settings (a resumed run would mix them).
        """
        relative = f"{MANIFEST_DIR}/settings.json"
        current = json.loads(json.dumps(settings, sort_keys=True, default=repr))
        if self.exists(relative):
            stored = self.read_json(relative)
            if stored != current:
                diff = sorted(
                    k for k in set(stored) | set(current) if stored.get(k) != current.get(k)
                )
                raise ValueError(
                    f"{self.root} holds results made with other settings (different: "
                    f"{', '.join(diff)}); use a new output folder or the same settings"
                )
            return
        self.write_json(relative, current)
