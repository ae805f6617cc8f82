"""The driver of a distributed run: :func:`segment_dataset`.

The driver lists the inputs (or takes a ``ray.data.Dataset``), drops the ids the manifest
already holds, and hands the rest to a pool of :class:`SegmentWorker` actors through
``Dataset.map_batches``. Workers read their images, segment them and write the outputs;
the driver only streams back one small status record per image, counts them and rewrites
``OUT/errors.jsonl`` at the end.

Fault tolerance comes from Ray: an actor whose process dies is restarted and its
unfinished batch re-run (Ray Data's defaults: no limit; the worker itself turns an image
that keeps killing its process into an error, see :mod:`dynaguide.distributed.worker`). Outputs are
named by id and written atomically, so a re-run batch overwrites with identical files;
Parquet parts are named by a digest of their batch's ids, so a re-run batch replaces its
part instead of adding a second one. An interrupted driver loses nothing written: the
next run resumes from the manifest.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dynaguide.api import DEFAULT, DEFAULT_PRESET, build_config
from dynaguide.config import RefineConfig
from dynaguide.distributed.sources import SourceItem, is_uri, list_source, resolve_uri
from dynaguide.distributed.store import OutputStore, id_key
from dynaguide.distributed.worker import RECORD_FIELDS, SegmentWorker
from dynaguide.segment_many import _SEGMENT_ARGS

__all__ = ["DatasetRun", "segment_dataset"]

OUTPUT_FORMATS = ("files", "parquet")
#: Failures listed in :attr:`DatasetRun.errors` (all of them are in ``OUT/errors.jsonl``).
MAX_ERRORS_KEPT = 1000
#: segment() keywords that make no sense in a distributed run.
_REFUSED = ("device", "callback", "name", "cuda_graph")
ProgressHook = Callable[[dict[str, Any]], None]


@dataclass
class DatasetRun:
    """Summary of one :func:`segment_dataset` call.

    Attributes
    ----------
    output : str
        The output folder.
    segmented, skipped, failed : int
        Images segmented by this run, already done before it (resumed), failed.
    seconds : float
        Wall time of the run (Ray start-up and listing included).
    errors_file : str
        ``OUT/errors.jsonl``: every input that failed so far, with its reason.
    errors : list of dict
        This run's failures, ``{"id", "reason"}`` (the first :data:`MAX_ERRORS_KEPT`).
    """

    output: str
    segmented: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors_file: str = ""
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Inputs seen: segmented + skipped + failed."""
        return self.segmented + self.skipped + self.failed

    @property
    def images_per_second(self) -> float:
        """Images segmented by this run per second of its wall time."""
        return self.segmented / self.seconds if self.seconds > 0 else 0.0


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(
            "segment_dataset needs Ray Data: pip install 'dynaguide[ray]' "
            f"(ray[data] on PyPI) ({exc})"
        ) from exc
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Connect to (or start) a Ray cluster; True if this call started it."""
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False if address is None else None)
    return True


def _check_settings(
    preset: str | RefineConfig, guidance: Any, options: dict[str, Any]
) -> dict[str, Any]:
    """Validate the settings on the driver (before any worker starts); their JSON record."""
    refused = sorted(set(options) & set(_REFUSED))
    if refused:
        raise TypeError(
            f"segment_dataset does not take {refused}: the device comes from "
            "gpus_per_worker and names from the input ids"
        )
    overrides = {k: v for k, v in options.items() if k not in _SEGMENT_ARGS}
    config = build_config(preset, max_iter=options.get("max_iter"), **overrides)
    if isinstance(guidance, str) and guidance.lower() not in (DEFAULT, "none"):
        from dynaguide.guidance import available_guides

        if guidance.lower() not in available_guides():
            raise ValueError(
                f"unknown guidance {guidance!r}; choose 'default', 'none' or one of: "
                + ", ".join(available_guides())
            )
    named = guidance if guidance is None or isinstance(guidance, str) else type(guidance).__name__
    return {
        "config": config.to_dict(),
        "guidance": named,
        "seed": options.get("seed", 0),
        "scale": options.get("scale"),
        "amp": bool(options.get("amp", False)),
        "start_label": int(options.get("start_label", 0)),
    }


def _positive(name: str, value: Any, *, allow_none: bool = True, real: bool = False) -> None:
    if value is None and allow_none:
        return
    kinds = (int, float) if real else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise ValueError(f"{name} must be {'a number' if real else 'an int'} > 0, got {value!r}")


def _pool_size(ray: Any, num_workers: int | None, gpus: float, cpus: float) -> int:
    if num_workers is not None:
        return num_workers
    res = ray.cluster_resources()
    if gpus > 0:
        return max(1, int(res.get("GPU", 0) // gpus))
    return max(1, int(res.get("CPU", 1) // cpus))


def _open_store(output: Any, output_filesystem: Any) -> OutputStore:
    text = os.fspath(output)
    if output_filesystem is None and not is_uri(text):
        return OutputStore(text)
    fs, path = resolve_uri(text, output_filesystem)
    return OutputStore(path, fs)


def segment_dataset(
    source: Any,
    output: str | os.PathLike[str],
    *,
    preset: str | RefineConfig = DEFAULT_PRESET,
    guidance: Any = DEFAULT,
    guidance_options: dict[str, Any] | None = None,
    num_workers: int | None = None,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    batch_size: int = 16,
    refine_batch_size: int | str | None = None,
    ray_address: str | None = None,
    output_format: str = "files",
    filesystem: Any = None,
    output_filesystem: Any = None,
    recursive: bool = False,
    max_retries: int = 3,
    progress: ProgressHook | None = None,
    **segment_options: Any,
) -> DatasetRun:
    """Segment every image of ``source`` on a Ray cluster and write the results to ``output``.

    Parameters
    ----------
    source : folder, file, glob, URI, list of paths/URIs, or ray.data.Dataset
        See :func:`dynaguide.distributed.sources.list_source`. A ``ray.data.Dataset``
        needs a string column ``id`` (unique, a relative POSIX path such as ``a/b``) and
        one of ``bytes`` (encoded image files), ``image`` (arrays) or ``path``.
    output : path or URI
        Output folder (local, a shared mount, or an object store URI). Layout:
        :mod:`dynaguide.distributed.store`.
    preset, guidance, guidance_options, **segment_options
        As for :func:`dynaguide.segment` (``seed``, ``max_iter``, ``scale``, ``amp``,
        RefineConfig overrides). A named guide is built once per worker.
    num_workers : int, optional
        Worker actors (default: the cluster's GPUs / ``gpus_per_worker``, or its CPUs /
        ``cpus_per_worker``).
    gpus_per_worker : float
        0: CPU workers; 1 (or a fraction, to share a GPU): GPU workers.
    cpus_per_worker : float
        CPUs reserved per worker (also its torch threads, at least 1).
    batch_size : int
        Images per worker call (and per Parquet part file).
    refine_batch_size : int, "auto" or None
        ``batch_size`` of :func:`dynaguide.segment_batch` inside a worker (None: "auto"
        on GPU, 1 on CPU).
    ray_address : str, optional
        ``"auto"`` or ``"ray://host:10001"``: an existing cluster. None: reuse the Ray
        session of this process, else start a local one (stopped at the end).
    output_format : {"files", "parquet"}
        ``"files"``: per image the files of ``dynaguide segment`` (``<id>.labels.png``,
        ``<id>.overlay.png``, ``<id>.json``). ``"parquet"``: one Parquet dataset under
        ``OUT/segments/`` (:mod:`dynaguide.distributed.records`).
    filesystem, output_filesystem : pyarrow.fs.FileSystem, optional
        Read the source / write the output on these filesystems.
    recursive : bool
        Also list sub-folders of a source folder.
    max_retries : int
        Ray restarts a dead worker and re-runs its batch as often as needed; an image on
        which the worker process died more than ``max_retries`` times (each time re-run
        alone) is reported in the errors file and the run goes on.
    progress : callable(record), optional
        Called on the driver with each image's status record (``id``, ``status`` in
        done/skipped/error, ``reason``, ``n_labels``, timings, ``worker``).

    Returns
    -------
    DatasetRun

    Raises
    ------
    ImportError
        Ray Data is not installed.
    ValueError, TypeError
        Bad settings, or an output folder made with other settings.
    """
    start = time.perf_counter()
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    _positive("num_workers", num_workers)
    _positive("batch_size", batch_size, allow_none=False)
    _positive("cpus_per_worker", cpus_per_worker, allow_none=False, real=True)
    if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, (int, float)):
        raise ValueError(f"gpus_per_worker must be a number >= 0, got {gpus_per_worker!r}")
    if gpus_per_worker < 0:
        raise ValueError(f"gpus_per_worker must be a number >= 0, got {gpus_per_worker!r}")
    if not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
    if "seed" in segment_options:  # a Generator is drawn from once, here, for every worker
        from dynaguide.settings import as_seed

        segment_options["seed"] = as_seed(segment_options["seed"])
    options = {"preset": preset, **segment_options}
    settings = _check_settings(preset, guidance, segment_options)
    settings["output_format"] = output_format
    ray = _import_ray()
    store = _open_store(output, output_filesystem)
    run = DatasetRun(output=store.root)

    items: list[SourceItem] | None = None
    if not isinstance(source, ray.data.Dataset):
        source_fs, items = list_source(source, filesystem=filesystem, recursive=recursive)
    else:
        source_fs = filesystem
        missing = {"id"} - set(source.columns())
        if missing or not {"bytes", "image", "path"} & set(source.columns()):
            raise ValueError(
                "a ray.data.Dataset source needs an 'id' column and one of 'bytes', 'image', "
                f"'path'; it has {source.columns()}"
            )
    store.check_settings(settings)
    store.clear_attempts()  # counts of an earlier, interrupted run
    done = store.done_keys(output_format)
    if items is not None:
        todo = [it for it in items if id_key(it.id) not in done]
        run.skipped = len(items) - len(todo)
        if not todo:
            run.errors_file, _ = store.write_errors_file()
            run.seconds = time.perf_counter() - start
            return run

    started = _connect(ray, ray_address)
    try:
        pool = _pool_size(ray, num_workers, float(gpus_per_worker), float(cpus_per_worker))
        if items is not None:
            rows = [{"id": it.id, "path": it.path, "name": it.name} for it in todo]
            blocks = math.ceil(len(rows) / batch_size)
            ds = ray.data.from_items(rows, override_num_blocks=blocks)
            pool = min(pool, blocks)  # more workers than batches would idle
        else:
            ds = source
        worker_kwargs = {
            "store": store,
            "output_format": output_format,
            "source_filesystem": source_fs,
            "segment_kwargs": {
                **options,
                "guidance": guidance,
                "guidance_options": guidance_options,
            },
            "use_gpu": gpus_per_worker > 0,
            "threads": max(1, int(cpus_per_worker)),
            "refine_batch_size": refine_batch_size,
            "done_keys": frozenset(done) if items is None else None,
            "error_keys": frozenset(store.error_keys()),
            "max_retries": max_retries,
        }
        results = ds.map_batches(
            SegmentWorker,
            fn_constructor_kwargs=worker_kwargs,
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker or None,
        )
        _collect(results, run, progress)
    finally:
        if started:
            ray.shutdown()
    run.errors_file, _ = store.write_errors_file()
    run.seconds = time.perf_counter() - start
    return run


def _collect(results: Any, run: DatasetRun, progress: ProgressHook | None) -> None:
    """Stream the workers' status records into ``run`` (and ``progress``)."""
    for batch in results.iter_batches(batch_format="numpy", batch_size=None):
        n = len(batch["id"])
        for i in range(n):
            record = {k: _plain(batch[k][i]) for k in RECORD_FIELDS}
            status = record["status"]
            if status == "done":
                run.segmented += 1
            elif status == "skipped":
                run.skipped += 1
            else:
                run.failed += 1
                if len(run.errors) < MAX_ERRORS_KEPT:
                    run.errors.append({"id": record["id"], "reason": record["reason"]})
            if progress is not None:
                progress(record)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (records handed to ``progress`` are plain)."""
    return value.item() if hasattr(value, "item") else value
