"""Outputs pipelines consume: per-segment records, COCO RLE through pycocotools, the palette
PNG, the choice of formats, start_label, labels_tensor and load_segmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dynaguide
from dynaguide.io import read_label_png
from dynaguide.palette import encode_palette_png, label_colors
from dynaguide.result_files import check_formats
from dynaguide.rle import rle_decode, rle_encode
from dynaguide.segmentation import Segmentation
from dynaguide.segments import label_rles, segment_records

mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools is in the [test] extra")
# pycocotools 2.0.x under numpy 2 warns about its own __array__ use; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _labels(seed: int, shape: tuple[int, int] = (23, 31), k: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, k, size=(shape[0] // 4 + 1, shape[1] // 4 + 1))
    lab = np.kron(coarse, np.ones((4, 4), np.int64))[: shape[0], : shape[1]]
    lab[rng.random(shape) < 0.05] = k - 1  # scattered pixels: many short runs
    return lab


def _image(seed: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed + 100).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _reference_records(lab: np.ndarray, img: np.ndarray) -> list[dict]:
    out = []
    for k in np.unique(lab):
        rows, cols = np.nonzero(lab == k)
        out.append(
            {
                "id": int(k),
                "area": rows.size,
                "bbox": [
                    cols.min(),
                    rows.min(),
                    cols.max() - cols.min() + 1,
                    rows.max() - rows.min() + 1,
                ],
                "centroid": [cols.mean(), rows.mean()],
                "mean_color": img[rows, cols].astype(np.float64).mean(0),
            }
        )
    return out


@pytest.mark.parametrize("seed", range(5))
def test_records_match_a_per_segment_loop(seed: int) -> None:
    lab = _labels(seed)
    img = _image(seed, lab.shape)
    got = segment_records(lab, img)
    want = _reference_records(lab, img)
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["area"] == w["area"] and g["bbox"] == [int(v) for v in w["bbox"]]
        np.testing.assert_allclose(g["centroid"], w["centroid"], rtol=1e-12)
        np.testing.assert_allclose(g["mean_color"], w["mean_color"], rtol=1e-12)
        np.testing.assert_array_equal(rle_decode(g["segmentation"]), lab == g["id"])


@pytest.mark.parametrize("seed", range(6))
def test_our_rle_decodes_with_pycocotools(seed: int) -> None:
    lab = _labels(seed, shape=(17 + seed, 29 - seed))
    for rec in segment_records(lab):
        rle = rec["segmentation"]
        coco = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        np.testing.assert_array_equal(mask_api.decode(coco), (lab == rec["id"]).astype(np.uint8))
        assert int(mask_api.area(coco)) == rec["area"]
        np.testing.assert_array_equal(mask_api.toBbox(coco), np.asarray(rec["bbox"], float))


@pytest.mark.parametrize("seed", range(6))
def test_pycocotools_rle_decodes_with_ours(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = (rng.random((13 + seed, 21)) < 0.3 + 0.1 * seed).astype(np.uint8)
    mask[0, 0] = seed % 2  # a mask that starts set and one that starts clear
    coco = mask_api.encode(np.asfortranarray(mask))
    ours = {"size": coco["size"], "counts": coco["counts"].decode("ascii")}
    np.testing.assert_array_equal(rle_decode(ours), mask)
    assert rle_encode(mask)["counts"] == ours["counts"]  # the same string, byte for byte
    ours_by_label = label_rles(mask.astype(np.int64), np.array([1]))[1]
    assert ours_by_label["counts"] == ours["counts"]


def test_full_and_empty_masks_match_pycocotools() -> None:
    for mask in (np.ones((4, 5), np.uint8), np.zeros((4, 5), np.uint8)):
        coco = mask_api.encode(np.asfortranarray(mask))
        assert rle_encode(mask)["counts"] == coco["counts"].decode("ascii")
    lab = np.zeros((4, 5), np.int64)
    assert label_rles(lab, np.array([0, 3]))[3]["counts"] == mask_api.encode(
        np.asfortranarray(np.zeros((4, 5), np.uint8))
    )["counts"].decode("ascii")


def test_records_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="labels"):
        segment_records(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="labels must be >= 0"):
        segment_records(-np.ones((3, 3), np.int64))
    with pytest.raises(ValueError, match="image"):
        segment_records(np.zeros((3, 3), np.int64), np.zeros((3, 4, 3), np.uint8))


def test_palette_png_indices_are_the_labels() -> None:
    lab = _labels(1, k=9)
    data = encode_palette_png(lab, 9)
    from io import BytesIO

    with Image.open(BytesIO(data)) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), lab)
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), label_colors(9)[lab])
    many = np.arange(300).reshape(15, 20)
    with Image.open(BytesIO(encode_palette_png(many, 300))) as im:  # too many for 8 bits
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), label_colors(300)[many])
    with pytest.raises(ValueError, match="labels must lie in"):
        encode_palette_png(lab, 3)


def _seg(start: int = 0) -> Segmentation:
    lab = _labels(3, k=5)
    lab = np.unique(lab, return_inverse=True)[1].reshape(lab.shape)
    return Segmentation(
        labels=lab + start, n_labels=int(lab.max()) + 1, n_iter=4,
        history={"loss": [1.0, 0.5], "n_labels": [5, 5]}, guide_labels=None,
        image=_image(3, lab.shape), config=dynaguide.get_preset("dfc"), seconds=0.25,
        stop_reason="max_iter (4)", name="cat.png", extra={"guide": "kmeans"}, start_label=start,
    )  # fmt: skip


@pytest.mark.parametrize("start", [0, 1])
def test_every_format_loads_back(tmp_path: Path, start: int) -> None:
    seg = _seg(start)
    paths = seg.save(tmp_path, formats="labels,palette,overlay,segments")
    assert list(paths) == ["labels", "palette", "overlay", "segments", "json"]
    doc = json.loads(paths["segments"].read_text())
    assert doc["start_label"] == start and [r["id"] for r in doc["segments"]] == list(
        range(start, start + seg.n_labels)
    )
    for key in ("json", "labels", "palette", "overlay", "segments"):
        back = dynaguide.load_segmentation(paths[key])
        np.testing.assert_array_equal(back.labels, seg.labels)
        assert (back.n_labels, back.n_iter, back.start_label) == (seg.n_labels, 4, start)
        assert back.history == seg.history and back.config == seg.config
    # with the labels PNG and the palette gone, the RLE masks still give the labels
    paths["labels"].unlink()
    paths["palette"].unlink()
    back = dynaguide.load_segmentation(paths["json"])
    np.testing.assert_array_equal(back.labels, seg.labels)
    assert back.extra["image_source"] == "segment mean colours"
    given = dynaguide.load_segmentation(paths["json"], image=seg.image)
    np.testing.assert_array_equal(given.image, seg.image)


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a file of a saved dynaguide result"):
        dynaguide.load_segmentation(tmp_path / "photo.jpg")
    seg = _seg()
    paths = seg.save(tmp_path, formats=["overlay"])
    with pytest.raises(FileNotFoundError, match="no label map"):
        dynaguide.load_segmentation(paths["json"])
    with pytest.raises(ValueError, match="does not match"):
        seg.save(tmp_path, "b")
        dynaguide.load_segmentation(tmp_path / "b.json", image=np.zeros((2, 2, 3), np.uint8))
    (tmp_path / "c.json").write_text("{not json")
    (tmp_path / "c.labels.png").write_bytes(paths["overlay"].read_bytes())
    with pytest.raises(ValueError, match="not valid JSON"):
        dynaguide.load_segmentation(tmp_path / "c.labels.png")


def test_formats_are_checked() -> None:
    assert check_formats(None) == ("labels", "overlay")
    assert check_formats("segments, labels,json") == ("labels", "segments")
    with pytest.raises(ValueError, match=r"unknown formats \['png'\]"):
        check_formats("labels,png")
    with pytest.raises(TypeError, match="formats"):
        check_formats([1])


def test_segment_start_label_and_regionprops() -> None:
    from skimage.measure import regionprops

    img = np.zeros((24, 30, 3), np.uint8)
    img[:, 10:20] = (250, 20, 20)
    img[:, 20:] = (20, 20, 250)
    zero = dynaguide.segment(img, device="cpu")
    one = dynaguide.segment(img, device="cpu", start_label=1)
    np.testing.assert_array_equal(one.labels, zero.labels + 1)
    assert one.start_label == 1 and one.to_dict()["start_label"] == 1
    assert len(regionprops(one.labels)) == one.n_labels  # every segment has a region
    assert len(regionprops(zero.labels)) == zero.n_labels - 1  # label 0 is background there
    np.testing.assert_array_equal(one.overlay(), zero.overlay())
    with pytest.raises(ValueError, match="start_label must be 0 or 1"):
        dynaguide.segment(img, device="cpu", start_label=2)


def test_segment_connectivity_splits_colour_clusters() -> None:
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, 10:20] = 255  # black | white | black: two black regions, one colour cluster
    clusters = dynaguide.segment(img, preset="dfc", guidance="kmeans", max_iter=0, connectivity=0,
                                 guidance_options={"n_clusters": 2}, device="cpu")  # fmt: skip
    regions = dynaguide.segment(img, preset="dfc", guidance="kmeans", max_iter=0, connectivity=4,
                                guidance_options={"n_clusters": 2}, device="cpu")  # fmt: skip
    assert clusters.n_labels == 2 and regions.n_labels == 3
    assert regions.extra["settings"]["overrides"]["connectivity"] == 4


def test_return_tensors_on_the_refinement_device() -> None:
    img = _image(0, (16, 20))
    seg = dynaguide.segment(img, device="cpu", return_tensors=True, start_label=1)
    t = seg.labels_tensor
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.device.type == "cpu"
    np.testing.assert_array_equal(t.numpy(), seg.labels)
    assert "labels_tensor" not in seg.to_dict()
    assert dynaguide.segment(img, device="cpu").labels_tensor is None
    (batched,) = dynaguide.segment_batch([img], device="cpu", return_tensors=True)
    np.testing.assert_array_equal(batched.labels_tensor.numpy(), seg.labels - 1)


@pytest.mark.gpu
def test_return_tensors_stay_on_cuda() -> None:
    img = _image(0, (32, 40))
    seg = dynaguide.segment(img, preset="dynaguide-fast", device="cuda", return_tensors=True)
    assert seg.labels_tensor.device.type == "cuda"
    np.testing.assert_array_equal(seg.labels_tensor.cpu().numpy(), seg.labels)


def test_labels_png_round_trip_of_start_label(tmp_path: Path) -> None:
    seg = _seg(1)
    paths = seg.save(tmp_path, "s")
    np.testing.assert_array_equal(read_label_png(paths["labels"]), seg.labels)


@pytest.mark.parametrize("start", [0, 1])
def test_parquet_records_keep_start_label(start: int) -> None:
    from dynaguide.distributed.records import labels_from_record, segment_record

    seg = _seg(start)
    record = segment_record(seg, "cat", 0.0, "w")
    assert [s["label"] for s in record["segments"]] == list(range(start, start + seg.n_labels))
    np.testing.assert_array_equal(labels_from_record(record), seg.labels)
