"""Frozen backbones for SmooSeg: images in, dense patch features out.

The protocol (:class:`Backbone`): a callable taking a ``(B, 3, H, W)`` float tensor of
**RGB values in [0, 1]** (not normalised: each backbone applies its own normalisation) and
returning ``(B, D, h, w)`` patch features, with the attributes ``dim`` (D), ``patch_size``
(the stride of the feature grid in pixels) and ``name`` (recorded in checkpoints, so a
head is never run on features of another backbone). Three kinds:

* :class:`DenseFeatureBackbone` (``"texture"``): weight-free and deterministic -- CIE-LAB
  colour, derivative-of-Gaussian and Laplacian-of-Gaussian energies of the lightness at
  three scales (texture) and the patch position, averaged over 8x8 patches;
* :class:`~dynaguide.smooseg.vit_backbone.HFViTBackbone`: a DINO / DINOv2 / ViT from a local
  Hugging Face folder (or its ONNX export, run in ONNX Runtime): the last block's output
  after the final LayerNorm, patch tokens only (class and register tokens dropped);
* :class:`CallableBackbone`: any user function, its output shape checked on every call.

:func:`load_backbone` builds one from a name, a path or a callable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = [
    "Backbone",
    "CallableBackbone",
    "DenseFeatureBackbone",
    "check_images",
    "load_backbone",
    "rgb_to_lab",
]

# sRGB (D65) -> XYZ, and the D65 white point.
_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE = (0.95047, 1.0, 1.08883)


@runtime_checkable
class Backbone(Protocol):
    """Maps ``(B, 3, H, W)`` RGB in [0, 1] to ``(B, dim, h, w)`` patch features."""

    dim: int
    patch_size: int
    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features of a batch of images."""
        ...


