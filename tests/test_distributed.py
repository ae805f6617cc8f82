"""dynaguide.distributed without a Ray cluster: sources, ids, the output store and manifest,
the worker callable run in-process, the crash accounting and the CLI plumbing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_helpers import FAST, json_without_timing, require, write_folder, write_image

import dynaguide
from dynaguide import cli
from dynaguide.distributed.cli import path_argument
from dynaguide.distributed.sources import check_id, has_glob, is_uri, list_source
from dynaguide.distributed.store import MANIFEST_DIR, OutputStore, id_key
from dynaguide.distributed.worker import KILL_ENV, SegmentWorker
from dynaguide.io import read_label_png


@pytest.fixture
def one_thread():
    """The workers run one torch thread; so does the in-process reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_import_dynaguide_never_imports_ray(tmp_path: Path):
    code = (
        "import sys, dynaguide, dynaguide.cli, dynaguide.distributed, dynaguide.distributed.cli\n"
        "import dynaguide.rle, dynaguide.distributed.records\n"
        "dynaguide.cli.build_parser()\n"
        "bad = sorted(m for m in ('ray', 'pyarrow') if m in sys.modules)\n"
        "print(','.join(bad))"
    )
    # cwd: not the checkout, whose bare source package `python -c` would find first
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == ""


# --------------------------------------------------------------------------- sources


def test_folder_ids_match_the_cli_names(tmp_path: Path):
    src = tmp_path / "in"
    write_image(src / "a.png", 0)
    write_image(src / "x.png", 1)
    write_image(src / "x.jpg", 2)  # same stem: both keep the extension
    write_image(src / "sub" / "b.png", 3)
    (src / ".hidden.png").write_bytes(b"x")
    (src / "notes.txt").write_text("no")
    fs, items = list_source(src)
    assert fs is None
    assert [i.id for i in items] == ["a", "x.jpg", "x.png"]
    assert all(os.path.isabs(i.path) for i in items)
    assert items[0].name == str(src / "a.png")
    _, nested = list_source(src, recursive=True)
    assert [i.id for i in nested] == ["a", "sub/b", "x.jpg", "x.png"]
    _, single = list_source(src / "sub" / "b.png")
    assert [(i.id, i.name) for i in single] == [("b", str(src / "sub" / "b.png"))]


def test_globs_and_lists(tmp_path: Path):
    require("pyarrow.fs")  # globs and file:// URIs go through pyarrow
    src = tmp_path / "in"
    for rel in ["a.png", "b.jpg", "sub/c.png", "sub/deep/d.png", "other/e.png"]:
        write_image(src / rel, 0, size=4)
    _, items = list_source(str(src / "*.png"))
    assert [i.id for i in items] == ["a"]
    _, items = list_source(str(src / "**" / "*.png"))
    assert [i.id for i in items] == ["a", "other/e", "sub/c", "sub/deep/d"]
    _, items = list_source(str(src / "sub" / "*" / "*.png"))
    assert [i.id for i in items] == ["deep/d"]
    _, items = list_source(f"file://{src}/*.jpg")
    assert [i.id for i in items] == ["b"]
    fs, items = list_source([src / "sub" / "c.png", str(src / "a.png")])
    assert fs is None and [i.id for i in items] == ["a", "sub/c"]
    with pytest.raises(FileNotFoundError):
        list_source(tmp_path / "missing")
    with pytest.raises(ValueError, match="no image files"):
        list_source(str(src / "*.bmp"))
    with pytest.raises(ValueError, match="more than once"):
        list_source([src / "a.png", src / "a.png"])
    with pytest.raises(TypeError, match="source must be"):
        list_source(42)
    with pytest.raises(ValueError, match="empty"):
        list_source([])


