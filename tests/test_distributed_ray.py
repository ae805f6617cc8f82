"""segment_dataset on a local Ray cluster: outputs, a corrupt input, a killed worker, an
interrupted driver, the CLI. One cluster (2 CPUs) for the module; 32x32 images, 2-3
iterations. Skipped without Ray, except on CI (CI=true), where the test extra installs it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_helpers import FAST, require, write_folder, write_image

import dynaguide
from dynaguide import cli
from dynaguide.distributed import labels_from_record, segment_dataset
from dynaguide.distributed.worker import KILL_ENV
from dynaguide.io import read_label_png

ray = require("ray")
require("ray.data")
pq = require("pyarrow.parquet")

# one cluster per module: keep these tests on one xdist worker (see conftest.py)
pytestmark = pytest.mark.xdist_group("ray")

KILL_ID = "kill-me"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A local 2-CPU cluster whose workers die once on image ``kill-me``."""
    marker = tmp_path_factory.mktemp("kill") / "killed"
    env = {KILL_ENV: f"{KILL_ID}={marker}", "OMP_NUM_THREADS": "1"}
    # Ray puts the driver's current directory on its workers' sys.path: start it from a
    # folder that is not the checkout, whose bare source package they would import first.
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("driver-cwd"))
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            runtime_env={"env_vars": env},
            log_to_driver=False,
            configure_logging=False,
        )
    finally:
        os.chdir(cwd)
    yield marker
    ray.shutdown()


def _reference(path: Path, **kwargs) -> np.ndarray:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker
    try:
        return dynaguide.segment(dynaguide.io.load_image(path), **kwargs).labels
    finally:
        torch.set_num_threads(before)


def test_files_output_and_a_corrupt_image(cluster, tmp_path: Path):
    src = tmp_path / "in"
    paths = write_folder(src, 3, corrupt="broken.jpg")
    write_image(src / "sub" / "deep.png", seed=9)
    out = tmp_path / "out"
    run = segment_dataset(src, out, num_workers=2, batch_size=2, recursive=True, **FAST)
    assert (run.segmented, run.skipped, run.failed) == (4, 0, 1)
    (line,) = (out / "errors.jsonl").read_text().splitlines()
    error = json.loads(line)
    assert error["id"] == "broken" and error["source"] == str(src / "broken.jpg")
    assert error["reason"].startswith("ImageReadError: ")
    for image_id, path in [("img0", paths[0]), ("img2", paths[2]), ("sub/deep", None)]:
        for suffix in ("labels.png", "overlay.png", "json"):
            assert (out / f"{image_id}.{suffix}").is_file()
        if path is not None:
            assert np.array_equal(
                read_label_png(out / f"{image_id}.labels.png"), _reference(path, **FAST)
            )
    done = sorted(p.name for p in (out / ".dynaguide" / "done").iterdir())
    assert done == ["img0.json", "img1.json", "img2.json", "sub%2Fdeep.json"]
    assert not list(out.rglob("*.tmp"))


def test_killed_worker_is_retried_and_every_image_is_written_once(cluster, tmp_path: Path):
    ids = ["a0", "a1", KILL_ID, "a3", "a4", "a5"]
    images = [write_image(tmp_path / "in" / f"{i}.png", seed=n) for n, i in enumerate(ids)]
    ds = ray.data.from_items(
        [{"id": i, "bytes": p.read_bytes()} for i, p in zip(ids, images, strict=True)],
        override_num_blocks=3,
    )
    out = tmp_path / "out"
    run = segment_dataset(ds, out, num_workers=2, batch_size=2, output_format="parquet", **FAST)
    assert cluster.is_file(), "the worker was not killed"
    killed_pid = int(cluster.read_text())
    assert (run.segmented, run.failed) == (6, 0)
    rows = pq.read_table(out / "segments").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(ids)  # each image exactly once
    assert len(list((out / "segments").glob("part-*.parquet"))) == 3
    retried = next(r for r in rows if r["id"] == KILL_ID)
    assert not retried["worker"].endswith(f":{killed_pid}")  # done by the restarted process
    for row, path in zip(sorted(rows, key=lambda r: ids.index(r["id"])), images, strict=True):
        assert np.array_equal(labels_from_record(row), _reference(path, **FAST))


def test_interrupted_driver_resumes_without_redoing(cluster, tmp_path: Path, capsys):
    src = tmp_path / "in"
    write_folder(src, 8)
    out = tmp_path / "out"
    settings = {"guidance": None, "max_iter": 3, "seed": 0}

    def interrupt(record):
        raise KeyboardInterrupt  # the driver dies at its first finished image

    with pytest.raises(KeyboardInterrupt):
        segment_dataset(src, out, num_workers=2, batch_size=1, progress=interrupt, **settings)
    done_dir = out / ".dynaguide" / "done"
    first = {p.name: p.stat().st_mtime_ns for p in done_dir.iterdir()}
    outputs = {p.name: p.stat().st_mtime_ns for p in out.glob("*.labels.png")}
    assert 0 < len(first) < 8, f"nothing left to resume: {sorted(first)}"

    argv = ["segment", str(src), str(out), "--ray", "--num-workers", "2"]
    argv += ["--guidance", "none", "--max-iter", "3", "--quiet"]
    assert cli.main(argv) == 0
    found = re.search(r"(\d+) segmented, (\d+) skipped", capsys.readouterr().out)
    assert found, "no summary line"
    segmented, skipped = int(found[1]), int(found[2])
    assert segmented + skipped == 8 and skipped >= len(first)
    assert sorted(p.name for p in done_dir.iterdir()) == [f"img{i}.json" for i in range(8)]
    for name, mtime in first.items():  # finished before the interruption: not redone
        assert (done_dir / name).stat().st_mtime_ns == mtime
        stem = name.removesuffix(".json")
        assert (out / f"{stem}.labels.png").stat().st_mtime_ns == outputs[f"{stem}.labels.png"]
    assert not list((out / ".dynaguide" / "attempts").glob("*"))  # no batch left in progress
    # a third run finds everything done and starts no worker
    run = segment_dataset(src, out, **settings)
    assert (run.segmented, run.skipped, run.failed) == (0, 8, 0)
    with pytest.raises(ValueError, match="other settings"):
        segment_dataset(src, out, guidance=None, max_iter=4)
