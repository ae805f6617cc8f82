"""Refinement configuration and the named presets.

A :class:`RefineConfig` is a frozen dataclass holding every knob of the per-image
optimisation (SPEC §1-§3). Presets are built fresh on every call, so a caller can never
mutate a shared instance (one of the authors' code's bugs, SPEC §7.17). Derive variants
with :func:`dataclasses.replace` or :meth:`RefineConfig.replace`.

The default presets carry the semantics SPEC recommends; the ``*-reference`` presets
reproduce the authors' released code where it differs (shared-conv skip with
``n_conv=3``, sorted-id modulo guide mapping, final pass with BN in eval mode, no
stopping rule except the code's own, no silhouette phase).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

WeightMode = Literal["constant", "fsf", "scf", "dynaguide"]
SkipMode = Literal["none", "separate", "shared"]
Alignment = Literal["overlap", "reference"]
FinalPass = Literal["last", "train", "eval"]
SilhouetteMode = Literal["off", "ssp", "reference"]
InputFeatures = Literal["rgb", "rgb+xy", "rgb+lab", "rgb+lab+xy"]
Upsample = Literal["nearest", "bilinear"]
MergeWeight = Literal["colour", "boundary"]


@dataclass(frozen=True)
class RefineConfig:
    """Every setting of one per-image refinement.

    Network (SPEC §1.1, §3.1)
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
    Silhouette phase (SPEC §2.3)
        ``silhouette``: ``"off"``, ``"ssp"`` (recommended semantics: opt_nC from k-means +
        silhouette on a seeded sample of ``silhouette_samples`` pixels of
        ``silhouette_features``, k in ``silhouette_k``; K_eff = max(K, opt_nC) in the
        weight; with ``silhouette_stop`` stop when K < opt_nC instead of K <= min_labels)
        or ``"reference"`` (K_eff in the weight only).
    Guidance (SPEC §3.3)
        ``alignment``: ``"overlap"`` (Hungarian on the overlap matrix, recomputed when the
        set of live CNN labels changes) or ``"reference"`` (sorted-id modulo every
        iteration).
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
        ``merge_threshold`` (see :mod:`dynaguide.postprocess`).
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

    def __post_init__(self) -> None:
        """Validate every field with a message naming it."""
        _positive_int("n_channels", self.n_channels, minimum=2)
        _positive_int("n_conv", self.n_conv, minimum=1)
        _positive_int("max_iter", self.max_iter, minimum=0)
        _positive_int("check_every", self.check_every, minimum=1)
        _positive_int("convergence_window", self.convergence_window, minimum=1)
        _positive_int("silhouette_samples", self.silhouette_samples, minimum=10)
        if not isinstance(self.min_labels, int) or self.min_labels < 0:
            raise ValueError(f"min_labels must be an int >= 0, got {self.min_labels!r}")
        _choice("skip", self.skip, ("none", "separate", "shared"))
        _choice("penalty", self.penalty, ("l1", "huber"))
        _choice("neighbors", self.neighbors, (4, 8))
        _choice("weight_mode", self.weight_mode, ("constant", "fsf", "scf", "dynaguide"))
        _choice("alignment", self.alignment, ("overlap", "reference"))
        _choice("final_pass", self.final_pass, ("last", "train", "eval"))
        _choice("silhouette", self.silhouette, ("off", "ssp", "reference"))
        _choice("silhouette_features", self.silhouette_features, ("lab", "rgb", "response"))
        _choice("input_order", self.input_order, ("bgr", "rgb"))
        for name in ("lr", "delta", "beta", "scf_mu"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        for name in (
            "momentum",
            "weight_decay",
            "similarity_weight",
            "mu",
            "guidance_weight",
            "convergence_tol",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        lo, hi = self.silhouette_k
        if not (2 <= lo <= hi):
            raise ValueError(
                f"silhouette_k must be (lo, hi) with 2 <= lo <= hi, got {self.silhouette_k!r}"
            )
        for name in ("max_pixels", "work_pixels"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 4
            ):
                raise ValueError(f"{name} must be None or an int >= 4, got {value!r}")
        _choice("upsample", self.upsample, ("nearest", "bilinear"))
        _choice("input_features", self.input_features, ("rgb", "rgb+xy", "rgb+lab", "rgb+lab+xy"))
        _choice("connectivity", self.connectivity, (0, 4, 8))
        _choice("merge", self.merge, (None, "colour", "boundary"))
        _positive_int("guidance_anneal", self.guidance_anneal, minimum=0)
        _positive_int("guide_margin", self.guide_margin, minimum=0)
        for name in ("min_area", "merge_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.time_budget is not None and (
            isinstance(self.time_budget, bool)
            or not isinstance(self.time_budget, (int, float))
            or not self.time_budget > 0
        ):
            raise ValueError(f"time_budget must be None or seconds > 0, got {self.time_budget!r}")
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


def _positive_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


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
    # network at a 0.05 MP working size, guided by Felzenszwalb at that size, 60 iterations
    # (about 3 s for a 481x321 photo on 2 cores), then the same region merging.
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
    # The authors' released code, where it differs (SPEC §1.4, §2.1, §3.1-§3.5).
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
