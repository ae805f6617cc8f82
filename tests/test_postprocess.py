"""Post-processing: small-region merging and region-graph merging against oracles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dynaguide.postprocess import merge_regions, merge_small_regions, postprocess


def _blocks(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 40x48 image of four colour blocks with noise, and its block labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((40, 48), np.int64)
    labels[:, 24:] = 1
    labels[20:, :24] = 2
    labels[20:, 24:] = 3
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]])
    img = colours[labels] + rng.integers(-10, 10, size=(40, 48, 3))
    return labels, np.clip(img, 0, 255).astype(np.uint8)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1).shape[1]
    return pairs == len(np.unique(a)) == len(np.unique(b))


def test_small_regions_join_their_closest_colour_neighbour():
    labels, img = _blocks()
    noisy = labels.copy()
    noisy[5, 5] = 3  # one-pixel speck of another label inside block 0
    noisy[30:33, 40:43] = 0  # a 9-pixel speck inside block 3
    out = merge_small_regions(noisy, img, min_area=10)
    assert _same_partition(out, labels)
    # min_area <= 1: only connected components
    cc = merge_small_regions(noisy, img, min_area=0)
    assert cc.max() + 1 == 6
    expected = sum(ndimage.label(noisy == v, np.ones((3, 3)))[1] for v in range(4))
    assert cc.max() + 1 == expected


def test_small_region_of_two_colours_goes_to_the_nearer():
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, :14] = (250, 0, 0)
    img[:, 16:] = (0, 0, 250)
    img[:, 14:16] = (240, 10, 10)  # a thin strip that looks like the left block
    labels = np.zeros((10, 30), np.int64)
    labels[:, 14:16] = 1
    labels[:, 16:] = 2
    out = merge_small_regions(labels, img, min_area=25)
    assert out[0, 14] == out[0, 0] != out[0, 20]


def test_merge_regions_colour_equals_skimage_merge_hierarchical():
    from skimage import color, data, graph, segmentation

    img = data.astronaut()[::4, ::4].copy()
    sp = segmentation.slic(img, n_segments=150, start_label=0)
    lab = color.rgb2lab(img)

    def weight(g, src, dst, n):
        d = g.nodes[dst]["mean color"] - g.nodes[n]["mean color"]
        return {"weight": np.linalg.norm(d)}

    def merge(g, src, dst):
        g.nodes[dst]["total color"] += g.nodes[src]["total color"]
        g.nodes[dst]["pixel count"] += g.nodes[src]["pixel count"]
        g.nodes[dst]["mean color"] = g.nodes[dst]["total color"] / g.nodes[dst]["pixel count"]

    for threshold in (4.0, 10.0, 20.0):
        rag = graph.rag_mean_color(lab, sp, connectivity=1, mode="distance")
        ref = graph.merge_hierarchical(
            sp, rag, threshold, rag_copy=False, in_place_merge=True,
            merge_func=merge, weight_func=weight,
        )  # fmt: skip
        ours = merge_regions(sp, img, threshold=threshold)
        assert _same_partition(ours, ref), threshold


def test_merge_regions_boundary_keeps_strong_edges():
    labels, img = _blocks()
    # split every block into two halves with the same colour: a weak internal boundary
    split = labels * 2 + (np.arange(48)[None, :] % 24 >= 12)
    out = merge_regions(split, img, threshold=20.0, weight="boundary")
    assert _same_partition(out, labels)
    assert merge_regions(split, img, threshold=0.0, weight="boundary").max() + 1 == 8


def test_postprocess_chain_and_errors():
    labels, img = _blocks()
    assert _same_partition(postprocess(labels, img, connectivity=0), labels)
    out = postprocess(labels, img, connectivity=8, min_area=0.01, merge="colour", threshold=1e6)
    assert out.max() == 0  # everything merges under an infinite threshold
    with pytest.raises(ValueError, match="connectivity"):
        postprocess(labels, img, connectivity=0, min_area=0.1)
    with pytest.raises(ValueError, match="image"):
        postprocess(labels, img[:-1])
    with pytest.raises(ValueError, match="labels"):
        postprocess(labels.astype(float), img)
    with pytest.raises(ValueError, match="threshold"):
        merge_regions(labels, img, threshold=-1.0)
    with pytest.raises(ValueError, match="weight"):
        merge_regions(labels, img, threshold=1.0, weight="texture")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="min_area"):
        merge_small_regions(labels, img, min_area=2.5)  # type: ignore[arg-type]
