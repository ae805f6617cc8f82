"""ONNX export of a trained per-image refinement network.

The checkpoint is a ``.pt`` file holding ``{"config": RefineConfig.to_dict(), "state_dict":
model.state_dict()}``; the network is rebuilt with :func:`dynaguide.model.build_model` and
exported as ``image (1, 3, H, W) float -> response (1, C, H, W)`` with dynamic H and W.

BatchNorm: the refinement trains with the batch statistics of the single image, so the
labels it reports come from batch statistics (``final_pass="last"`` / ``"train"``) unless
the config asks for the running statistics (``final_pass="eval"``). ``bn="auto"`` follows
the config; ``bn="batch"`` exports an explicit per-image normalisation (mean and biased
variance over the image, as BatchNorm does in training), ``bn="eval"`` the running statistics.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from dynaguide.export.onnx_model import (
    METADATA_PREFIX,
    ExportReport,
    export_onnx,
    verify_image_model,
)
from torch import nn

from dynaguide.errors import ModelFileError, first_line

__all__ = ["BatchStatNorm", "export_refine_net", "load_refine_checkpoint"]

_BN_MODES = ("auto", "batch", "eval")


class BatchStatNorm(nn.Module):
    """BatchNorm2d with the statistics of the input itself (training-mode normalisation).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with mean and biased variance
    over the batch and spatial axes, written with elementary ops so that it exports to
    ONNX; the running statistics are not used or updated.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.eps = float(bn.eps)
        self.weight = nn.Parameter(bn.weight.detach().clone()) if bn.affine else None
        self.bias = nn.Parameter(bn.bias.detach().clone()) if bn.affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (N, C, H, W) with its own per-channel statistics."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=(0, 2, 3), keepdim=True)
        y = centred / torch.sqrt(var + self.eps)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, BatchStatNorm(child))
        else:
            _replace_batchnorm(child)
    return module


def load_refine_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """Rebuild the network saved in ``path``.

    Returns
    -------
    (model, config)
        The network (eval mode, CPU) and its :class:`dynaguide.RefineConfig`.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ModelFileError
        (a ``ValueError``) the file is not a ``{"config", "state_dict"}`` checkpoint, its
        config is outside the bounds of :class:`~dynaguide.RefineConfig` (checked before the
        network is allocated), or the weights do not fit the config.
    """
    from dynaguide.config import RefineConfig
    from dynaguide.model import RefineNet

    p = Path(path)
    what = f"refine-net checkpoint {str(p)!r}"
    if not p.is_file():
        raise FileNotFoundError(f"{what} does not exist")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise ModelFileError(f"{what} cannot be read: {first_line(exc)}") from None
    if not (isinstance(data, dict) and "config" in data and "state_dict" in data):
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ModelFileError(f"{what} must hold a dict with 'config' and 'state_dict', got {keys}")
    config = data["config"]
    try:  # the config's bounds (n_channels, n_conv, ...) are checked before any allocation
        if isinstance(config, dict):
            config = RefineConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{what}: invalid config: {exc}") from None
    if not isinstance(config, RefineConfig):
        raise ModelFileError(f"{what}: 'config' is a {type(config).__name__}")
    state = data["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(v, torch.Tensor)
        and (v.dtype == torch.float32 or (not v.is_floating_point() and not v.is_complex()))
        for v in state.values()
    ):
        raise ModelFileError(f"{what}: 'state_dict' must map names to float32 (or int) tensors")
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = RefineNet(config.n_channels, config.n_conv, config.skip)
    try:
        model.load_state_dict(state, strict=True, assign=True)  # uses the loaded tensors
    except RuntimeError as exc:
        raise ModelFileError(f"{what} does not fit its config: {exc}") from None
    return model.eval(), config


def export_refine_net(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    bn: str = "auto",
    verify: bool = True,
    atol: float = 1e-4,
    seed: int = 0,
) -> ExportReport:
    """Export a saved refinement network to ONNX and verify it against torch.

    Parameters
    ----------
    checkpoint : path
        ``.pt`` with ``{"config": dict, "state_dict": ...}``.
    out : path
        Output ``.onnx`` (graph input ``image``, output ``response``).
    bn : {"auto", "batch", "eval"}
        BatchNorm statistics, see the module docstring.
    verify : bool
        Compare ONNX Runtime with torch (BatchNorm in the chosen mode) on a fresh random
        input of another size.
    atol : float
        Tolerance on ``max |ort - torch| / max(1, max |torch|)``.
    seed : int
        Seed of the random inputs.

    Returns
    -------
    ExportReport
    """
    if bn not in _BN_MODES:
        raise ValueError(f"bn must be one of {_BN_MODES}, got {bn!r}")
    model, config = load_refine_checkpoint(checkpoint)
    mode = ("eval" if config.final_pass == "eval" else "batch") if bn == "auto" else bn
    if mode == "batch":
        exported = _replace_batchnorm(copy.deepcopy(model)).eval()
        reference = _TrainModeReference(model)
    else:
        exported = model.eval()
        reference = model.eval()
    meta = {
        METADATA_PREFIX + "kind": "refine-net",
        METADATA_PREFIX + "batchnorm": mode,
        METADATA_PREFIX + "config": json.dumps(config.to_dict(), default=str),
    }
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(1, 3, 48, 64, generator=gen)
    report = export_onnx(
        exported, example, out, input_name="image", output_names=["response"], metadata=meta
    )
    if verify:
        shapes = [(1, 3, 37, 53)] if report.dynamic else [tuple(example.shape)]
        verify_image_model(report, reference, shapes, atol=atol, seed=seed + 1)
    return report


class _TrainModeReference(nn.Module):
    """Torch forward with BatchNorm in training mode, on a copy (running stats untouched)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Train-mode forward of the copy."""
        self.model.train()
        return self.model(x)
