"""The silhouette-score phase of DynaSeg (Guermazi, Ksantini and Khan, IVC 2024,
arXiv 2405.05477), with the silhouette coefficient of Rousseeuw (J. Comput. Appl. Math.
1987).

``optimal_clusters`` picks opt_nC once per image: k-means for every k in a range on a
seeded random sample of per-pixel features, scored by the silhouette coefficient on the
same sample; the first k with the best score wins. The refinement then uses
K_eff = max(K, opt_nC) in its dynamic weight, so the continuity weight cannot run away
as clusters merge (SCF) and collapse to very few segments is resisted.
"""

from __future__ import annotations

import numpy as np


def pixel_features(image: np.ndarray, kind: str, response: np.ndarray | None = None) -> np.ndarray:
    """(H*W, D) float32 features per pixel: ``"lab"`` or ``"rgb"`` colour, or ``"response"``.

    ``response`` is a (C, H, W) array, required for ``kind="response"``.
    """
    if kind == "lab":
        from skimage.color import rgb2lab

        return rgb2lab(image).reshape(-1, 3).astype(np.float32)
    if kind == "rgb":
        return (image.reshape(-1, 3) / 255.0).astype(np.float32)
    if kind == "response":
        if response is None:
            raise ValueError("silhouette features 'response' need the initial response map")
        return np.ascontiguousarray(response.reshape(response.shape[0], -1).T, dtype=np.float32)
    raise ValueError(f"silhouette features must be 'lab', 'rgb' or 'response', got {kind!r}")


def optimal_clusters(
    features: np.ndarray,
    *,
    k_range: tuple[int, int] = (3, 26),
    samples: int = 4000,
    seed: int = 0,
    n_init: int = 3,
) -> int:
    """Number of clusters with the best silhouette score.

    Parameters
    ----------
    features : ndarray (n, d)
        Per-pixel features.
    k_range : (lo, hi)
        Inclusive range of k to try (DynaSeg's code tries 3..26).
    samples : int
        Size of the seeded random sample used for both k-means and the silhouette
        (the silhouette is O(n^2)).
    seed : int
    n_init : int
        k-means restarts per k.

    Returns
    -------
    int
        opt_nC; ``lo`` when the sample has fewer distinct points than ``lo + 1``.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    lo, hi = k_range
    rng = np.random.default_rng(seed)
    x = (
        features
        if len(features) <= samples
        else features[rng.choice(len(features), samples, replace=False)]
    )
    distinct = len(np.unique(x, axis=0))
    best_k, best_score = lo, -np.inf
    for k in range(lo, min(hi, distinct - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
        if len(np.unique(labels)) < 2:
            continue
        score = silhouette_score(x, labels)
        if score > best_score:  # strict: the first k with the best score wins
            best_k, best_score = k, score
    return best_k
