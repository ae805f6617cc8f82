"""ONNX export of an image model with dynamic height and width, verified against torch.

:func:`export_onnx` exports a module whose single input is an image tensor
``(1, 3, H, W)`` with dynamic ``H`` and ``W``: first with the dynamo exporter
(``torch.onnx.export(..., dynamo=True)``), then, if that fails or silently fixes the
image size, with the legacy TorchScript exporter; the reason for every fallback is
logged on the ``dynaguide.export`` logger and kept in the returned :class:`ExportReport`.
Metadata (``dynaguide.*`` keys) is written into the model so an ``.onnx`` file is
self-describing (:func:`read_metadata`).

Nothing here imports ``onnx`` or ``onnxruntime`` at module import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from dynaguide.export.ort_session import OrtSession

from dynaguide.errors import ModelFileError, first_line

logger = logging.getLogger("dynaguide.export")

METADATA_PREFIX = "dynaguide."


@dataclass
class ExportReport:
    """What :func:`export_onnx` (and the verifying wrappers) did.

    Attributes
    ----------
    path : Path
        The written ``.onnx`` file.
    exporter : {"dynamo", "torchscript"}
        The exporter that produced the file.
    dynamic : bool
        Whether the image height and width are dynamic in the exported graph.
    fallback_reason : str or None
        Why the dynamo exporter's result was not used, if it was not.
    seconds : float
        Export wall time.
    max_abs_diff : float or None
        Largest absolute difference ORT vs torch on the verification input.
    verify_shape : tuple or None
        Shape of the verification input (different from the export input).
    """

    path: Path
    exporter: str
    dynamic: bool
    fallback_reason: str | None = None
    seconds: float = 0.0
    max_abs_diff: float | None = None
    verify_shape: tuple[int, ...] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One human-readable line."""
        parts = [f"wrote {self.path}", f"exporter={self.exporter}", f"dynamic_hw={self.dynamic}"]
        parts.append(f"export {self.seconds:.1f}s")
        if self.max_abs_diff is not None:
            parts.append(
                f"max|onnxruntime - torch|={self.max_abs_diff:.3g} "
                f"on input {list(self.verify_shape or ())}"
            )
        if self.fallback_reason:
            parts.append(f"fallback: {self.fallback_reason}")
        return ", ".join(parts)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def _input_is_dynamic(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return len(dims) == 4 and all(
        d.dim_param and not d.HasField("dim_value") for d in (dims[2], dims[3])
    )


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def export_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    input_name: str,
    output_names: Sequence[str],
    min_hw: int = 1,
    metadata: Mapping[str, str] | None = None,
    opset: int | None = None,
    legacy_opset: int = 18,
) -> ExportReport:
    """Export an image model to ONNX with dynamic height and width.

    Parameters
    ----------
    module : torch.nn.Module
        Module called as ``module(example)``; it is exported in eval mode.
    example : Tensor (1, 3, H, W)
        Export input. Choose H != W and sizes unlike any size the model special-cases.
    path : path
        Output ``.onnx``. Models under 1.5 GiB are written as one file (no ``.data``).
    input_name : str
        Name of the graph input.
    output_names : sequence of str
        Names of the graph outputs.
    min_hw : int
        Smallest height/width the dynamic dimensions accept.
    metadata : mapping, optional
        Extra ``metadata_props`` written into the model.
    opset : int, optional
        Opset for the dynamo exporter (its default when None).
    legacy_opset : int
        Opset for the TorchScript fallback.

    Returns
    -------
    ExportReport

    Raises
    ------
    ValueError
        If ``example`` is not a (1, C, H, W) tensor.
    RuntimeError
        If both exporters fail.
    """
    if not (isinstance(example, torch.Tensor) and example.ndim == 4 and example.shape[0] == 1):
        raise ValueError(
            f"example must be a (1, C, H, W) tensor, got {getattr(example, 'shape', type(example))}"
        )
    import onnx

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    single_file = _param_bytes(module) < 1.5 * 2**30
    t0 = time.perf_counter()
    exporter, dynamic, reason = "dynamo", True, None
    try:
        from torch.export import Dim

        dims = {2: Dim("height", min=min_hw, max=65536), 3: Dim("width", min=min_hw, max=65536)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(out),
                dynamo=True,
                input_names=[input_name],
                output_names=list(output_names),
                dynamic_shapes={_forward_arg_name(module): dims},
                opset_version=opset,
                external_data=not single_file,
                verbose=False,
            )
        if not _input_is_dynamic(out):
            reason = (
                "the dynamo exporter fixed the image size (a size-dependent branch was specialised)"
            )
    except Exception as exc:  # any exporter failure triggers the fallback, with its reason logged
        reason = f"the dynamo exporter failed: {first_line(exc)}"
        _remove(out)
    if reason is not None:
        logger.warning("ONNX export to %s: %s; trying the TorchScript exporter", out, reason)
        tmp = out.with_name(out.stem + ".torchscript.onnx")
        try:
            with warnings.catch_warnings(), _native_output_silenced():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    input_names=[input_name],
                    output_names=list(output_names),
                    dynamic_axes={input_name: {2: "height", 3: "width"}},
                    opset_version=legacy_opset,
                )
            _remove(out)
            tmp.replace(out)
            exporter, dynamic = "torchscript", _input_is_dynamic(out)
        except Exception as exc:
            _remove(tmp)
            legacy = first_line(exc)
            if not out.exists():
                raise RuntimeError(
                    f"ONNX export failed with both exporters: {reason}; torchscript: {legacy}"
                ) from exc
            logger.warning(
                "ONNX export to %s: the TorchScript exporter failed too (%s); "
                "keeping the dynamo export with a "
                "fixed input size %s",
                out,
                legacy,
                tuple(example.shape[2:]),
            )
            reason = f"{reason}; torchscript exporter: {legacy}"
            dynamic = False
    model = onnx.load(str(out))
    meta = dict(metadata or {})
    meta[METADATA_PREFIX + "exporter"] = exporter
    meta[METADATA_PREFIX + "dynamic_hw"] = json.dumps(dynamic)
    if not dynamic:
        meta[METADATA_PREFIX + "input_size"] = json.dumps(list(example.shape[2:]))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **meta})
    _remove(out)
    onnx.save(model, str(out), save_as_external_data=not single_file, location=out.name + ".data")
    return ExportReport(
        path=out,
        exporter=exporter,
        dynamic=dynamic,
        fallback_reason=reason,
        seconds=time.perf_counter() - t0,
        metadata=meta,
    )


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """Send file descriptors 1 and 2 to a scratch file for a block.

    The TorchScript exporter always logs the whole IR graph from C++ when it fails (its
    log switch tests a function object for truth), which would flood the terminal.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 1)
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, dup in zip((1, 2), saved, strict=True):
                os.dup2(dup, fd)
                os.close(dup)


def _forward_arg_name(module: torch.nn.Module) -> str:
    import inspect

    params = [p for p in inspect.signature(module.forward).parameters.values() if p.name != "self"]
    if not params:
        raise ValueError(f"{type(module).__name__}.forward takes no input")
    return params[0].name


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (weights are not loaded).

    Raises
    ------
    ModelFileError
        The file is not a readable ONNX model (the message names it).
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except MemoryError as exc:
        raise MemoryError(f"{path}: out of memory reading the ONNX model") from exc
    except Exception as exc:  # protobuf DecodeError, onnx errors, ...
        raise ModelFileError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    return {p.key: p.value for p in model.metadata_props}


def check_onnx_file(path: str | os.PathLike, *, what: str) -> Path:
    """Check that ``path`` names an existing ``.onnx`` file.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the name does not end in ``.onnx``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{what}: {str(p)!r} does not exist (expected a folder or an .onnx file)"
        )
    if p.suffix.lower() != ".onnx" or not p.is_file():
        raise ValueError(f"{what}: expected an .onnx file or a checkpoint folder, got {str(p)!r}")
    return p


