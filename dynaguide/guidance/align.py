"""Alignment of guide labels to the CNN's response channels.

DynaGuide's released code pairs the i-th sorted guide id with the i-th live channel
(modulo their count), which ignores which pixels agree; the default here matches them by
overlap instead.

``overlap`` (default): each guide class is sent to a distinct CNN channel by a Hungarian
assignment that maximises the number of pixels on which the guide class and the
channel's argmax region agree. The overlap matrix is one ``bincount`` on the device; only
the small (G, C) matrix travels to the host for the assignment, and only when the set of
live CNN labels has changed since the last alignment. Guide classes beyond the number of
channels, and negative guide labels, get ``ignore_index``.

``reference``: the released code's mapping, rebuilt every iteration: the i-th smallest
guide value goes to the (i mod |U_C|)-th smallest live CNN label.

``vote``: the guide's regions are superpixels and each region's target is the most frequent
current CNN label inside it (ties: the smallest label), recomputed every iteration on the
device without a host synchronisation. Several regions may share a channel: the guide fixes
where boundaries may be, the network decides which regions merge (the superpixel
refinement of Kim et al., "Unsupervised image segmentation by backpropagation", ICASSP 2018).
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -1


class GuideAligner:
    """Maps a fixed guide label map to per-pixel CNN channel targets.

    Parameters
    ----------
    guide_labels : Tensor (H, W), integer
        Pseudo-labels on the refinement grid, any values; negative = no guidance.
    n_channels : int
        Number of CNN response channels C.
    mode : {"overlap", "reference", "vote"}
    """

    def __init__(self, guide_labels: torch.Tensor, n_channels: int, mode: str = "overlap"):
        if mode not in ("overlap", "reference", "vote"):
            raise ValueError(
                f"alignment mode must be 'overlap', 'reference' or 'vote', got {mode!r}"
            )
        if guide_labels.dim() != 2:
            raise ValueError(f"guide labels must be (H, W), got shape {tuple(guide_labels.shape)}")
        self.mode = mode
        self.n_channels = n_channels
        g = guide_labels.long()
        valid = g >= 0
        values = torch.unique(g[valid]) if bool(valid.any()) else g.new_empty(0)
        # Compact guide ids 0..G-1 in increasing order of the original value; -1 where invalid.
        compact = torch.searchsorted(values, g.clamp_min(0))
        self.guide = torch.where(valid, compact, torch.full_like(compact, IGNORE_INDEX))
        self.n_guide = int(values.numel())
        flat_valid = valid.flatten()
        # Positions of the guided pixels, once (a boolean mask would cost a nonzero per call),
        # None when every pixel is guided.
        self._valid_idx = None if bool(flat_valid.all()) else flat_valid.nonzero().flatten()
        flat_guide = self.guide.flatten()
        self._flat_guide = flat_guide if self._valid_idx is None else flat_guide[self._valid_idx]
        # guide ids with the unguided pixels sent to an extra last slot of the mapping
        self._guide_slot = torch.where(valid, self.guide, torch.full_like(self.guide, self.n_guide))
        self._live: torch.Tensor | None = None
        self._mapping: torch.Tensor | None = None
        self._target: torch.Tensor | None = None

    def target(self, labels: torch.Tensor, *, refresh: bool = True) -> torch.Tensor:
        """Per-pixel target channels (H, W) int64 (``IGNORE_INDEX`` where unguided).

        ``labels`` are the current argmax labels (H, W). With ``refresh=False`` the
        previous overlap mapping is reused without looking at ``labels`` (no host
        synchronisation); the reference mode always rebuilds its mapping.
        """
        if self.n_guide == 0:
            return self.guide
        if self.mode == "reference":
            return self._reference_target(labels)
        if self.mode == "vote":
            return self._vote_target(labels)
        if self._target is not None and not refresh:
            return self._target
        live = torch.bincount(labels.flatten(), minlength=self.n_channels) > 0
        if self._target is not None and self._live is not None and torch.equal(live, self._live):
            return self._target
        self._live = live
        self._mapping = self._hungarian(labels)
        return self._store(self._mapping)

    def _overlap(self, labels: torch.Tensor) -> torch.Tensor:
        """(G, C) pixel counts of each guide class against each current CNN label."""
        c = self.n_channels
        flat = labels.flatten()
        if self._valid_idx is not None:
            flat = flat.index_select(0, self._valid_idx)
        counts = torch.bincount(self._flat_guide * c + flat, minlength=self.n_guide * c)
        return counts.reshape(self.n_guide, c)

    def _store(self, mapping: torch.Tensor) -> torch.Tensor:
        """Per-pixel targets from a guide-class -> channel ``mapping``, kept in one buffer."""
        slots = torch.cat([mapping, mapping.new_full((1,), IGNORE_INDEX)])
        target = slots[self._guide_slot]
        if self._target is None:
            self._target = target
        else:  # in place: a captured CUDA graph keeps reading the same buffer
            self._target.copy_(target)
        return self._target

    def _hungarian(self, labels: torch.Tensor) -> torch.Tensor:
        overlap = self._overlap(labels).cpu().numpy()
        from scipy.optimize import linear_sum_assignment  # ~0.5 s to import: on first use

        rows, cols = linear_sum_assignment(overlap, maximize=True)
        mapping = np.full(self.n_guide, IGNORE_INDEX, dtype=np.int64)
        mapping[rows] = cols
        return torch.from_numpy(mapping).to(labels.device)

    def _reference_target(self, labels: torch.Tensor) -> torch.Tensor:
        live = torch.zeros(self.n_channels, dtype=torch.bool, device=labels.device)
        live[labels.flatten()] = True
        live_ids = live.nonzero().flatten()
        mapping = live_ids[torch.arange(self.n_guide, device=labels.device) % live_ids.numel()]
        mapped = mapping[self.guide.clamp_min(0)]
        return torch.where(self.guide >= 0, mapped, torch.full_like(mapped, IGNORE_INDEX))

    def _vote_target(self, labels: torch.Tensor) -> torch.Tensor:
        winner = self._overlap(labels).argmax(dim=1)  # first maximum: the smallest label
        return self._store(winner)
