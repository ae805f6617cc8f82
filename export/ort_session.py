"""ONNX Runtime sessions for the exported models.

:class:`OrtSession` wraps an ``onnxruntime.InferenceSession`` with the provider order
CUDA -> CPU (only those available, :func:`select_providers`) and runs it through I/O
binding, so outputs that feed another session can stay on the device.

Nothing here imports ``onnxruntime`` at module import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dynaguide.errors import ModelFileError, first_line

_INSTALL_HINT = (
    "install it with `pip install 'dynaguide[cpu]'` (onnxruntime) or "
    "`pip install 'dynaguide[cuda]'` "
    "(onnxruntime-gpu); never both"
)


def require_onnxruntime() -> Any:
    """Import and return ``onnxruntime`` with an actionable error when it is missing.

    Raises
    ------
    ImportError
        If neither ``onnxruntime`` nor ``onnxruntime-gpu`` is installed.
    """
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"onnxruntime is needed to run ONNX guides; {_INSTALL_HINT}") from exc
    return onnxruntime


DEVICES = ("auto", "cpu", "cuda")


def select_providers(device: str = "auto") -> list[str]:
    """Execution providers in the order CUDA -> CPU, restricted to those installed.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}
        ``"auto"``: CUDA first when available, then CPU. ``"cuda"``: CUDA (then CPU for
        operators CUDA lacks); an error when ONNX Runtime has no CUDA provider.

    Raises
    ------
    ValueError
        For an unknown ``device`` or ``"cuda"`` without ``CUDAExecutionProvider``.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    ort = require_onnxruntime()
    available = ort.get_available_providers()
    order = (
        ["CPUExecutionProvider"]
        if device == "cpu"
        else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    providers = [p for p in order if p in available]
    if device == "cuda" and "CUDAExecutionProvider" not in providers:
        raise ValueError(
            "device='cuda' but ONNX Runtime has no CUDAExecutionProvider "
            f"(available: {available}); "
            "install onnxruntime-gpu (`pip install 'dynaguide[cuda]'`)"
        )
    return providers


class OrtSession:
    """An ONNX Runtime session run through I/O binding.

    Parameters
    ----------
    model : path or bytes
        ``.onnx`` file or serialised model.
    device : {"auto", "cpu", "cuda"}
        See :func:`select_providers`.
    threads : int, optional
        Intra-op threads (ORT's default when None).

    Attributes
    ----------
    providers : list of str
        Providers the session actually uses.
    device_type : {"cpu", "cuda"}
        Where bound outputs live.
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        *,
        device: str = "auto",
        threads: int | None = None,
        name: str | None = None,
    ):
        ort = require_onnxruntime()
        self.name = name or (str(model) if not isinstance(model, bytes) else "ONNX model")
        self._ort = ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be a positive int, got {threads!r}")
            options.intra_op_num_threads = threads
        src = model if isinstance(model, bytes) else str(model)
        providers = select_providers(device)
        try:
            self.session = ort.InferenceSession(src, sess_options=options, providers=providers)
        except MemoryError:
            raise
        except Exception as exc:  # InvalidProtobuf, InvalidGraph, Fail, NoSuchFile, ...
            raise ModelFileError(
                f"{self.name}: ONNX Runtime cannot load the model ({first_line(exc)})"
            ) from None
        self.providers: list[str] = self.session.get_providers()
        self.device_type = (
            "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shapes = {i.name: i.shape for i in self.session.get_inputs()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run and return every output as a host array."""
        values = self.run_bound(feeds, keep_on_device=())
        return {name: v.numpy() for name, v in values.items()}

    def run_bound(
        self, feeds: Mapping[str, Any], *, keep_on_device: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Run with I/O binding; return ``OrtValue`` outputs.

        Parameters
        ----------
        feeds : mapping name -> ndarray or OrtValue
            Host arrays are copied to the session's device once; ``OrtValue`` inputs
            (e.g. another session's device output) are bound without a copy.
        keep_on_device : sequence of str
            Outputs left in device memory (on a CUDA session); the others are bound to the host.

        Returns
        -------
        dict name -> OrtValue
        """
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise ValueError(
                f"missing ONNX inputs {sorted(missing)}; the model takes {self.input_names}"
            )
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            elif self.device_type == "cuda" and name not in self._host_inputs():
                binding.bind_ortvalue_input(
                    name, self._ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
                )
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            where = self.device_type if name in keep_on_device else "cpu"
            binding.bind_output(name, where, 0)
        try:
            self.session.run_with_iobinding(binding)
        except MemoryError:
            raise
        except Exception as exc:  # InvalidArgument (the model does not take this input), Fail
            shapes = {k: _shape_of(v) for k, v in feeds.items()}
            raise ModelFileError(
                f"{self.name}: ONNX Runtime failed on inputs {shapes} ({first_line(exc)}); "
                "is this the right model for this guide?"
            ) from None
        return dict(zip(self.output_names, binding.get_outputs(), strict=True))

    def _host_inputs(self) -> set[str]:
        # shape-like int64 inputs (e.g. an output size) are consumed on the host by ORT kernels
        return {i.name for i in self.session.get_inputs() if i.type == "tensor(int64)"}


def _shape_of(value: Any) -> list[int]:
    shape = getattr(value, "shape", ())
    return list(shape() if callable(shape) else shape)  # OrtValue.shape is a method
