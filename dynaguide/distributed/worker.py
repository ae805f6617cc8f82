"""The per-worker callable of a distributed run (the class given to ``map_batches``).

A :class:`SegmentWorker` is built once per worker process: it pins the torch threads,
picks the device (the GPU Ray assigned it, or the CPU) and resolves the guide once (an
ONNX Runtime session or any other guide object is loaded here, not per image). Each call
gets a batch of rows (``id`` plus one of ``path``, ``bytes``, ``image``), segments them
with :func:`dynaguide.segment_batch` (the same per-image pipeline as ``dynaguide segment``,
batched on a GPU) and writes the results itself, so only a small status record per image
travels back to the driver.

Crashes: Ray restarts a dead worker and re-runs its batch. The worker counts attempts in
``OUT/.dynaguide/attempts/``: one small file per batch in progress (written before, removed
after). A batch that was already tried is re-run one image at a time with a per-image
count, so an image on which the process keeps dying (a "poison" input) is reported in the
errors file after ``max_retries`` isolated deaths instead of failing the run forever.

This module imports no Ray: the class is a plain callable (and is tested as one).
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import tempfile
import time
import warnings
from typing import Any

import numpy as np

from dynaguide.config import DEFAULT_PRESET
from dynaguide.distributed.sources import check_id
from dynaguide.distributed.store import MANIFEST_DIR, SEGMENTS_DIR, OutputStore, id_key

__all__ = ["KILL_ENV", "RECORD_FIELDS", "SegmentWorker"]

#: Test hook: ``"<id>=<marker path>;<id2>"``. The worker process exits abruptly
#: (``os._exit``) when it reaches ``<id>`` the first time (it creates the marker file then;
#: once the file exists the image is processed normally), and every time it reaches
#: ``<id2>`` (an entry without a marker).
KILL_ENV = "DYNAGUIDE_TEST_KILL_WORKER"

#: Fields of the status record returned for every input row.
RECORD_FIELDS = ("id", "status", "reason", "n_labels", "n_iter", "load_s", "refine_s", "worker")
_EMPTY_RECORD: dict[str, Any] = {
    "status": "", "reason": "", "n_labels": -1, "n_iter": -1, "load_s": 0.0, "refine_s": 0.0
}  # fmt: skip


def _maybe_die(image_id: str) -> None:
    for spec in filter(None, os.environ.get(KILL_ENV, "").split(";")):
        target, _, marker = spec.partition("=")
        if image_id != target:
            continue
        if marker:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
        os._exit(17)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class SegmentWorker:
    """Segment batches of rows and write their outputs into an :class:`OutputStore`.

    Parameters
    ----------
    store : OutputStore
        Where results, the manifest and error records go.
    output_format : {"files", "parquet"}
    source_filesystem : pyarrow.fs.FileSystem or None
        Filesystem of the rows' ``path`` values (None: local paths).
    segment_kwargs : dict
        Keywords for :func:`dynaguide.segment_batch` (``preset``, ``guidance``,
        ``guidance_options``, ``seed``, ``max_iter``, ``scale``, config overrides, ...).
    use_gpu : bool
        Refine on ``cuda`` (the device Ray assigned) instead of the CPU.
    threads : int
        torch intra-op threads of this worker.
    refine_batch_size : int, "auto" or None
        ``batch_size`` of :func:`dynaguide.segment_batch`.
    done_keys : frozenset of str, optional
        :func:`id_key` of ids finished by an earlier run: such rows are skipped.
    error_keys : frozenset of str, optional
        :func:`id_key` of ids with an error record (removed when they succeed); None:
        unknown, every success tries to remove one.
    max_retries : int
        Isolated worker deaths an image may cause before it is reported as an error.
    """

    def __init__(
        self,
        store: OutputStore,
        output_format: str,
        source_filesystem: Any,
        segment_kwargs: dict[str, Any],
        *,
        use_gpu: bool = False,
        threads: int = 1,
        refine_batch_size: int | str | None = None,
        done_keys: frozenset[str] | None = None,
        error_keys: frozenset[str] | None = None,
        max_retries: int = 3,
    ):
        import torch

        from dynaguide.api import DEFAULT, build_config
        from dynaguide.segment_many import _SEGMENT_ARGS
        from dynaguide.settings import as_seed, resolve_guidance

        torch.set_num_threads(max(1, int(threads)))
        self.store = store
        self.output_format = output_format
        self.source_fs = source_filesystem
        self.device = "cuda" if use_gpu else "cpu"
        self.refine_batch_size = refine_batch_size
        self.done_keys = done_keys or frozenset()
        self.error_keys = error_keys
        self.max_retries = max_retries
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        kwargs = dict(segment_kwargs)
        guidance = kwargs.pop("guidance", DEFAULT)
        options = kwargs.pop("guidance_options", None) or {}
        overrides = {k: v for k, v in kwargs.items() if k not in _SEGMENT_ARGS}
        config = build_config(
            kwargs.get("preset", DEFAULT_PRESET), max_iter=kwargs.get("max_iter"), **overrides
        )
        # built once per worker, with the preset's options for its default guide and the
        # run's seed for a guide that takes one (as dynaguide.segment builds it)
        kwargs["seed"] = as_seed(kwargs.get("seed", 0))
        self.guidance = resolve_guidance(guidance, options or None, config, kwargs["seed"])
        self.kwargs = kwargs

    # ------------------------------------------------------------------ one batch

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        """Segment one batch of rows; returns one status record per row (column lists)."""
        columns = {k: list(v) for k, v in batch.items()}
        rows = [{k: v[i] for k, v in columns.items()} for i in range(len(columns["id"]))]
        for row in rows:
            row["id"] = str(row["id"])
        ids = [row["id"] for row in rows]
        digest = hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()[:24]
        attempt = f"{MANIFEST_DIR}/attempts/{digest}"
        retried = self._count(attempt) > 0
        self._bump(attempt)

        out: list[dict[str, Any]] = []
        parts: list[dict[str, Any]] = []
        pending = []
        for position, row in enumerate(rows):
            rec = _EMPTY_RECORD | {"id": row["id"], "worker": self.worker, "_pos": position}
            try:
                check_id(row["id"])
            except ValueError as exc:
                out.append(rec | {"status": "error", "reason": _reason(exc)})
                continue
            if id_key(row["id"]) in self.done_keys:  # by an earlier run
                out.append(rec | {"status": "skipped"})
                continue
            if retried and self.output_format == "files" and self.store.is_done(row["id"]):
                out.append(rec | {"status": "done"})  # by the attempt that died, this run
                continue
            pending.append((row, rec))
        if retried:  # an earlier attempt died: isolate each image and count its deaths
            for row, rec in pending:
                mark = f"{attempt}.{id_key(row['id'])}"
                deaths = self._count(mark)
                if deaths > self.max_retries:
                    reason = f"the worker process died {deaths} time(s) while segmenting it"
                    self._fail(rec, row, reason, out)
                    self.store.delete(mark)
                    continue
                self._bump(mark)
                self._segment([(row, rec)], out, parts)
                self.store.delete(mark)
        else:
            self._segment(pending, out, parts)
        if self.output_format == "parquet" and parts:
            self._write_part(parts, digest)
            for p in parts:
                if self._had_error(p["id"]):
                    self.store.delete(self.store.error_record(p["id"]))
        self.store.delete(attempt)
        out.sort(key=lambda r: r["_pos"])  # input order
        return {k: [r[k] for r in out] for k in RECORD_FIELDS}

    def _had_error(self, image_id: str) -> bool:
        return self.error_keys is None or id_key(image_id) in self.error_keys

    def _count(self, relative: str) -> int:
        try:
            return int(self.store.read_bytes(relative).decode("ascii").strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _bump(self, relative: str) -> None:
        self.store.write_bytes(relative, f"{self._count(relative) + 1}\n".encode("ascii"))

    def _segment(
        self,
        pending: list[tuple[dict[str, Any], dict[str, Any]]],
        out: list[dict[str, Any]],
        parts: list[dict[str, Any]],
    ) -> None:
        """Load, segment (one :func:`dynaguide.segment_batch` call) and write ``pending``."""
        from dynaguide.segment_many import segment_batch

        loaded = []
        for row, rec in pending:
            _maybe_die(row["id"])
            t = time.perf_counter()
            try:
                rgb, name = self._load(row)
            except Exception as exc:  # unreadable or invalid: reported, the rest go on
                self._fail(rec, row, _reason(exc), out)
                continue
            loaded.append((row, rec, rgb, name, time.perf_counter() - t))

        reasons: dict[int, str] = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")

            def progress(i: int, seg: Any) -> None:
                if seg is None:  # segment_batch warns with the reason, then reports None
                    reasons[i] = str(caught[-1].message) if caught else "segmentation failed"

            segs = segment_batch(
                [item[2] for item in loaded],
                on_error="skip",
                progress=progress,
                device=self.device,
                batch_size=self.refine_batch_size,
                guidance=self.guidance,
                **self.kwargs,
            )
        for i, ((row, rec, _, name, load_s), seg) in enumerate(zip(loaded, segs, strict=True)):
            if seg is None:
                self._fail(rec, row, reasons.get(i, "segmentation failed"), out)
                continue
            seg.name = name
            rec |= {"status": "done", "n_labels": seg.n_labels, "n_iter": seg.n_iter}
            rec |= {"load_s": load_s, "refine_s": seg.seconds}
            try:
                if self.output_format == "files":
                    self._save_files(seg, row["id"])
                    info = {"source": name, "n_labels": seg.n_labels}
                    self.store.mark_done(row["id"], info, had_error=self._had_error(row["id"]))
                else:
                    from dynaguide.distributed.records import segment_record

                    parts.append(segment_record(seg, row["id"], load_s, self.worker))
            except OSError as exc:  # the output could not be written: an error, not a crash
                self._fail(rec, row, _reason(exc), out)
                continue
            out.append(rec)

    # ------------------------------------------------------------------ reading

    def _load(self, row: dict[str, Any]) -> tuple[np.ndarray, str]:
        from dynaguide.io import load_image

        image_id = row["id"]
        name = str(row.get("name") or row.get("path") or image_id)
        if row.get("image") is not None:
            return load_image(np.asarray(row["image"]), name=image_id), name
        if row.get("bytes") is not None:
            return load_image(bytes(row["bytes"]), name=name), name
        path = row.get("path")
        if not path:
            raise ValueError(f"{image_id}: the row has no 'path', 'bytes' or 'image'")
        if self.source_fs is None:
            return load_image(path, name=name), name
        with self.source_fs.open_input_stream(path) as fh:
            data = fh.read()
        return load_image(data, name=name), name

    # ------------------------------------------------------------------ writing

    def _save_files(self, seg: Any, image_id: str) -> None:
        folder, _, stem = image_id.rpartition("/")
        if self.store.is_local:
            seg.save(self.store.path(folder) if folder else self.store.root, stem)
            return
        with tempfile.TemporaryDirectory(prefix="dynaguide-") as tmp:
            paths = seg.save(tmp, stem)
            for local in paths.values():  # the JSON last, as save() writes them
                rel = f"{folder}/{os.path.basename(local)}" if folder else os.path.basename(local)
                with open(local, "rb") as fh:
                    self.store.write_bytes(rel, fh.read())

    def _write_part(self, records: list[dict[str, Any]], digest: str) -> None:
        import pyarrow.parquet as pq

        from dynaguide.distributed.records import segments_table

        buf = io.BytesIO()
        pq.write_table(segments_table(records), buf, compression="zstd")
        self.store.write_bytes(f"{SEGMENTS_DIR}/part-{digest}.parquet", buf.getvalue())

    def _fail(
        self, rec: dict[str, Any], row: dict[str, Any], reason: str, out: list[dict[str, Any]]
    ) -> None:
        source = row.get("name") or row.get("path")
        self.store.record_error(rec["id"], str(source) if source else None, reason)
        out.append(rec | {"status": "error", "reason": reason})