def test_source_on_an_explicit_filesystem(tmp_path: Path):
    pafs = require("pyarrow.fs")
    write_folder(tmp_path / "bucket" / "imgs", 2)
    sub = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    fs, items = list_source("imgs", filesystem=sub)
    assert fs is sub and [(i.id, i.path) for i in items] == [
        ("img0", "imgs/img0.png"),
        ("img1", "imgs/img1.png"),
    ]


def test_id_rules():
    assert check_id("a/b-c.d") == "a/b-c.d"
    for bad in ["", "/abs", "a//b", "a/../b", ".", "a\\b", "x\0", 3]:
        with pytest.raises(ValueError):
            check_id(bad)
    assert is_uri("s3://b/k") and not is_uri("C:\\x") and not is_uri("a/b")
    assert has_glob("a/*.png") and not has_glob("a/b.png")
    long = "d/" * 300 + "x"
    assert len(id_key(long)) < 200 and id_key(long) != id_key(long + "y")
    assert id_key("a/b c") == "a%2Fb%20c"


def test_cli_paths_keep_their_uris():
    assert path_argument(Path("s3://bucket/key")) == "s3://bucket/key"
    assert path_argument(Path("file:///data/x")) == "/data/x"
    assert path_argument(Path("rel/dir")) == "rel/dir"


# --------------------------------------------------------------------------- store


@pytest.mark.parametrize("kind", ["local", "pyarrow"])
def test_store_files_manifest_and_errors(tmp_path: Path, kind: str):
    if kind == "local":
        store = OutputStore(str(tmp_path / "out"))
    else:
        pafs = require("pyarrow.fs")
        (tmp_path / "root").mkdir()
        sub = pafs.SubTreeFileSystem(str(tmp_path / "root"), pafs.LocalFileSystem())
        store = OutputStore("out", sub)
    store.write_bytes("a/b.bin", b"123")
    assert store.read_bytes("a/b.bin") == b"123" and store.exists("a/b.bin")
    assert store.list_files("a") == ["b.bin"] and store.list_files("missing") == []
    store.delete("a/b.bin")
    store.delete("a/b.bin")  # missing: no error
    assert not store.exists("a/b.bin")
    store.mark_done("x/y", {"n_labels": 2})
    store.record_error("bad one", "in/bad.jpg", "ImageReadError: nope")
    assert store.is_done("x/y") and not store.is_done("bad one")
    assert store.done_keys("files") == {id_key("x/y")}
    _path, n = store.write_errors_file()
    assert n == 1
    (line,) = store.read_bytes("errors.jsonl").decode().splitlines()
    assert json.loads(line)["reason"] == "ImageReadError: nope"
    store.mark_done("bad one", {})  # a later success removes the error record
    assert store.errors() == []
    store.check_settings({"max_iter": 2})
    store.check_settings({"max_iter": 2})
    with pytest.raises(ValueError, match=r"other settings .*max_iter"):
        store.check_settings({"max_iter": 3})
    store.write_bytes(f"{MANIFEST_DIR}/attempts/x", b"1")
    store.clear_attempts()
    assert store.list_files(f"{MANIFEST_DIR}/attempts") == []
    assert not [p for p in (tmp_path).rglob("*.tmp")]  # atomic writes leave no temporaries


# --------------------------------------------------------------------------- worker in-process


def _batch(items) -> dict[str, list[str]]:
    return {
        "id": [i.id for i in items],
        "path": [i.path for i in items],
        "name": [i.name for i in items],
    }


