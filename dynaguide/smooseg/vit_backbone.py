"""DINO / DINOv2 / ViT patch features from a local Hugging Face folder or its ONNX export.

:class:`ViTPatchFeatures` is the torch module (also what :mod:`dynaguide.export.vit_features`
exports); :class:`HFViTBackbone` follows the backbone protocol of
:mod:`dynaguide.smooseg.backbones` in torch or ONNX Runtime.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dynaguide.smooseg.backbones import check_images

__all__ = ["HFViTBackbone", "ViTPatchFeatures"]


class ViTPatchFeatures(torch.nn.Module):
    """``pixel_values (B, 3, H, W) -> (B, D, H // p, W // p)``: a Hugging Face ViT / DINO /
    DINOv2 model's last hidden state (after its final LayerNorm), patch tokens only.

    The first ``1 + num_register_tokens`` tokens (class and registers) are dropped and the
    rest reshaped to the patch grid. ``pixel_values`` are normalised with the checkpoint's
    mean and std; H and W must be multiples of the patch size.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        cfg = model.config
        self.model = model
        self.prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        ps = cfg.patch_size
        self.patch_size = int(ps if isinstance(ps, int) else ps[0])
        self.dim = int(cfg.hidden_size)
        self.interpolate = cfg.model_type == "vit"
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features of normalised images."""
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        hidden = self.model(pixel_values=pixel_values, **kwargs).last_hidden_state
        b, _, h, w = pixel_values.shape
        p = self.patch_size
        tokens = hidden[:, self.prefix :, :]
        return tokens.reshape(b, h // p, w // p, self.dim).permute(0, 3, 1, 2).contiguous()


class HFViTBackbone:
    """A frozen DINO / DINOv2 / ViT from a local Hugging Face folder or its ONNX export.

    Parameters
    ----------
    checkpoint : path
        A folder written by ``save_pretrained`` (``config.json`` + weights; nothing is
        downloaded) or an ``.onnx`` file from :func:`dynaguide.export.vit_features.export_vit_features`.
    backend : {"torch", "onnxruntime"}
        ``"torch"`` runs the model eagerly (folder only; it is the reference);
        ``"onnxruntime"`` exports a folder once (to ``onnx_path`` or a temporary file) and
        runs the export, one image at a time.
    device : {"auto", "cpu", "cuda"}
    onnx_path : path, optional
        Where to write the export of a folder.

    Images are resized (bilinear) to the nearest multiple of the patch size, or to the
    export's fixed size when the export could not keep H and W dynamic.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        backend: str = "torch",
        device: str = "auto",
        onnx_path: str | os.PathLike | None = None,
    ) -> None:
        from dynaguide.export.vit_features import export_vit_features, features_preprocessor
        from dynaguide.guidance.pretrained import resolve_torch_device

        if backend not in ("torch", "onnxruntime"):
            raise ValueError(f"backend must be 'torch' or 'onnxruntime', got {backend!r}")
        path = Path(checkpoint)
        self.backend, self.fixed_size = backend, None
        self._module: ViTPatchFeatures | None = None
        self._session = None
        if path.is_dir():
            self.preprocessor = features_preprocessor(path)
            if backend == "torch":
                from dynaguide.guidance.vit_attention import load_vit

                self.device = resolve_torch_device(device)
                self._module = ViTPatchFeatures(load_vit(path)).to(self.device)
                self.dim, self.patch_size = self._module.dim, self._module.patch_size
                self.name = f"hf-vit:{path.resolve().name}:d{self.dim}:p{self.patch_size}"
                return
            target = Path(onnx_path) if onnx_path is not None else None
            if target is None:  # a private folder, removed once the session holds the model
                import tempfile

                scratch = Path(tempfile.mkdtemp(prefix="dynaguide-vitfeat-"))
                target = scratch / "features.onnx"
            try:
                export_vit_features(path, target)
                self._open(target, device)
            finally:
                if onnx_path is None:
                    import shutil

                    shutil.rmtree(scratch, ignore_errors=True)
            return
        elif backend == "torch":
            raise ValueError(f"backend='torch' needs a checkpoint folder, got {str(path)!r}")
        self._open(path, device)

    def _open(self, path: Path, device: str) -> None:
        """Read a vit-features export's metadata and start its ONNX Runtime session."""
        from dynaguide.errors import ModelFileError
        from dynaguide.export import ImagePreprocessor, OrtSession, read_metadata
        from dynaguide.export.vit_features import KIND

        if not path.is_file():
            raise FileNotFoundError(f"vit backbone: {str(path)!r} does not exist")
        meta = read_metadata(path)
        if meta.get("dynaguide.kind") != KIND:
            raise ValueError(
                f"vit backbone: {str(path)!r} is not a dynaguide vit-features export "
                f"(metadata kind {meta.get('dynaguide.kind')!r})"
            )
        self.preprocessor = ImagePreprocessor.from_metadata(
            meta, defaults=ImagePreprocessor(size=None), source=str(path)
        )
        try:
            self.dim = int(meta["dynaguide.dim"])
            self.patch_size = int(meta["dynaguide.patch_size"])
            source = meta["dynaguide.source_name"]
        except (KeyError, ValueError) as exc:
            raise ModelFileError(f"{path}: unreadable vit-features metadata ({exc})") from None
        self.name = f"hf-vit:{source}:d{self.dim}:p{self.patch_size}"
        self._session = OrtSession(path.read_bytes(), device=device, name=str(path))
        shape = self._session.input_shapes[self._session.input_names[0]][2:]
        if all(isinstance(d, int) for d in shape):
            self.fixed_size = (int(shape[0]), int(shape[1]))
        self.device = torch.device("cpu")

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input (h, w) for images of (height, width)."""
        if self.fixed_size is not None:
            return self.fixed_size
        p = self.patch_size
        return max(p, round(height / p) * p), max(p, round(width / p) * p)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, dim, h, w) float32 patch features."""
        x = check_images(images, f"backbone {self.name}").float()
        size = self.input_size(*x.shape[-2:])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        pre = self.preprocessor
        mean = torch.tensor(pre.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, dtype=x.dtype).view(1, 3, 1, 1)
        scale = pre.rescale_factor * 255.0 if pre.do_rescale else 255.0
        x = x * scale
        if pre.do_normalize:
            x = (x - mean.to(x.device)) / std.to(x.device)
        with torch.inference_mode():
            if self._module is not None:
                return self._module(x.to(self.device)).float().clone()
            assert self._session is not None
            name = self._session.input_names[0]
            outs = [
                self._session.run({name: x[i : i + 1].cpu().numpy()})[self._session.output_names[0]]
                for i in range(x.shape[0])
            ]
        return torch.from_numpy(np.concatenate(outs)).to(images.device)
