"""Classical guides: k-means with a per-image number of clusters."""

from __future__ import annotations

import numpy as np
import pytest

from dynaguide.guidance import get_guide


def _blocks(colours: list[tuple[int, int, int]]) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((30, 10 * len(colours), 3), dtype=np.float64)
    for i, c in enumerate(colours):
        img[:, 10 * i : 10 * (i + 1)] = c
    return np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("n", [3, 4])
def test_auto_k_finds_the_number_of_colour_blocks(n):
    colours = [(220, 30, 30), (30, 200, 40), (40, 40, 210), (240, 240, 240)][:n]
    labels = get_guide("kmeans", n_clusters="auto", auto_range=(2, 8))(_blocks(colours))
    assert len(np.unique(labels)) == n
    for i in range(n):  # each block is one cluster
        assert len(np.unique(labels[:, 10 * i : 10 * (i + 1)])) == 1


def test_auto_options_are_checked():
    with pytest.raises(TypeError, match="n_clusters"):
        get_guide("kmeans", n_clusters="many")
    with pytest.raises(ValueError, match="auto_range"):
        get_guide("kmeans", n_clusters="auto", auto_range=(5,))
    with pytest.raises(ValueError, match=r"auto_range\[1\]"):
        get_guide("kmeans", n_clusters="auto", auto_range=(6, 3))
