"""Refinement configuration and the named presets.

(Over 400 lines: the one dataclass of every refinement knob, its validation and the presets
that set those knobs, kept in one place so that a field, its check and its defaults cannot
drift apart.)

A :class:`RefineConfig` is a frozen dataclass holding every knob of the per-image
optimisation of DFC (Kim, Kanezaki and Tanaka, IEEE TIP 2020), DynaSeg (Guermazi,
Ksantini and Khan, IVC 2024, arXiv 2405.05477) and DynaGuide (the same authors, IVC 2025,
arXiv 2602.13020). Presets are built fresh on every call, so a caller can never mutate a
shared instance (the authors' code mutates a module-level config). Derive variants
with :func:`dataclasses.replace` or :meth:`RefineConfig.replace`.

The default presets carry the semantics dynaguide recommends (overlap alignment of the
guide, a convergence stop, the silhouette phase as described); the ``*-reference`` presets
reproduce the authors' released code where it differs (shared-conv skip with
``n_conv=3``, sorted-id modulo guide mapping, final pass with BN in eval mode, no
stopping rule except the code's own, no silhouette phase).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

WeightMode = Literal["constant", "fsf", "scf", "dynaguide"]
SkipMode = Literal["none", "separate", "shared"]
Alignment = Literal["overlap", "reference", "vote"]
FinalPass = Literal["last", "train", "eval"]
SilhouetteMode = Literal["off", "ssp", "reference"]
InputFeatures = Literal["rgb", "rgb+xy", "rgb+lab", "rgb+lab+xy"]
Upsample = Literal["nearest", "bilinear"]
MergeWeight = Literal["colour", "boundary"]


@dataclass(frozen=True)
class RefineConfig:
    """Every setting of one per-image refinement.

    Network (DFC; DynaGuide's skip branch)
        ``n_channels`` response channels q (= p); ``n_conv`` 3x3 conv blocks
        (conv -> ReLU -> BN); ``skip``: ``"none"`` (DFC), ``"separate"`` (an extra 3->q
        3x3 conv added before the 1x1 classifier: the paper's 106.4K parameters at
        ``n_conv=2``), ``"shared"`` (the released code: the first conv's raw output
        reused as skip).
    Optimiser
        SGD with ``lr``, ``momentum``, ``weight_decay``.
    Loss
        ``similarity_weight`` * CE + w(K) * continuity + ``guidance_weight`` * guidance,
        where continuity uses ``penalty`` (``"l1"``/``"huber"``, Huber threshold
        ``delta``) over ``neighbors`` (4/8) and w(K) follows ``weight_mode``:
        ``"constant"`` -> ``mu``; ``"fsf"`` / ``"dynaguide"`` -> K / ``beta``;
        ``"scf"`` -> ``scf_mu`` / K. K is the number of distinct argmax labels of the
        current iteration (K_eff = max(K, opt_nC) during the silhouette phase).
    Stopping
        at most ``max_iter`` iterations (0: no refinement at all, the guide's labels go
        straight to the post-processing); stop once K <= ``min_labels`` (0 disables);
        convergence: stop when the fraction of pixels whose label changed over the last
        ``convergence_window`` iterations is below ``convergence_tol`` (0 disables).
        ``check_every`` iterations between host checks on CUDA (CPU checks every one).
    Silhouette phase (DynaSeg's silhouette-score phase)
        ``silhouette``: ``"off"``, ``"ssp"`` (recommended semantics: opt_nC from k-means +
        silhouette on a seeded sample of ``silhouette_samples`` pixels of
        ``silhouette_features``, k in ``silhouette_k``; K_eff = max(K, opt_nC) in the
        weight; with ``silhouette_stop`` stop when K < opt_nC instead of K <= min_labels)
        or ``"reference"`` (K_eff in the weight only).
    Guidance (how DynaGuide's pseudo-labels reach the CNN's channels)
        ``alignment``: ``"overlap"`` (Hungarian on the overlap matrix, recomputed when the
        set of live CNN labels changes), ``"reference"`` (sorted-id modulo every
        iteration) or ``"vote"`` (the guide's regions as superpixels: each pixel's target
        is the most frequent current label of its region, the majority vote of Kim et al.,
        ICASSP 2018, as a boundary prior; regions may share a label).
    Output
        ``final_pass``: ``"last"`` (labels of the last training forward, DFC's
        ``visualize=1``), ``"train"`` (one more forward with BN batch statistics) or
        ``"eval"`` (one more forward with BN running statistics, DynaGuide's code).
    Size policy and multi-scale refinement
        Images with more than ``max_pixels`` pixels are refined at a downscaled size
        (area-preserving factor, bilinear); ``None`` disables the limit. ``work_pixels``
        is a second, working-size target: the network is trained on the image shrunk to
        about that many pixels (None: no shrinking beyond ``max_pixels``). ``upsample``
        carries the result back to full size: ``"nearest"`` resizes the labels,
        ``"bilinear"`` resizes the network's response map (the class scores) and takes
        the argmax at full resolution, so boundaries are placed between full-size pixels.
        ``time_budget`` (seconds, None: none) stops the loop at the first check past it.
    Guidance schedule
        ``guidance_anneal``: the guidance weight decays linearly from ``guidance_weight``
        to 0 over that many iterations (0: constant), so the network may correct the guide
        once it has learnt from it. ``guide_margin``: guide pixels within that many pixels
        of a guide boundary are not guided (0: all guided).
    Input
        ``input_features``: the network sees RGB (in ``input_order``), optionally CIE-LAB
        colour (scaled to about [0, 1]) and the pixel coordinates (in [0, 1]).
    Post-processing (run on the full-size labels)
        ``connectivity`` 4/8 splits the labels into connected regions (0: labels stay
        colour clusters, the papers' output); ``min_area``: regions smaller than this
        (a fraction of the image when < 1, else pixels) join their closest-colour
        neighbour; ``merge`` (``"colour"`` / ``"boundary"``, None: off) merges adjacent
        regions over the region adjacency graph until the smallest weight exceeds
        ``merge_threshold`` (see :mod:`dynaguide.postprocess`). ``crf_iterations`` > 0
        first refines the labels with that many mean-field iterations of a dense CRF
        (:mod:`dynaguide.crf`, SmooSeg's kernel settings) on a one-hot unary from the labels.
    """

    name: str = "custom"
    # network
    n_channels: int = 100
    n_conv: int = 2
    skip: SkipMode = "none"
    # optimiser
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    # loss
    similarity_weight: float = 1.0
    penalty: Literal["l1", "huber"] = "l1"
    delta: float = 1.0
    neighbors: int = 4
    weight_mode: WeightMode = "constant"
    mu: float = 1.0
    beta: float = 15.0
    scf_mu: float = 50.0
    guidance_weight: float = 1.0
    alignment: Alignment = "overlap"
    # stopping
    max_iter: int = 1000
    min_labels: int = 3
    convergence_window: int = 20
    convergence_tol: float = 0.0
    check_every: int = 8
    # silhouette phase
    silhouette: SilhouetteMode = "off"
    silhouette_k: tuple[int, int] = (3, 26)
    silhouette_samples: int = 4000
    silhouette_features: Literal["lab", "rgb", "response"] = "lab"
    silhouette_stop: bool = False
    # output, input
    final_pass: FinalPass = "last"
    input_order: Literal["bgr", "rgb"] = "bgr"
    max_pixels: int | None = 4_000_000
    work_pixels: int | None = None
    upsample: Upsample = "nearest"
    time_budget: float | None = None
    default_guidance: str | None = None
    default_guidance_options: dict[str, Any] = field(default_factory=dict, compare=False)
    # guidance schedule, input features
    guidance_anneal: int = 0
    guide_margin: int = 0
    input_features: InputFeatures = "rgb"
    # post-processing
    connectivity: int = 0
    min_area: float = 0.0
    merge: MergeWeight | None = None
    merge_threshold: float = 0.0
    crf_iterations: int = 0

    def __post_init__(self) -> None:
        """Validate every field with a message naming it (numpy scalars become Python ones)."""
        for name, lo, hi in (
            ("n_channels", 2, 2048),
            ("n_conv", 1, 32),
            ("max_iter", 0, 10_000_000),
            ("check_every", 1, 1_000_000),
            ("convergence_window", 1, 1_000_000),
            ("silhouette_samples", 10, 100_000),
            ("min_labels", 0, 1_000_000),
            ("crf_iterations", 0, 1000),
        ):
            _positive_int(name, getattr(self, name), minimum=lo, maximum=hi)
            object.__setattr__(self, name, int(getattr(self, name)))
        _choice("skip", self.skip, ("none", "separate", "shared"))
        _choice("penalty", self.penalty, ("l1", "huber"))
        if isinstance(self.neighbors, bool):
            raise ValueError(f"neighbors must be 4 or 8, got {self.neighbors!r}")
        _choice("neighbors", self.neighbors, (4, 8))
        object.__setattr__(self, "neighbors", int(self.neighbors))
        _choice("weight_mode", self.weight_mode, ("constant", "fsf", "scf", "dynaguide"))
        _choice("alignment", self.alignment, ("overlap", "reference", "vote"))
        _choice("final_pass", self.final_pass, ("last", "train", "eval"))
        _choice("silhouette", self.silhouette, ("off", "ssp", "reference"))
        _choice("silhouette_features", self.silhouette_features, ("lab", "rgb", "response"))
        _choice("input_order", self.input_order, ("bgr", "rgb"))
        for name, lo, hi, open_lo, open_hi in (
            ("lr", 0.0, 1e6, True, False),
            ("delta", 0.0, 1e6, True, False),
            ("beta", 0.0, 1e9, True, False),
            ("scf_mu", 0.0, 1e9, True, False),
            ("momentum", 0.0, 1.0, False, True),
            ("weight_decay", 0.0, 1e6, False, False),
            ("similarity_weight", 0.0, 1e9, False, False),
            ("mu", 0.0, 1e9, False, False),
            ("guidance_weight", 0.0, 1e9, False, False),
            ("convergence_tol", 0.0, 1.0, False, False),
        ):
            value = getattr(self, name)
            ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            ok = ok and math.isfinite(value) and (value > lo if open_lo else value >= lo)
            if not (ok and (value < hi if open_hi else value <= hi)):
                interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
                raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
            object.__setattr__(self, name, float(value))
        k = self.silhouette_k
        if (
            not isinstance(k, (tuple, list))
            or len(k) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in k)
            or not (2 <= k[0] <= k[1] <= min(256, self.silhouette_samples - 1))
        ):
            raise ValueError(
                "silhouette_k must be (lo, hi) ints with 2 <= lo <= hi <= "
                f"min(256, silhouette_samples - 1), got {k!r}"
            )
        object.__setattr__(self, "silhouette_k", (int(k[0]), int(k[1])))
        if not isinstance(self.silhouette_stop, (bool, np.bool_)):
            raise ValueError(f"silhouette_stop must be a bool, got {self.silhouette_stop!r}")
        if self.max_pixels is not None:
            _positive_int("max_pixels", self.max_pixels, minimum=4, maximum=2**40)
            object.__setattr__(self, "max_pixels", int(self.max_pixels))
        if self.default_guidance is not None and not isinstance(self.default_guidance, str):
            raise ValueError(
                f"default_guidance must be None or a guide name, got {self.default_guidance!r}"
            )
        if self.work_pixels is not None:
            _positive_int("work_pixels", self.work_pixels, minimum=4, maximum=2**40)
            object.__setattr__(self, "work_pixels", int(self.work_pixels))
        _choice("upsample", self.upsample, ("nearest", "bilinear"))
        _choice("input_features", self.input_features, ("rgb", "rgb+xy", "rgb+lab", "rgb+lab+xy"))
        if isinstance(self.connectivity, (bool, np.bool_)):
            raise ValueError(f"connectivity must be 0, 4 or 8, got {self.connectivity!r}")
        _choice("connectivity", self.connectivity, (0, 4, 8))
        object.__setattr__(self, "connectivity", int(self.connectivity))
        _choice("merge", self.merge, (None, "colour", "boundary"))
        _positive_int("guidance_anneal", self.guidance_anneal, minimum=0, maximum=10_000_000)
        _positive_int("guide_margin", self.guide_margin, minimum=0, maximum=10_000)
        for name in ("guidance_anneal", "guide_margin"):
            object.__setattr__(self, name, int(getattr(self, name)))
        # min_area: a fraction below 1, else pixels; merge_threshold: LAB distances are < 400
        for name, top in (("min_area", 2.0**40), ("merge_threshold", 1e4)):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not (
                isinstance(value, numbers.Real) and math.isfinite(value) and 0 <= value <= top
            ):
                raise ValueError(f"{name} must be a finite number in [0, {top:g}], got {value!r}")
            object.__setattr__(self, name, float(value))
        options = self.default_guidance_options
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise ValueError(
                f"default_guidance_options must be a dict of option names, got {options!r}"
            )
        budget = self.time_budget
        if budget is not None and (
            isinstance(budget, (bool, np.bool_))
            or not isinstance(budget, numbers.Real)
            or not (math.isfinite(budget) and budget > 0)
        ):
            raise ValueError(f"time_budget must be None or finite seconds > 0, got {budget!r}")
        if budget is not None:
            object.__setattr__(self, "time_budget", float(budget))
        if self.connectivity == 0 and (self.min_area > 0 or self.merge is not None):
            raise ValueError(
                "min_area and merge work on connected regions: set connectivity to 4 or 8"
            )

    @property
    def in_channels(self) -> int:
        """Number of input channels the network sees (3 + 3 for LAB + 2 for coordinates)."""
        f = self.input_features
        return 3 + (3 if "lab" in f else 0) + (2 if "xy" in f else 0)

    def replace(self, **changes: Any) -> RefineConfig:
        """Return a copy with ``changes`` applied (validated); unknown names raise TypeError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(
                f"unknown RefineConfig field(s) {unknown}; known fields: {sorted(known)}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of all fields."""
        d = dataclasses.asdict(self)
        d["silhouette_k"] = list(self.silhouette_k)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefineConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(data)
        d.pop("extra", None)  # a field of dynaguide 0.1.0 that was never read
        if "silhouette_k" in d:
            d["silhouette_k"] = tuple(d["silhouette_k"])
        return cls(**d)


def _positive_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> None:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if not ok or value < minimum or (maximum is not None and value > maximum):
        top = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be an int >= {minimum}{top}, got {value!r}")


def _choice(name: str, value: Any, options: tuple[Any, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def _build_presets() -> dict[str, RefineConfig]:
    dfc = RefineConfig(
        name="dfc",
        n_conv=2,
        skip="none",
        penalty="l1",
        neighbors=4,
        weight_mode="constant",
        mu=1.0,
        convergence_tol=0.001,
        final_pass="last",
    )
    scf = dataclasses.replace(dfc, name="dynaseg-scf", weight_mode="scf", silhouette="ssp")
    fsf = dataclasses.replace(dfc, name="dynaseg-fsf", weight_mode="fsf", silhouette="ssp")
    dyn = RefineConfig(
        name="dynaguide",
        n_conv=2,
        skip="separate",
        penalty="huber",
        delta=1.0,
        neighbors=8,
        weight_mode="dynaguide",
        beta=15.0,
        guidance_weight=1.0,
        alignment="overlap",
        convergence_tol=0.001,
        final_pass="last",
        default_guidance="kmeans",
    )
    # The default, chosen by measured quality per second on BSDS500 (benchmarks/NOTES.md):
    # Felzenszwalb-Huttenlocher over-segmentation, regions under 0.2% of the image merged
    # into their closest-colour neighbour, then region-graph merging by mean LAB colour up
    # to delta-E 10. No network: on BSDS500 val no refinement beat it (see README).
    regions = RefineConfig(
        name="felzenszwalb-merge",
        max_iter=0,
        max_pixels=4_000_000,
        default_guidance="felzenszwalb",
        default_guidance_options={"scale": 300.0, "sigma": 0.8, "min_size": 20},
        connectivity=8,
        min_area=0.002,
        merge="colour",
        merge_threshold=10.0,
    )
    # The best refinement pipeline measured on CPU: the DynaGuide objective with a 32-channel
    # network at a 0.05 MP working size, guided by Felzenszwalb at that size, 60 iterations,
    # then the same region merging (2.5-2.8 s end to end for a 481x321 val photo, 2 cores).
    fast = dataclasses.replace(
        dyn,
        name="dynaguide-fast",
        n_channels=32,
        max_iter=60,
        convergence_tol=0.01,
        convergence_window=10,
        work_pixels=50_000,
        default_guidance="felzenszwalb",
        default_guidance_options={"scale": 300.0, "sigma": 0.8, "min_size": 250},
        connectivity=8,
        min_area=0.005,
        merge="colour",
        merge_threshold=10.0,
    )
    presets = {p.name: p for p in (regions, fast, dfc, scf, fsf, dyn)}
    # The authors' released code, where it differs: no convergence stop, no silhouette phase
    # in DynaSeg's BSDS path, and DynaGuide's shared-conv skip, modulo mapping and eval pass.
    presets["dfc-reference"] = dataclasses.replace(dfc, name="dfc-reference", convergence_tol=0.0)
    presets["dynaseg-scf-reference"] = dataclasses.replace(
        scf, name="dynaseg-scf-reference", convergence_tol=0.0, silhouette="off"
    )
    presets["dynaseg-fsf-reference"] = dataclasses.replace(
        fsf, name="dynaseg-fsf-reference", convergence_tol=0.0, silhouette="off"
    )
    presets["dynaguide-reference"] = dataclasses.replace(
        dyn,
        name="dynaguide-reference",
        n_conv=3,
        skip="shared",
        alignment="reference",
        final_pass="eval",
        min_labels=0,
        convergence_tol=0.0,
    )
    return presets


#: The preset of ``dynaguide.segment`` and the CLI when none is named.
DEFAULT_PRESET = "felzenszwalb-merge"


def presets() -> dict[str, RefineConfig]:
    """All named presets, freshly built (mutating the result affects nobody)."""
    return _build_presets()


def get_preset(name: str | RefineConfig) -> RefineConfig:
    """The preset called ``name`` (case-insensitive); a RefineConfig is returned as is.

    Raises
    ------
    KeyError
        With the list of known presets.
    """
    if isinstance(name, RefineConfig):
        return name
    table = _build_presets()
    key = str(name).lower()
    if key not in table:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(table)}")
    return table[key]
