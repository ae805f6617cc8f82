"""Weight-free guides: LAB k-means, Felzenszwalb and SLIC (scikit-image / scikit-learn).

``kmeans`` is what the authors' released DynaGuide code actually runs as its "DiffSeg"
guide (DynaGuide, IVC 2025): k-means (k=5) on the LAB colour of every pixel. Here the centres are
fitted on a seeded sample of pixels (``sample``) and every pixel is then assigned to its
nearest centre, which gives the same kind of partition at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynaguide.errors import as_int, as_number
from dynaguide.guidance.base import check_rgb_image


@dataclass
class KMeansGuide:
    """k-means on the CIE-LAB colour of the pixels.

    Parameters
    ----------
    n_clusters : int or "auto"
        Number of colour clusters (5 in the authors' code). ``"auto"`` picks it per image:
        the k in ``auto_range`` with the best silhouette score of k-means on a seeded
        sample of 4000 pixels (:func:`dynaguide.silhouette.optimal_clusters`).
    auto_range : (int, int)
        Inclusive range of k tried by ``n_clusters="auto"``.
    sample : int
        Pixels drawn (seeded) to fit the centres; all pixels are then assigned.
    n_init : int
        k-means restarts.
    seed : int
        Seed of the sample and of k-means.
    """

    n_clusters: int | str = 5
    auto_range: tuple[int, int] = (2, 12)
    sample: int = 20000
    n_init: int = 4
    seed: int = 42
    name: str = "kmeans"

    def __post_init__(self) -> None:
        """Validate the options (TypeError / ValueError naming the option)."""
        if self.n_clusters != "auto":
            self.n_clusters = as_int(self.n_clusters, "kmeans n_clusters", minimum=1, maximum=256)
        if not isinstance(self.auto_range, (tuple, list)) or len(self.auto_range) != 2:
            raise ValueError(f"kmeans auto_range must be (lo, hi), got {self.auto_range!r}")
        lo = as_int(self.auto_range[0], "kmeans auto_range[0]", minimum=2, maximum=256)
        hi = as_int(self.auto_range[1], "kmeans auto_range[1]", minimum=lo, maximum=256)
        self.auto_range = (lo, hi)
        self.sample = as_int(self.sample, "kmeans sample", minimum=1, maximum=10_000_000)
        self.n_init = as_int(self.n_init, "kmeans n_init", minimum=1, maximum=100)
        self.seed = as_int(self.seed, "kmeans seed", minimum=0, maximum=2**32 - 1)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) int32 cluster ids of an (H, W, 3) uint8 RGB image."""
        from skimage.color import rgb2lab
        from sklearn.cluster import KMeans

        check_rgb_image(image, f"guide {self.name!r}")
        h, w, _ = image.shape
        lab = rgb2lab(image).reshape(-1, 3).astype(np.float32)
        rng = np.random.default_rng(self.seed)
        fit = (
            lab
            if lab.shape[0] <= self.sample
            else lab[rng.choice(lab.shape[0], self.sample, replace=False)]
        )
        if self.n_clusters == "auto":
            from dynaguide.silhouette import optimal_clusters

            wanted = optimal_clusters(fit, k_range=self.auto_range, seed=self.seed)
        else:
            wanted = int(self.n_clusters)
        k = max(1, min(wanted, len(np.unique(fit, axis=0))))
        km = KMeans(n_clusters=k, n_init=self.n_init, random_state=self.seed).fit(fit)
        return km.predict(lab).astype(np.int32).reshape(h, w)


@dataclass
class FelzenszwalbGuide:
    """Felzenszwalb-Huttenlocher graph segmentation (``skimage.segmentation.felzenszwalb``)."""

    scale: float = 100.0
    sigma: float = 0.5
    min_size: int = 50
    name: str = "felzenszwalb"

    def __post_init__(self) -> None:
        """Validate the options (TypeError / ValueError naming the option)."""
        self.scale = as_number(self.scale, "felzenszwalb scale", minimum=0, positive=True)
        self.sigma = as_number(self.sigma, "felzenszwalb sigma", minimum=0, maximum=1000)
        self.min_size = as_int(self.min_size, "felzenszwalb min_size", minimum=0)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) int32 segment ids of an (H, W, 3) uint8 RGB image."""
        from skimage.segmentation import felzenszwalb

        check_rgb_image(image, f"guide {self.name!r}")
        return felzenszwalb(
            image, scale=self.scale, sigma=self.sigma, min_size=self.min_size
        ).astype(np.int32)


@dataclass
class SlicGuide:
    """SLIC superpixels (``skimage.segmentation.slic``)."""

    n_segments: int = 100
    compactness: float = 10.0
    sigma: float = 0.0
    name: str = "slic"

    def __post_init__(self) -> None:
        """Validate the options (TypeError / ValueError naming the option)."""
        self.n_segments = as_int(self.n_segments, "slic n_segments", minimum=1, maximum=10**6)
        self.compactness = as_number(self.compactness, "slic compactness", minimum=0, positive=True)
        self.sigma = as_number(self.sigma, "slic sigma", minimum=0, maximum=1000)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) int32 superpixel ids of an (H, W, 3) uint8 RGB image."""
        from skimage.segmentation import slic

        check_rgb_image(image, f"guide {self.name!r}")
        labels = slic(
            image,
            n_segments=self.n_segments,
            compactness=self.compactness,
            sigma=self.sigma,
            start_label=0,
        )
        return labels.astype(np.int32)
