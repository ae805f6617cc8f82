"""dynaguide.rle: COCO RLE encoding, checked against a naive decoder and a pycocotools string."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dynaguide.rle import (
    counts_to_string,
    labels_to_rles,
    rle_area,
    rle_counts,
    rle_decode,
    rle_encode,
    string_to_counts,
)

# pycocotools.mask.encode output for a 50x70 mask, as published in the README of
# armengot/COCOtoolsFORK (python/README.md): an independent test vector of the string format.
COCO_50x70 = (
    "0g05b08J4M2N2NA^O1`0OCO=0E090H080IO68DH;>@C>a0_O_O`0j0OWOF<:CM72I24NL43JM92FN;1ENKO72L0L"
    "O91J0MO92INO0NO122OO0M031O000NO31OO11MO40N011MO41MO21L06OL021L06OL021L06OL021L060J040L060"
    "J040L060J040L060J040L060J040L060J040L060KO31L060KO31L06OL021L06OL021L06OL021MO41MO21MO40N"
    "100NO310O00M0310O00NO1220NO92IONO91KOMO72M0<1EO:2GN63KM34OLM73JF<;=1G_O_Ob0=AC`07EH=1IO71"
    "H090F0:1DO>1_O1b0>2N2N3L6H]O"
)


def naive_decode(h: int, w: int, counts: list[int]) -> np.ndarray:
    """Fill pixel after pixel, down each column, alternating 0 and 1 runs."""
    mask = np.zeros((h, w), dtype=np.uint8)
    index, value = 0, 0
    for run in counts:
        for _ in range(run):
            mask[index % h, index // h] = value
            index += 1
        value = 1 - value
    assert index == h * w
    return mask


def test_hand_computed_vector():
    mask = np.array([[0, 1], [1, 1]])  # column-major: 0, 1, 1, 1
    assert rle_encode(mask, compressed=False) == {"size": [2, 2], "counts": [1, 3]}
    assert rle_encode(mask) == {"size": [2, 2], "counts": "13"}
    first_set = np.array([[1, 0, 0]])  # a zero-length first run of zeros
    assert rle_counts(first_set).tolist() == [0, 1, 2]


def test_pycocotools_string_round_trip():
    counts = string_to_counts(COCO_50x70)
    assert int(counts.sum()) == 50 * 70
    mask = rle_decode({"size": [50, 70], "counts": COCO_50x70})
    assert np.array_equal(mask, naive_decode(50, 70, counts.tolist()))
    again = rle_encode(mask)
    assert again == {"size": [50, 70], "counts": COCO_50x70}
    assert rle_encode(mask, compressed=False)["counts"] == counts.tolist()
    assert rle_area(again) == int(mask.sum())


@settings(max_examples=150, deadline=None)
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 1))
)
def test_round_trip_against_naive_decoder(mask):
    h, w = mask.shape
    for compressed in (True, False):
        rle = rle_encode(mask, compressed=compressed)
        assert rle["size"] == [h, w]
        decoded = rle_decode(rle)
        assert decoded.dtype == np.uint8 and np.array_equal(decoded, mask)
        assert rle_area(rle) == int(mask.sum())
    counts = rle_encode(mask, compressed=False)["counts"]
    assert np.array_equal(naive_decode(h, w, counts), mask)
    assert string_to_counts(rle_encode(mask)["counts"]).tolist() == counts


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**9), max_size=40))
def test_string_codec_round_trip(counts):
    text = counts_to_string(counts)
    assert all(48 <= ord(c) <= 48 + 0x3F for c in text)
    assert string_to_counts(text).tolist() == counts
    assert string_to_counts(text.encode("ascii")).tolist() == counts


def test_large_random_masks():
    rng = np.random.default_rng(0)
    for shape in [(321, 481), (1, 1000), (1000, 1)]:
        mask = rng.random(shape) < 0.3
        assert np.array_equal(rle_decode(rle_encode(mask)), mask)
    full = np.ones((5, 7), bool)
    assert rle_encode(full, compressed=False)["counts"] == [0, 35]
    assert rle_encode(~full, compressed=False)["counts"] == [35]


def test_labels_to_rles_covers_the_label_map():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, (23, 17)).astype(np.int32)
    rles = labels_to_rles(labels, 7)  # label 6 absent: an empty mask
    assert [r["label"] for r in rles] == list(range(7))
    rebuilt = np.full(labels.shape, -1)
    for r in rles:
        mask = rle_decode(r).astype(bool)
        assert r["area"] == int(mask.sum()) == rle_area(r)
        assert (rebuilt[mask] == -1).all()
        rebuilt[mask] = r["label"]
    assert np.array_equal(rebuilt, labels)
    assert rles[6]["area"] == 0
    with pytest.raises(ValueError, match="labels must lie"):
        labels_to_rles(labels, 3)


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        ({"size": [2, 2], "counts": "1"}, "sum to 1"),
        ({"size": [2, 2], "counts": "1\x7f"}, "invalid character"),
        ({"size": [2, 2], "counts": "1P"}, "ends in the middle"),  # 'P' = 32: more follows
        ({"size": [2, 2], "counts": [5, -1]}, ">= 0"),
        ({"size": [2], "counts": [4]}, "size"),
        ({"counts": [4]}, "dict with"),
    ],
)
def test_malformed_rle_is_rejected(rle, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rle_decode(rle)


def test_against_pycocotools_when_installed():
    mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools is not installed")
    rng = np.random.default_rng(2)
    mask = np.asfortranarray(rng.random((40, 31)) < 0.5, dtype=np.uint8)
    theirs = mask_api.encode(mask)
    assert rle_encode(mask)["counts"] == theirs["counts"].decode("ascii")