def test_worker_writes_what_dynaguide_segment_writes(tmp_path: Path, one_thread):
    src = tmp_path / "in"
    write_folder(src, 2, corrupt="broken.jpg")
    cli_out, ray_out = tmp_path / "cli", tmp_path / "ray"
    argv = ["segment", str(src), str(cli_out), "--guidance", "none", "--max-iter", "2"]
    assert cli.main([*argv, "--quiet"]) == 1  # the corrupt file fails
    _, items = list_source(src)
    store = OutputStore(str(ray_out))
    worker = SegmentWorker(store, "files", None, dict(FAST))
    result = worker(_batch(items))
    assert result["status"] == ["error", "done", "done"]
    assert result["id"] == ["broken", "img0", "img1"]
    assert (
        "ImageReadError" in result["reason"][0] and str(src / "broken.jpg") in result["reason"][0]
    )
    for stem in ("img0", "img1"):
        a, b = cli_out / f"{stem}.labels.png", ray_out / f"{stem}.labels.png"
        assert np.array_equal(read_label_png(a), read_label_png(b))
        a, b = cli_out / f"{stem}.overlay.png", ray_out / f"{stem}.overlay.png"
        assert a.read_bytes() == b.read_bytes()
        assert json_without_timing(cli_out / f"{stem}.json") == json_without_timing(
            ray_out / f"{stem}.json"
        )
    assert store.done_keys("files") == {"img0", "img1"}
    (err,) = store.errors()
    assert err["id"] == "broken" and err["source"] == str(src / "broken.jpg")
    # what is done is not redone, its files untouched: ids the driver passes as done by an
    # earlier run (a ray.data.Dataset source: "skipped"), and the images a batch finished
    # before its worker died, when the batch is re-run ("done" by this run)
    mtime = (ray_out / "img0.labels.png").stat().st_mtime_ns
    done = frozenset(store.done_keys("files"))
    again = SegmentWorker(store, "files", None, dict(FAST), done_keys=done)(_batch(items))
    assert again["status"] == ["error", "skipped", "skipped"]
    digest = hashlib.sha1(b"broken\nimg0\nimg1").hexdigest()[:24]
    store.write_bytes(f"{MANIFEST_DIR}/attempts/{digest}", b"1\n")
    assert worker(_batch(items))["status"] == ["error", "done", "done"]  # done by this run
    assert (ray_out / "img0.labels.png").stat().st_mtime_ns == mtime


def test_worker_parquet_records_and_row_kinds(tmp_path: Path, one_thread):
    pq = require("pyarrow.parquet")
    from dynaguide.distributed.records import labels_from_record

    paths = write_folder(tmp_path / "in", 3)
    arrays = [np.asarray(dynaguide.io.load_image(p)) for p in paths]
    store = OutputStore(str(tmp_path / "out"))
    worker = SegmentWorker(store, "parquet", None, {**FAST, "guidance": "kmeans"})
    batch = {
        "id": ["a/bytes", "b/array", "../bad"],
        "bytes": [paths[0].read_bytes(), None, None],
        "image": [None, arrays[1], arrays[2]],
    }
    result = worker(batch)
    assert result["status"] == ["done", "done", "error"]
    assert "'..'" in result["reason"][2]
    (part,) = (tmp_path / "out" / "segments").glob("part-*.parquet")
    digest = hashlib.sha1(b"a/bytes\nb/array\n../bad").hexdigest()[:24]
    assert part.name == f"part-{digest}.parquet"  # named by the batch: a retry replaces it
    rows = pq.read_table(part).to_pylist()
    assert [r["id"] for r in rows] == ["a/bytes", "b/array"]
    for row, rgb in zip(rows, arrays[:2], strict=True):
        ref = dynaguide.segment(rgb, guidance="kmeans", max_iter=2, seed=0)
        assert (row["height"], row["width"], row["n_labels"]) == (32, 32, ref.n_labels)
        assert np.array_equal(labels_from_record(row), ref.labels)
        assert row["guide"] == "kmeans" and row["n_iter"] == 2 and row["refine_s"] > 0
    assert store.done_keys("parquet") == {id_key("a/bytes"), id_key("b/array")}


