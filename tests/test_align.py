"""Guide-label alignment: Hungarian on overlaps vs brute force, and the reference mapping."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from dynaguide.guidance.align import IGNORE_INDEX, GuideAligner


def _brute_force_best(guide: np.ndarray, labels: np.ndarray, n_channels: int) -> int:
    gs = np.unique(guide[guide >= 0])
    best = -1
    for perm in itertools.permutations(range(n_channels), len(gs)):
        score = sum(
            int(np.sum((guide == g) & (labels == c))) for g, c in zip(gs, perm, strict=False)
        )
        best = max(best, score)
    return best


def test_overlap_alignment_is_optimal():
    rng = np.random.default_rng(0)
    for _ in range(5):
        guide = rng.integers(-1, 3, size=(6, 7)) * 10  # values -10, 0, 10, 20: negative = unguided
        labels = rng.integers(0, 4, size=(6, 7))
        al = GuideAligner(torch.from_numpy(guide), n_channels=4)
        target = al.target(torch.from_numpy(labels)).numpy()
        assert np.all(target[guide < 0] == IGNORE_INDEX)
        achieved = int(np.sum((target == labels) & (guide >= 0)))
        assert achieved == _brute_force_best(np.where(guide < 0, -1, guide), labels, 4)
        # one guide class -> one channel, distinct channels
        pairs = {(g, t) for g, t in zip(guide[guide >= 0], target[guide >= 0], strict=False)}
        assert len({g for g, _ in pairs}) == len(pairs) == len({t for _, t in pairs})


def test_overlap_mapping_recomputed_only_when_live_set_changes():
    guide = torch.tensor([[0, 0, 1, 1]])
    al = GuideAligner(guide, n_channels=5)
    t1 = al.target(torch.tensor([[3, 3, 4, 4]]))
    assert t1.tolist() == [[3, 3, 4, 4]]
    # same live set {3, 4}, different pixels: the mapping is kept
    assert al.target(torch.tensor([[4, 4, 3, 3]])).tolist() == [[3, 3, 4, 4]]
    # refresh=False never looks at the labels
    assert al.target(torch.tensor([[0, 0, 1, 1]]), refresh=False).tolist() == [[3, 3, 4, 4]]
    # live set changes: recomputed
    assert al.target(torch.tensor([[1, 1, 2, 2]])).tolist() == [[1, 1, 2, 2]]


def test_more_guide_classes_than_channels():
    guide = torch.arange(6).reshape(2, 3)
    al = GuideAligner(guide, n_channels=4)
    t = al.target(torch.tensor([[0, 1, 2], [3, 0, 1]]))
    assert (t == IGNORE_INDEX).sum() == 2
    assert len(set(t[t >= 0].tolist())) == 4


def test_reference_mapping_sorted_modulo():
    guide = torch.tensor([[5, 7, 9, 11]])  # U_S = [5, 7, 9, 11]
    labels = torch.tensor([[8, 2, 2, 8]])  # U_C = [2, 8]
    al = GuideAligner(guide, n_channels=10, mode="reference")
    assert al.target(labels).tolist() == [[2, 8, 2, 8]]
    # rebuilt every call
    assert al.target(torch.tensor([[1, 1, 1, 1]])).tolist() == [[1, 1, 1, 1]]


def test_no_guidance_pixels():
    al = GuideAligner(torch.full((3, 3), -1), n_channels=4)
    assert (al.target(torch.zeros(3, 3, dtype=torch.long)) == IGNORE_INDEX).all()


def test_vote_target_is_each_regions_majority_label():
    rng = np.random.default_rng(5)
    for _ in range(5):
        guide = rng.integers(-1, 6, size=(9, 8)) * 3  # negative = unguided
        labels = rng.integers(0, 4, size=(9, 8))
        al = GuideAligner(torch.from_numpy(guide), n_channels=4, mode="vote")
        target = al.target(torch.from_numpy(labels)).numpy()
        assert np.all(target[guide < 0] == IGNORE_INDEX)
        for g in np.unique(guide[guide >= 0]):
            inside = guide == g
            counts = np.bincount(labels[inside], minlength=4)
            assert np.all(target[inside] == int(np.argmax(counts)))  # ties: smallest label
        # recomputed from the labels every call, even without refresh
        again = al.target(torch.from_numpy((labels + 1) % 4), refresh=False).numpy()
        for g in np.unique(guide[guide >= 0]):
            inside = guide == g
            counts = np.bincount((labels[inside] + 1) % 4, minlength=4)
            assert np.all(again[inside] == int(np.argmax(counts)))


def test_vote_lets_regions_share_a_label():
    guide = torch.tensor([[0, 0, 1, 1, 2, 2]])
    labels = torch.tensor([[3, 3, 3, 0, 0, 0]])
    al = GuideAligner(guide, n_channels=4, mode="vote")
    assert al.target(labels).tolist() == [[3, 3, 0, 0, 0, 0]]