# --------------------------------------------------------------------------------------
# ONNX Runtime sessions
# --------------------------------------------------------------------------------------


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b|`` with a shape check (inf when shapes differ)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return math.inf
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def verify_image_model(
    report: ExportReport,
    module: torch.nn.Module,
    shapes: list[tuple[int, ...]],
    *,
    atol: float,
    seed: int,
) -> None:
    """Run ORT (CPU) and torch on fresh random inputs; store the max abs difference in ``report``.

    Raises
    ------
    RuntimeError
        If ``max |ort - torch| > atol * max(1, max |torch|)`` on any input.
    """
    session = OrtSession(report.path, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    worst, worst_shape = 0.0, None
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        with torch.inference_mode():
            ref = module(x)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        got = session.run({session.input_names[0]: x.numpy()})
        for name, r in zip(session.output_names, refs, strict=True):
            r = r.detach().cpu().numpy()
            d = max_abs_diff(got[name], r)
            if d > atol * max(1.0, float(np.abs(r).max())):
                raise RuntimeError(
                    f"ONNX verification failed for {report.path}: output {name!r} "
                    f"differs from torch by {d:.3g} "
                    f"on an input of shape {list(shape)}"
                )
            if d >= worst:
                worst, worst_shape = d, tuple(shape)
    report.max_abs_diff = worst
    report.verify_shape = worst_shape


def temporary_onnx_path(stem: str) -> tuple[Path, Callable[[], None]]:
    """A fresh path in a private temporary folder and a function removing the folder."""
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="dynaguide-onnx-"))
    return folder / f"{stem}.onnx", lambda: shutil.rmtree(folder, ignore_errors=True)


def folder_fingerprint(folder: Path, extra: str = "") -> str:
    """SHA-1 over ``extra`` and the names, sizes and modification times of the files of a
    checkpoint folder: an export whose metadata holds it is up to date."""
    h = hashlib.sha1(extra.encode())
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()