def test_worker_on_pyarrow_filesystems(tmp_path: Path, one_thread):
    pafs = require("pyarrow.fs")
    write_folder(tmp_path / "bucket" / "imgs", 1)
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    source_fs, items = list_source("imgs", filesystem=fs)
    store = OutputStore("results", fs)
    result = SegmentWorker(store, "files", source_fs, dict(FAST))(_batch(items))
    assert result["status"] == ["done"]
    out = tmp_path / "bucket" / "results"
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "img0.json",
        "img0.labels.png",
        "img0.overlay.png",
    ]
    assert json.loads((out / "img0.json").read_text())["name"] == "imgs/img0.png"


def test_a_retried_batch_reports_a_poison_image(tmp_path: Path, one_thread):
    """A batch whose earlier attempt died runs image by image; an image the process
    already died on more than max_retries times becomes an error, the others go on."""
    write_folder(tmp_path / "in", 2)
    _, items = list_source(tmp_path / "in")
    store = OutputStore(str(tmp_path / "out"))
    digest = hashlib.sha1(b"img0\nimg1").hexdigest()[:24]
    attempt = f"{MANIFEST_DIR}/attempts/{digest}"
    store.write_bytes(attempt, b"1\n")  # one attempt of this batch died
    store.write_bytes(f"{attempt}.img1", b"2\n")  # twice while segmenting img1 alone
    result = SegmentWorker(store, "files", None, dict(FAST), max_retries=1)(_batch(items))
    assert result["status"] == ["done", "error"]
    assert result["reason"][1] == "the worker process died 2 time(s) while segmenting it"
    assert store.list_files(f"{MANIFEST_DIR}/attempts") == []
    assert [e["id"] for e in store.errors()] == ["img1"]


def test_kill_hook_exits_once(tmp_path: Path):
    marker = tmp_path / "killed"
    code = "from dynaguide.distributed.worker import _maybe_die; _maybe_die('x'); print('alive')"
    env = {**os.environ, KILL_ENV: f"x={marker};never-seen"}
    run = {"capture_output": True, "text": True, "cwd": tmp_path}  # cwd: not the checkout
    first = subprocess.run([sys.executable, "-c", code], env=env, **run)
    assert first.returncode == 17 and first.stdout == "" and marker.is_file()
    second = subprocess.run([sys.executable, "-c", code], env=env, **run)
    assert second.returncode == 0 and second.stdout.strip() == "alive"
    always = {**os.environ, KILL_ENV: "x"}
    third = subprocess.run([sys.executable, "-c", code], env=always, **run)
    assert third.returncode == 17


# --------------------------------------------------------------------------- settings, CLI


def test_bad_settings_fail_before_ray_starts(tmp_path: Path):
    from dynaguide.distributed import segment_dataset

    src = tmp_path / "in"
    write_folder(src, 1)
    with pytest.raises(ValueError, match="output_format"):
        segment_dataset(src, tmp_path / "o", output_format="csv")
    with pytest.raises(TypeError, match="device"):
        segment_dataset(src, tmp_path / "o", device="cuda")
    with pytest.raises(ValueError, match="unknown guidance"):
        segment_dataset(src, tmp_path / "o", guidance="nope")
    with pytest.raises(TypeError, match="unknown RefineConfig"):
        segment_dataset(src, tmp_path / "o", not_a_field=1)
    with pytest.raises(ValueError, match="batch_size"):
        segment_dataset(src, tmp_path / "o", batch_size=0)
    assert not (tmp_path / "o").exists()


def test_cli_ray_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    args = cli.build_parser().parse_args(
        ["segment", "in", "out", "--ray", "--address", "auto", "--num-workers", "3",
         "--gpus-per-worker", "0.5", "--output-format", "parquet"]
    )  # fmt: skip
    assert (args.ray, args.address, args.num_workers) == (True, "auto", 3)
    assert (args.gpus_per_worker, args.output_format) == (0.5, "parquet")
    code = cli.main(["segment", str(tmp_path), str(tmp_path / "o"), "--ray", "--device", "cuda"])
    assert code == 2
    assert "--device does not apply with --ray" in capsys.readouterr().err
