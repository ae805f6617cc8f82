"""Self-attention providers for DiffSeg: a local ViT / DINO / DINOv2 checkpoint or its ONNX export.

:class:`ViTAttention` reads a local Hugging Face ViT / DINO / DINOv2 (with or without
registers) checkpoint folder or its ONNX export (see
:func:`dynaguide.export.export_vit_attention`) and returns the patch-token self-attention
(CLS and register tokens dropped, rows renormalised over the patch keys, chosen layers
averaged over heads and layers). Any callable ``image -> list of maps`` works as a provider
(:class:`AttentionProvider`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from dynaguide.errors import ModelFileError, first_line
from dynaguide.export.onnx_model import (
    METADATA_PREFIX,
    ExportReport,
    check_onnx_file,
    read_metadata,
    temporary_onnx_path,
)
from dynaguide.export.ort_session import OrtSession
from dynaguide.guidance.attention_merge import check_grid_shape
from dynaguide.guidance.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_INPUT_SIDE,
    ImagePreprocessor,
    check_rgb_image,
    load_pretrained,
    read_checkpoint_config,
    read_preprocessor_config,
    require_transformers,
    resolve_torch_device,
)

__all__ = [
    "VIT_MODEL_TYPES",
    "AttentionProvider",
    "PatchAttention",
    "ViTAttention",
    "load_vit",
    "vit_preprocessor",
]

#: Supported ``model_type`` values and their number of prefix (CLS + register) tokens source.
VIT_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")
VIT_ATTENTION_KIND = "vit-attention"


# --------------------------------------------------------------------------------------
# Attention providers
# --------------------------------------------------------------------------------------


@runtime_checkable
class AttentionProvider(Protocol):
    """Anything that turns an image into self-attention maps for :func:`aggregate_attention`."""

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        """Maps (rh, rw, rh, rw) or (heads, rh, rw, rh, rw) of an (H, W, 3) uint8 image."""
        ...


class PatchAttention(torch.nn.Module):
    """Patch-token self-attention of a Hugging Face ViT, averaged over heads and layers.

    ``pixel_values (1, 3, H, W) -> attention (1, N, N)`` with ``N = (H // p) * (W // p)``:
    for each chosen layer the (1 + registers + N)-token attention is cut to the N patch
    tokens (CLS and register rows and columns dropped), each query row is renormalised over
    the patch keys, and the result is averaged over heads and then over the layers. Layers
    after the deepest chosen one are removed from the model.

    Parameters
    ----------
    model : transformers ViTModel / Dinov2Model / Dinov2WithRegistersModel
        Loaded with the eager attention implementation.
    layers : sequence of int
        Layer indices (negative counts from the end).
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[int]):
        super().__init__()
        cfg = model.config
        n_layers = int(cfg.num_hidden_layers)
        if len(layers) == 0:
            raise ValueError("layers must name at least one layer")
        resolved = []
        for layer in layers:
            if not isinstance(layer, (int, np.integer)) or not -n_layers <= layer < n_layers:
                raise ValueError(f"layer {layer!r} out of range for a {n_layers}-layer model")
            resolved.append(int(layer) % n_layers)
        self.layers = sorted(set(resolved))
        self.prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.patch_size = int(
            cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        )
        self.interpolate = cfg.model_type == "vit"
        truncate_layers(model, max(self.layers) + 1, n_layers)
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) normalised image -> (1, N, N) patch attention."""
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.model(pixel_values=pixel_values, output_attentions=True, **kwargs)
        acc = None
        for layer in self.layers:
            a = out.attentions[layer][:, :, self.prefix :, self.prefix :]
            a = (a / a.sum(-1, keepdim=True)).mean(1)
            acc = a if acc is None else acc + a
        return acc / len(self.layers)


def truncate_layers(model: torch.nn.Module, keep: int, n_layers: int) -> None:
    for owner_name, attr in (
        ("", "layers"),
        ("", "layer"),
        ("encoder", "layer"),
        ("encoder", "layers"),
    ):
        owner = getattr(model, owner_name) if owner_name else model
        blocks = getattr(owner, attr, None) if owner is not None else None
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) == n_layers:
            if keep < n_layers:
                setattr(owner, attr, blocks[:keep])
                model.config.num_hidden_layers = keep
            return


def load_vit(checkpoint: str | os.PathLike) -> torch.nn.Module:
    """Load a ViT / DINO / DINOv2 backbone from a local folder with eager attention, in eval mode.

    Raises
    ------
    FileNotFoundError
        If the folder, its ``config.json`` or its weights are missing.
    ValueError
        If the checkpoint's ``model_type`` is not one of :data:`VIT_MODEL_TYPES`.
    """
    cfg = read_checkpoint_config(checkpoint, what="vit checkpoint", model_types=VIT_MODEL_TYPES)
    transformers = require_transformers()
    extra = {"add_pooling_layer": False} if cfg["model_type"] == "vit" else {}
    model = load_pretrained(
        lambda: transformers.AutoModel.from_pretrained(
            str(checkpoint), local_files_only=True, attn_implementation="eager", **extra
        ),
        f"vit checkpoint {str(checkpoint)!r}",
    )
    return model.eval()


def config_int(folder: Path, key: str, default: int | None) -> int:
    """An integer field of ``folder/config.json`` (a clear error when missing or not an int)."""
    cfg = read_checkpoint_config(folder, what="vit checkpoint", model_types=VIT_MODEL_TYPES)
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ModelFileError(f"{folder / 'config.json'}: {key} must be an int in [1, 4096]")
    return value


def vit_preprocessor(folder: str | os.PathLike, model_type: str) -> ImagePreprocessor:
    """Mean/std/rescale/resample of the checkpoint's processor (its size is not used).

    Defaults when the folder has no ``preprocessor_config.json``: mean = std = 0.5 for
    ``vit`` (``ViTImageProcessor``), ImageNet statistics for DINOv2.
    """
    if model_type == "vit":
        base = ImagePreprocessor(size=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    else:
        base = ImagePreprocessor(size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, resample=3)
    found = read_preprocessor_config(folder)
    if found is None:
        return base
    cfg, path = found
    if isinstance(cfg, dict):
        cfg.pop("size", None)
    return base.updated(cfg, source=str(path))


def vit_input_size(h: int, w: int, size: int | tuple[int, int], patch: int) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        scale = int(size) / max(h, w)
        h, w = h * scale, w * scale
    else:
        h, w = check_grid_shape(size, "size")
    return max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)


class ViTAttention:
    """Patch self-attention of a ViT / DINO / DINOv2 checkpoint, as an attention provider.

    Parameters
    ----------
    checkpoint : path
        Local Hugging Face checkpoint folder, or an ``.onnx`` file from
        :func:`export_vit_attention` / ``dynaguide export vit-attention``.
    backend : {"onnxruntime", "torch"}
        ``"torch"`` runs the model eagerly (folder only): the reference.
    layers : sequence of int
        Layers to average (folder only; an ONNX export has its layers baked in).
    size : int or (int, int)
        Network input: an int is the long side (aspect kept), a pair is (height, width);
        both are rounded to multiples of the patch size. The whole image is resized (no
        centre crop), so the attention grid covers the whole image.
    device : {"auto", "cpu", "cuda"}
    onnx_path : path, optional
        Where to export a folder to (reused when it was exported from the same files and
        layers); a temporary file by default.
    threads : int, optional
        ONNX Runtime intra-op threads.
    verify : bool
        Verify a fresh export against torch.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        backend: str = "onnxruntime",
        layers: Sequence[int] = (-1,),
        size: int | tuple[int, int] = 480,
        device: str = "auto",
        onnx_path: str | os.PathLike | None = None,
        threads: int | None = None,
        verify: bool = True,
    ):
        if backend not in ("onnxruntime", "torch"):
            raise ValueError(f"backend must be 'onnxruntime' or 'torch', got {backend!r}")
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a path, got {type(checkpoint).__name__}")
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            if not 1 <= size <= MAX_INPUT_SIDE:
                raise ValueError(f"size must be in [1, {MAX_INPUT_SIDE}], got {size!r}")
        elif max(check_grid_shape(size, "size")) > MAX_INPUT_SIDE:
            raise ValueError(f"size must be at most {MAX_INPUT_SIDE} per side, got {size!r}")
        self.size = size
        self.backend = backend
        self.export_report: ExportReport | None = None
        self.fixed_size: tuple[int, int] | None = None
        self._session: OrtSession | None = None
        self._module: PatchAttention | None = None
        path = Path(checkpoint)
        if path.is_dir():
            cfg = read_checkpoint_config(path, what="vit checkpoint", model_types=VIT_MODEL_TYPES)
            self.preprocessor = vit_preprocessor(path, cfg["model_type"])
            if backend == "torch":
                self._module = PatchAttention(load_vit(path), list(layers)).to(
                    resolve_torch_device(device)
                )
                self.patch_size = self._module.patch_size
                self.layers = self._module.layers
                return
            onnx_file, cleanup = self._export(path, onnx_path, list(layers), verify)
            try:
                self._open(onnx_file, device, threads)
            finally:
                cleanup()
        elif backend == "torch":
            raise ValueError(f"backend='torch' needs a checkpoint folder, got {str(path)!r}")
        else:
            onnx_file = check_onnx_file(path, what="vit attention provider")
            self._open(onnx_file, device, threads)

    def _export(
        self, folder: Path, onnx_path: Any, layers: list[int], verify: bool
    ) -> tuple[Path, Callable[[], None]]:
        # dynaguide.export.vit_attention builds on this module: import it here
        from dynaguide.export.vit_attention import export_vit_attention, vit_fingerprint

        if onnx_path is not None:
            target = Path(onnx_path)
            if target.is_file():
                meta = read_metadata(target)
                n = config_int(folder, "num_hidden_layers", None)
                want = json.dumps(sorted({int(x) % n for x in layers}))
                if meta.get(METADATA_PREFIX + "source_fingerprint") == vit_fingerprint(
                    folder, want
                ):
                    return target, lambda: None
            cleanup: Callable[[], None] = lambda: None  # noqa: E731 - the file is the caller's
        else:
            target, cleanup = temporary_onnx_path("vit-attention")
        # the export size is only binding when the model cannot be exported with dynamic H, W:
        # a 2:3 landscape input at the requested long side
        p = config_int(folder, "patch_size", 16)
        size = self.size
        if isinstance(size, (int, np.integer)):
            size = (int(size) * 2 // 3, int(size))
        # dynaguide.export.vit_attention builds on this module: import it here

        self.export_report = export_vit_attention(
            folder, target, layers=layers, size=vit_input_size(1, 1, size, p), verify=verify
        )
        return target, cleanup

    def _open(self, onnx_file: Path, device: str, threads: int | None) -> None:
        meta = read_metadata(onnx_file)
        if meta.get(METADATA_PREFIX + "kind") != VIT_ATTENTION_KIND:
            raise ValueError(
                f"vit attention provider: {str(onnx_file)!r} is not a dynaguide "
                "vit-attention export "
                f"(metadata kind {meta.get(METADATA_PREFIX + 'kind')!r})"
            )
        source = str(onnx_file)
        try:
            self.patch_size = int(meta[METADATA_PREFIX + "patch_size"])
            self.layers = json.loads(meta[METADATA_PREFIX + "layers"])
        except (KeyError, ValueError) as exc:
            raise ModelFileError(f"{source}: unreadable metadata ({first_line(exc)})") from None
        if not 1 <= self.patch_size <= 64 or not (
            isinstance(self.layers, list) and all(type(x) is int for x in self.layers)
        ):
            raise ModelFileError(
                f"{source}: metadata patch_size {self.patch_size} must be in [1, 64] and layers "
                f"a list of ints, got {self.layers!r}"
            )
        self.preprocessor = ImagePreprocessor.from_metadata(
            meta, defaults=ImagePreprocessor(size=None), source=source
        )
        self._session = OrtSession(
            onnx_file.read_bytes(), device=device, threads=threads, name=source
        )
        shapes = [self._session.input_shapes[n] for n in self._session.input_names]
        if len(shapes) != 1 or len(shapes[0]) != 4 or not self._session.output_names:
            raise ModelFileError(
                f"{source}: expected one (1, 3, H, W) input and an attention output, got "
                f"inputs {shapes}"
            )
        shape = shapes[0][2:]
        if all(isinstance(d, int) for d in shape):
            if not all(self.patch_size <= d <= MAX_INPUT_SIDE for d in shape):
                raise ModelFileError(
                    f"{source}: fixed input size {list(shape)} outside "
                    f"[{self.patch_size}, {MAX_INPUT_SIDE}]"
                )
            self.fixed_size = (int(shape[0]), int(shape[1]))

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input (h, w) for an image of (height, width)."""
        if self.fixed_size is not None:
            return self.fixed_size
        return vit_input_size(height, width, self.size, self.patch_size)

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        """``[A]`` with A of shape (gh, gw, gh, gw): the patch attention of the resized image."""
        image = check_rgb_image(image, "vit attention provider")
        h_in, w_in = self.input_size(*image.shape[:2])
        x = self.preprocessor(image, size=(h_in, w_in))
        gh, gw = h_in // self.patch_size, w_in // self.patch_size
        if self._module is not None:
            dev = next(self._module.parameters()).device
            with torch.inference_mode():
                attn = self._module(torch.from_numpy(x).to(dev)).float()
        else:
            assert self._session is not None
            out = self._session.run({self._session.input_names[0]: x})
            attn = torch.from_numpy(out[self._session.output_names[0]])
            if attn.numel() != (gh * gw) ** 2 or not attn.is_floating_point():
                raise ModelFileError(
                    f"{self._session.name}: attention output of shape {list(attn.shape)} and "
                    f"dtype {attn.dtype} does not match a {gh}x{gw} patch grid"
                )
        return [attn.reshape(gh, gw, gh, gw)]
