"""Segment large image collections on a Ray cluster: :func:`segment_dataset`.

Needs the optional extra ``pip install "dynaguide[ray]"`` (Ray Data); ``import dynaguide``
and ``import dynaguide.distributed`` never import Ray — it is imported when
:func:`segment_dataset` runs.

- :mod:`~dynaguide.distributed.sources`: what to read and the id of each image;
- :mod:`~dynaguide.distributed.store`: the output folder, its manifest and error records;
- :mod:`~dynaguide.distributed.worker`: the per-worker callable given to ``map_batches``;
- :mod:`~dynaguide.distributed.records`: the Parquet records (COCO RLE per segment);
- :mod:`~dynaguide.distributed.runner`: the driver.
"""

from __future__ import annotations

from dynaguide.distributed.records import labels_from_record
from dynaguide.distributed.runner import DatasetRun, segment_dataset
from dynaguide.distributed.sources import list_source
from dynaguide.distributed.store import OutputStore

__all__ = ["DatasetRun", "OutputStore", "labels_from_record", "list_source", "segment_dataset"]
