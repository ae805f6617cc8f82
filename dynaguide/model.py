"""The per-image CNN of DFC (Kim, Kanezaki and Tanaka, IEEE TIP 2020) and DynaGuide
(Guermazi, Ksantini and Khan, IVC 2025, arXiv 2602.13020).

``conv3x3 -> ReLU -> BN`` blocks, an optional skip branch, then a ``1x1 conv -> BN``
classifier whose output is the response map. The network never pools or strides, so
the response keeps the input resolution. BatchNorm normalises with the batch statistics
of the single image while training.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dynaguide.config import RefineConfig
from dynaguide.input_conv import InputPatches, input_conv
from dynaguide.norm import relu_batch_norm


class RefineNet(nn.Module):
    """Response network: (N, 3, H, W) float image -> (N, C, H, W) response map.

    Parameters
    ----------
    n_channels : int
        Width p of the hidden layers and number q of response channels.
    n_conv : int
        Number of 3x3 conv blocks (conv -> ReLU -> BN).
    skip : {"none", "separate", "shared"}
        ``"separate"``: an independent 3x3 conv (3 -> p) whose raw output is added before
        the classifier (106,400 parameters with p=100, n_conv=2). ``"shared"``: the raw
        output of the first conv, reused (the released DynaGuide code).
    in_channels : int
        Input channels (3 for colour images).
    """

    def __init__(
        self, n_channels: int = 100, n_conv: int = 2, skip: str = "none", in_channels: int = 3
    ):
        super().__init__()
        if skip not in ("none", "separate", "shared"):
            raise ValueError(f"skip must be 'none', 'separate' or 'shared', got {skip!r}")
        self.skip_mode = skip
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(n_conv):
            self.convs.append(
                nn.Conv2d(in_channels if i == 0 else n_channels, n_channels, 3, padding=1)
            )
            self.norms.append(nn.BatchNorm2d(n_channels))
        self.skip = nn.Conv2d(in_channels, n_channels, 3, padding=1) if skip == "separate" else None
        self.classifier = nn.Conv2d(n_channels, n_channels, 1)
        self.out_norm = nn.BatchNorm2d(n_channels)
        self._patches = InputPatches()  # im2col of the input image, for the weight gradients

    #: dtype of the hidden 3x3 convolutions (None: the input's dtype). ``amp=True`` sets
    #: bfloat16 on CPUs with native bf16 arithmetic (:func:`mixed_precision`).
    hidden_dtype: torch.dtype | None = None

    def _hidden_conv(self, conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
        d = self.hidden_dtype
        if d is None or d == h.dtype:
            return conv(h)
        bias = None if conv.bias is None else conv.bias.to(d)
        return F.conv2d(h.to(d), conv.weight.to(d), bias, padding=conv.padding).to(h.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Response map of ``x`` (N, 3, H, W) -> (N, C, H, W)."""
        first = input_conv(x, self.convs[0], self._patches)
        skip = None
        if self.skip_mode == "shared":
            skip = first
        elif self.skip is not None:
            skip = input_conv(x, self.skip, self._patches)
        last = len(self.convs) - 1
        h = first  # (the input of block 1; block 0 takes `first` directly)
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            z = first if i == 0 else self._hidden_conv(conv, h)
            # the skip branch is added to the last block's output (in its normalisation pass)
            h = relu_batch_norm(z, norm, residual=skip if i == last else None)
        return relu_batch_norm(self.classifier(h), self.out_norm, relu=False)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs oneDNN bfloat16 convolutions natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def mixed_precision(model: RefineNet, device: torch.device, amp: bool) -> bool:
    """Set up ``amp`` for ``model`` on ``device``; returns whether to run under autocast.

    CUDA: bf16 autocast over the forward. CPU: the hidden 3x3 convolutions (most of the
    FLOPs) run in bfloat16, weights and activations cast per call, everything else in
    float32; a CPU without native bf16 keeps float32 with a warning (emulated bf16 is
    slower). Without ``amp`` nothing changes.
    """
    model.hidden_dtype = None
    if not amp:
        return False
    if device.type != "cpu":
        return True
    if cpu_has_native_bf16():
        model.hidden_dtype = torch.bfloat16
    else:
        warnings.warn(
            "amp=True on a CPU without native bfloat16 (AVX512-BF16/AMX): running in float32",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def build_model(
    config: RefineConfig, *, seed: int | None = None, device: str | torch.device = "cpu"
) -> RefineNet:
    """Build the network of ``config`` with weights drawn from ``seed``.

    The global RNG state is left untouched (the draw happens inside a forked RNG).
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = RefineNet(config.n_channels, config.n_conv, config.skip, config.in_channels)
    return model.to(device)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (weights, biases and BN affine terms)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def conv_flops_per_pixel(config: RefineConfig, *, training: bool = True) -> float:
    """Multiply-add FLOPs (2 per MAC) of the convolutions per pixel.

    Training counts forward + backward as 3x forward (input and weight gradients),
    except the first layer's input gradient, which is not needed.
    """
    p, q = config.n_channels, config.n_channels
    first = 2 * config.in_channels * p * 9
    hidden = 2 * p * p * 9 * (config.n_conv - 1)
    head = 2 * p * q
    skip = first if config.skip == "separate" else 0
    fwd = first + hidden + head + skip
    if not training:
        return float(fwd)
    return float(fwd + 2 * (hidden + head) + (first + skip))
