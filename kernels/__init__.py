"""Fused Triton kernels for the refinement losses (installed as ``dynaguide.kernels``).

The names and keyword signatures of :func:`continuity_loss`, :func:`similarity_loss` and
:func:`guidance_loss` are those that :mod:`dynaguide.losses` dispatches to (its
``backend="triton"``); :func:`dynaguide_loss` is the fused entry point of the training
loop: the whole objective and its gradient in two passes over the response, with the
dynamic weight w(K) computed on the device.

Every op takes a ``(C, H, W)`` or ``(N, C, H, W)`` CUDA tensor (CPU under
``TRITON_INTERPRET=1``) of float32, bfloat16, float16 or float64 with any strides, and
writes its gradient during the forward pass; backward only rescales it.

Importing this module imports Triton; :mod:`dynaguide` itself never does at import time.
"""

from ._launch import compile_only, interpreting
from .continuity import continuity_loss
from .fused import DynaGuideLoss, dynaguide_loss, dynaguide_loss_reference
from .guidance import guidance_loss
from .similarity import similarity_loss
from .smoothness import smoothness_loss_triton

__all__ = [
    "DynaGuideLoss",
    "compile_only",
    "continuity_loss",
    "dynaguide_loss",
    "dynaguide_loss_reference",
    "guidance_loss",
    "interpreting",
    "similarity_loss",
    "smoothness_loss_triton",
]
