"""Dataset readers of dynaguide.eval: real data (skipped when absent) and synthetic layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynaguide.eval import (
    BSDS500Dataset,
    DatasetError,
    FolderDataset,
    bsds_scores,
    load_bsds_annotations,
    load_mask,
    open_dataset,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BSDS_VAL = DATA / "bsds500" / "val"
VOC = DATA / "voc_sample"
needs_bsds = pytest.mark.skipif(
    not BSDS_VAL.is_dir(), reason=f"BSDS500 data not found at {BSDS_VAL}"
)
needs_voc = pytest.mark.skipif(not VOC.is_dir(), reason=f"VOC sample not found at {VOC}")


def _bsds(root: Path, ids: list[str], *, with_gt: list[str] | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "gt").mkdir()
    for i in ids:
        Image.fromarray(np.full((6, 8, 3), 120, np.uint8)).save(root / "images" / f"{i}.jpg")
    for i in ids if with_gt is None else with_gt:
        np.savez_compressed(root / "gt" / f"{i}.npz", a0=np.ones((6, 8), np.uint16))
    return root


@needs_bsds
def test_bsds_val_reader_and_blank_prediction():
    ds = BSDS500Dataset(BSDS_VAL)
    assert len(ds) == 100 and ds.kind == "bsds500" and ds.metric == "bsds"
    ids = [it.id for it in ds]
    assert ids == sorted(ids)
    items = ds.items[:5]
    anns = [it.annotations for it in items]
    assert all(4 <= len(a) <= 9 for a in anns)
    img = items[0].load_image()
    assert img.dtype == np.uint8 and img.shape[:2] == anns[0][0].shape and img.shape[2] == 3
    assert all(a.min() >= 1 for ann in anns for a in ann)  # BSDS labels start at 1
    s = bsds_scores([np.zeros(a[0].shape, np.int32) for a in anns], anns)
    # blank prediction: best(S) = |S| / |image|, so each annotation contributes exactly 1
    assert s["sums"]["All"] == pytest.approx(sum(len(a) for a in anns))
    assert s["counts"]["All"] == sum(len(np.unique(g)) for a in anns for g in a)
    assert 0 < s["Fine"] < s["All"] < s["Coarse"] < 1


@needs_voc
def test_voc_sample_folder_reader():
    ds = open_dataset("auto", VOC)
    assert isinstance(ds, FolderDataset) and len(ds) == 14 and ds.metric == "voc"
    item = ds[0]
    (mask,) = item.annotations
    assert mask.shape == item.load_image().shape[:2]
    values = set(np.unique(mask).tolist())
    assert 255 in values and 0 in values and values <= set(range(21)) | {255}  # raw indices


def test_annotation_keys_sorted_numerically(tmp_path):
    maps = {f"a{k}": np.full((2, 2), k + 1, np.uint16) for k in (10, 2, 0, 1)}
    np.savez(tmp_path / "x.npz", **maps, extra=np.zeros(1))
    got = load_bsds_annotations(tmp_path / "x.npz")
    assert [int(m[0, 0]) for m in got] == [1, 2, 3, 11]


def test_missing_annotation_warns_or_errors(tmp_path):
    root = _bsds(tmp_path / "s", ["1", "2", "3"], with_gt=["2"])
    with pytest.warns(UserWarning, match=r"2 image\(s\) without annotation: 1, 3"):
        ds = BSDS500Dataset(root)
    assert [it.id for it in ds] == ["2"] and ds.skipped == ["1", "3"]
    with pytest.raises(DatasetError, match="without annotation"):
        BSDS500Dataset(root, on_missing="error")
    with pytest.raises(ValueError, match="on_missing"):
        BSDS500Dataset(root, on_missing="ignore")


def test_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        BSDS500Dataset(tmp_path / "nope")
    _bsds(tmp_path / "bsds" / "val", ["1"])
    with pytest.raises(DatasetError, match="did you mean one of its splits: val"):
        BSDS500Dataset(tmp_path / "bsds")
    (tmp_path / "f" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="mask folder not found"):
        FolderDataset(tmp_path / "f")
    (tmp_path / "f" / "masks").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        FolderDataset(tmp_path / "f")
    with pytest.raises(ValueError, match="unknown dataset kind"):
        open_dataset("coco", tmp_path)


def test_corrupt_files_are_reported(tmp_path):
    root = _bsds(tmp_path / "s", ["1", "2"])
    (root / "gt" / "2.npz").write_bytes(b"not a zip file")
    (root / "images" / "1.jpg").write_bytes(b"\xff\xd8 truncated")
    ds = BSDS500Dataset(root)
    with pytest.raises(DatasetError, match=r"2\.npz: cannot read annotations"):
        _ = ds[1].annotations
    with pytest.raises(DatasetError, match=r"1\.jpg: cannot read image"):
        ds[0].load_image()
    np.savez(root / "gt" / "2.npz", b=np.zeros((2, 2)))
    with pytest.raises(DatasetError, match="no annotation keys"):
        load_bsds_annotations(root / "gt" / "2.npz")
    np.savez(root / "gt" / "2.npz", a0=np.zeros((2, 2)))
    with pytest.raises(DatasetError, match="not a 2-D integer label map"):
        load_bsds_annotations(root / "gt" / "2.npz")


def test_folder_masks_read_raw_and_colour_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "images" / "b.jpg")
    idx = np.array([[0, 1, 2, 255, 3]] * 4, np.uint8)
    pal = Image.new("P", (5, 4))
    pal.putdata(idx.ravel().tolist())
    pal.putpalette([(7 * i) % 256 for i in range(768)])
    pal.save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "masks" / "b.png")
    ds = FolderDataset(tmp_path)
    assert [it.id for it in ds] == ["a", "b"]
    assert np.array_equal(ds[0].annotations[0], idx)  # palette indices, not colours
    with pytest.raises(DatasetError, match="colour"):
        _ = ds[1].annotations
    with pytest.raises(DatasetError, match="cannot read mask"):
        (tmp_path / "masks" / "c.png").write_bytes(b"junk")
        load_mask(tmp_path / "masks" / "c.png")
