"""dynaguide's exception types and its one per-image error policy.

Every public entry point returns a result or raises one of :data:`DOCUMENTED_ERRORS`,
with a message that names the input at fault (a path, a user-given ``name``, or the
parameter). Any other exception is a bug.

The per-image error policy
--------------------------
:func:`dynaguide.segment_batch` with ``on_error="skip"``, ``dynaguide segment`` and the
evaluation runner share one rule, implemented by :func:`image_failure`:

* any :class:`Exception` raised while one image is loaded, guided, refined, finished or
  written fails **that image only**: it is reported with its name, a kind (see
  :func:`classify`) and the message, and the other images go on. Images already finished
  are never lost;
* an error writing the outputs because the disk is full or read-only (``ENOSPC``,
  ``EDQUOT``, ``EROFS``) stops the whole run (kind ``"output"``): every later image would
  fail the same way after its refinement;
* ``KeyboardInterrupt``, ``SystemExit`` and other non-``Exception`` signals stop the run;
* bad settings (preset, overrides, device, ``batch_size``, ``on_error``) are raised before
  the first image is touched.
"""

from __future__ import annotations

import errno
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any

from dynaguide.backend import BackendUnavailableError

__all__ = [
    "DOCUMENTED_ERRORS",
    "DynaguideError",
    "GuideError",
    "ImageFailure",
    "ImageReadError",
    "ImageTooLargeError",
    "InputError",
    "ModelFileError",
    "OutputSafetyError",
    "RefinementDivergedError",
    "as_int",
    "as_number",
    "classify",
    "first_line",
    "image_failure",
    "stops_run",
]


class DynaguideError(Exception):
    """Base class of the exceptions dynaguide defines."""


class InputError(DynaguideError, ValueError):
    """An input (image, label map, guidance, setting) is invalid; the message names it."""


class ImageReadError(InputError):
    """An image file exists but cannot be decoded (corrupt, truncated, not an image, or
    refused by PIL as a possible decompression bomb). The message names the file."""


class ImageTooLargeError(InputError):
    """An image is larger than the pixel budget; the message names it and the limit."""


class ModelFileError(InputError):
    """A model file, checkpoint or its configuration is corrupt, foreign or outside sane
    bounds. The message names the file."""


class OutputSafetyError(DynaguideError, OSError):
    """Writing would overwrite a file that dynaguide did not write, or read its own
    outputs as inputs. The message names the file."""


class GuideError(DynaguideError, RuntimeError):
    """A guide (a user callable or a learned model) failed on an image; the message names
    the guide and the image, the guide's own exception is the ``__cause__``."""


class RefinementDivergedError(DynaguideError, ArithmeticError):
    """The refinement loss became NaN or infinite (too large a learning rate, ...)."""


#: What a public entry point may raise (besides returning a result).
DOCUMENTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # InputError, ImageReadError, ImageTooLargeError, ModelFileError
    TypeError,
    KeyError,  # an unknown preset or guide name
    OSError,  # FileNotFoundError, PermissionError, OutputSafetyError, ...
    MemoryError,
    DynaguideError,  # GuideError, RefinementDivergedError
    BackendUnavailableError,  # a forced backend (argument or DYNAGUIDE_BACKEND) cannot run
)

_OUTPUT_STOPPERS = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}


def classify(exc: BaseException) -> str:
    """The kind of a per-image failure.

    Returns
    -------
    str
        ``"output"`` (the disk is full or read-only: stops the run), ``"resource"`` (out of
        memory), ``"diverged"`` (NaN/inf loss), ``"guide"`` (the guide failed),
        ``"input"`` (a documented error: bad file, array, guidance or setting) or
        ``"internal"`` (any other exception: a bug, reported per image all the same).
    """
    if isinstance(exc, OSError) and exc.errno in _OUTPUT_STOPPERS:
        return "output"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "resource"
    if isinstance(exc, RefinementDivergedError):
        return "diverged"
    if isinstance(exc, GuideError):
        return "guide"
    if isinstance(exc, DOCUMENTED_ERRORS):
        return "input"
    return "internal"


def stops_run(exc: BaseException) -> bool:
    """Whether ``exc`` ends a whole run rather than one image (see the module policy)."""
    return not isinstance(exc, Exception) or classify(exc) == "output"


@dataclass(frozen=True)
class ImageFailure:
    """One image that failed under the per-image policy.

    Attributes
    ----------
    name : str
        The image (its path or given name).
    kind : str
        :func:`classify` of the exception.
    error : str
        The exception's type name.
    message : str
        One line naming the image: ``"<name>: <Type>: <message>"``.
    """

    name: str
    kind: str
    error: str
    message: str

    def to_dict(self) -> dict[str, str]:
        """JSON-able form."""
        return {"name": self.name, "kind": self.kind, "error": self.error, "message": self.message}


def first_line(exc: BaseException) -> str:
    """``"<Type>: <first line of the message>"``: a one-line description of ``exc``."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def image_failure(exc: BaseException, name: str) -> ImageFailure:
    """Apply the per-image policy to ``exc`` raised while image ``name`` was processed.

    Raises
    ------
    BaseException
        ``exc`` itself when it stops the run (:func:`stops_run`): interrupts, and a full or
        read-only output disk.
    """
    if stops_run(exc):
        raise exc
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if type(exc) is KeyError and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # str(KeyError) adds quotes
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    kind = classify(exc)
    if kind == "internal":
        reason += " (unexpected error: please report it)"
    named = re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text) is not None
    line = reason if named else f"{name}: {reason}"
    return ImageFailure(name=name, kind=kind, error=type(exc).__name__, message=line)


def as_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int: ints and numpy integers are accepted, bools and floats not.

    Raises
    ------
    TypeError
        ``value`` is not an integer (or is a bool).
    ValueError
        ``value`` lies outside ``[minimum, maximum]``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    out = int(value)
    if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        lo = "-inf" if minimum is None else str(minimum)
        hi = "inf" if maximum is None else str(maximum)
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {out}")
    return out


def as_number(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
) -> float:
    """``value`` as a finite float (ints and numpy numbers too, bools not).

    ``positive=True`` excludes ``minimum`` itself (a strict lower bound).

    Raises
    ------
    TypeError
        ``value`` is not a real number (or is a bool).
    ValueError
        ``value`` is NaN, infinite or outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    out = float(value)
    low_ok = minimum is None or (out > minimum if positive else out >= minimum)
    if not (math.isfinite(out) and low_ok and (maximum is None or out <= maximum)):
        lo = "-inf" if minimum is None else f"{minimum:g}"
        hi = "inf" if maximum is None else f"{maximum:g}"
        raise ValueError(
            f"{name} must be a finite number in {'(' if positive else '['}{lo}, {hi}], got {value!r}"
        )
    return out