def check_images(images: Any, who: str) -> torch.Tensor:
    """``images`` if it is a (B, 3, H, W) floating tensor, else a TypeError/ValueError."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{who}: images must be a (B, 3, H, W) tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"{who}: images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{who}: images must be floating point RGB in [0, 1], got {images.dtype}")
    return images


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE-LAB (D65) of ``(B, 3, H, W)`` sRGB values in [0, 1]: L in [0, 100], a, b ~ [-128, 127]."""
    x = rgb.clamp(0.0, 1.0)
    lin = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(_RGB_TO_XYZ, dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)
    xyz = xyz / torch.tensor(_WHITE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    eps = (6.0 / 29.0) ** 3
    f = torch.where(
        xyz > eps, xyz.clamp_min(eps) ** (1.0 / 3.0), xyz / (3 * (6 / 29) ** 2) + 4 / 29
    )
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def _gaussian_bank(sigmas: Sequence[float]) -> torch.Tensor:
    """(3 * len(sigmas), 1, k, k) float64 kernels: d/dx, d/dy and Laplacian of a Gaussian,
    scale-normalised (sigma * first derivative, sigma^2 * Laplacian), all padded to one size."""
    radius = math.ceil(3 * max(sigmas))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernels = []
    for s in sigmas:
        g = torch.exp(-(t**2) / (2 * s * s))
        g = g / g.sum()
        dg = -t / (s * s) * g
        d2g = (t**2 / s**4 - 1 / (s * s)) * g
        gx = torch.outer(g, dg) * s
        gy = torch.outer(dg, g) * s
        log = (torch.outer(g, d2g) + torch.outer(d2g, g)) * s * s
        kernels += [gx, gy, log - log.mean()]
    return torch.stack(kernels)[:, None]


class DenseFeatureBackbone:
    """A weight-free dense feature backbone: colour, texture and position per patch.

        For each ``patch_size`` x ``patch_size`` patch (stride = patch size) the features are:
        the mean CIE-LAB colour (``(L - 50) / 100``, ``a / 100``, ``b / 100``); for each scale
        sigma the root-mean-square response of the lightness to scale-normalised
        derivative-of-Gaussian (x, y) and Laplacian-of-Gaussian filters, times
        ``texture_weight``; and the patch centre's (y, x) in [-1, 1] times
        ``position_weight``; everything times ``gain``, which brings the colour channels to about
    unit spread, the scale of a ViT's LayerNorm-ed features (with features much smaller than
    the projector's biases, the initial codes of all patches fall to one prototype).
    ``dim = 3 + 3 * len(sigmas) + 2``. Deterministic, no weights.

        Parameters
        ----------
        patch_size : int
            Stride of the feature grid (8, like DINO ViT-S/8).
        sigmas : sequence of float
            Filter scales in pixels.
        texture_weight, position_weight : float
            Multipliers of the texture and position channels.
        gain : float
            Multiplier of all channels.
    """

    def __init__(
        self,
        patch_size: int = 8,
        sigmas: Sequence[float] = (1.0, 2.0, 4.0),
        texture_weight: float = 1.0,
        position_weight: float = 0.1,
        gain: float = 5.0,
    ) -> None:
        if (
            isinstance(patch_size, bool)
            or not isinstance(patch_size, int)
            or not 1 <= patch_size <= 64
        ):
            raise ValueError(f"patch_size must be an int in [1, 64], got {patch_size!r}")
        sig = [float(s) for s in sigmas]
        if not sig or any(not (0.3 <= s <= 16) for s in sig):
            raise ValueError(
                f"sigmas must be a non-empty list of scales in [0.3, 16], got {sigmas!r}"
            )
        weights = (
            ("texture_weight", texture_weight),
            ("position_weight", position_weight),
            ("gain", gain),
        )
        for label, v in weights:
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{label} must be a finite number >= 0, got {v!r}")
        self.patch_size = patch_size
        self.sigmas = tuple(sig)
        self.texture_weight = float(texture_weight)
        self.position_weight = float(position_weight)
        self.gain = float(gain)
        self.dim = 3 + 3 * len(sig) + 2
        self.name = (
            f"texture(p={patch_size},sigmas={list(self.sigmas)},tw={self.texture_weight:g},"
            f"pw={self.position_weight:g},gain={self.gain:g})"
        )
        self._bank = _gaussian_bank(self.sigmas)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, dim, H // p, W // p) float32 features."""
        x = check_images(images, "texture backbone").float()
        p = self.patch_size
        b, _, h, w = x.shape
        if h < p or w < p:
            raise ValueError(
                f"texture backbone: images of {h}x{w} are smaller than one {p}x{p} patch"
            )
        with torch.no_grad():
            lab = rgb_to_lab(x)
            colour = torch.stack(
                [(lab[:, 0] - 50.0) / 100.0, lab[:, 1] / 100.0, lab[:, 2] / 100.0], 1
            )
            bank = self._bank.to(device=x.device, dtype=x.dtype)
            pad = bank.shape[-1] // 2
            light = F.pad(lab[:, :1] / 100.0, (pad, pad, pad, pad), mode="replicate")
            energy = F.conv2d(light, bank) ** 2
            texture = F.avg_pool2d(energy, p, p).clamp_min(0).sqrt() * self.texture_weight
            colour = F.avg_pool2d(colour, p, p)
            gh, gw = colour.shape[-2:]
            ys = (torch.arange(gh, dtype=x.dtype, device=x.device) + 0.5) / gh * 2 - 1
            xs = (torch.arange(gw, dtype=x.dtype, device=x.device) + 0.5) / gw * 2 - 1
            pos = torch.stack(torch.meshgrid(ys, xs, indexing="ij")) * self.position_weight
            out = torch.cat([colour, texture, pos.expand(b, -1, -1, -1)], 1)
            return (out * self.gain).contiguous()


class CallableBackbone:
    """Wrap a user function ``images (B, 3, H, W) RGB in [0, 1] -> (B, dim, h, w)``.

    Every call checks the output: a 4-D floating tensor with the batch size of the input,
    ``dim`` channels and a grid of ``H // patch_size`` (or its ceiling) by ``W // patch_size``.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], Any],
        *,
        dim: int,
        patch_size: int,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"backbone must be callable, got {type(fn).__name__}")
        for label, v in (("dim", dim), ("patch_size", patch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"a callable backbone needs {label} as a positive int, got {v!r}")
        self.fn, self.dim, self.patch_size = fn, dim, patch_size
        self.name = (
            name or getattr(fn, "name", None) or getattr(fn, "__qualname__", type(fn).__name__)
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The function's features, checked."""
        x = check_images(images, f"backbone {self.name!r}")
        out = self.fn(x)
        b, _, h, w = x.shape
        p = self.patch_size
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.ndim != 4:
            raise ValueError(
                f"backbone {self.name!r} must return a (B, {self.dim}, h, w) floating tensor, got "
                f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))} {getattr(out, 'dtype', '')}"
            )
        ok_h, ok_w = (h // p, -(-h // p)), (w // p, -(-w // p))
        if (
            out.shape[0] != b
            or out.shape[1] != self.dim
            or out.shape[2] not in ok_h
            or out.shape[3] not in ok_w
        ):
            raise ValueError(
                f"backbone {self.name!r} returned features of shape {tuple(out.shape)} for images of "
                f"shape {tuple(x.shape)}; expected ({b}, {self.dim}, {h // p}, {w // p}) "
                f"(dim={self.dim}, patch_size={p})"
            )
        return out.detach().float()


def load_backbone(
    spec: Any, *, device: str = "auto", backend: str = "torch", **options: Any
) -> Backbone:
    """A backbone from ``spec``.

    ``spec`` may be ``"texture"`` (:class:`DenseFeatureBackbone`, ``options`` are its
    parameters), a path to a Hugging Face folder or a vit-features ``.onnx`` export
    (:class:`~dynaguide.smooseg.vit_backbone.HFViTBackbone`), an object already following
    :class:`Backbone`, or a plain
    callable (wrapped in :class:`CallableBackbone`; pass ``dim`` and ``patch_size``).

    Raises
    ------
    FileNotFoundError
        A path that does not exist.
    TypeError, ValueError
        Anything else that is not a backbone, naming it.
    """
    if isinstance(spec, str) and spec.lower() == "texture":
        return DenseFeatureBackbone(**options)
    if isinstance(spec, (str, os.PathLike)):
        from dynaguide.smooseg.vit_backbone import HFViTBackbone

        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(
                f"backbone {str(spec)!r} is neither 'texture' nor an existing checkpoint folder "
                "or .onnx file"
            )
        if path.is_file() and path.suffix.lower() == ".onnx":
            backend = "onnxruntime"
        return HFViTBackbone(path, backend=backend, device=device, **options)
    if all(hasattr(spec, a) for a in ("dim", "patch_size", "name")) and callable(spec):
        return spec
    if callable(spec):
        return CallableBackbone(spec, **options)
    raise TypeError(
        f"backbone must be 'texture', a checkpoint path or a callable, got {type(spec).__name__}"
    )
