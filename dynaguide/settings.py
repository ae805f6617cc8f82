"""What decides a result, resolved once per call: the seed, the guide and the settings record.

* :func:`as_seed` accepts an int, a numpy integer or a :class:`numpy.random.Generator`
  (one 32-bit value is drawn from it, so a generator gives a fresh but reproducible seed
  per call) and returns the plain int that is used and recorded.
* :func:`resolve_guidance` turns a guide *name* into a guide *object* once, so a learned
  guide (an ONNX export and an ONNX Runtime session) is built once per
  :func:`dynaguide.segment_batch` call, CLI run or Ray worker rather than once per image.
  A named guide whose factory takes a ``seed`` (``kmeans``) gets the call's seed unless
  the options name one.
* :func:`settings_record` is the block every result JSON carries under
  ``extra["settings"]``: the preset, every field that differs from it, the guide and its
  options, the seed and the versions of the libraries that decide the numbers.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import os
import platform
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynaguide.config import RefineConfig, get_preset

__all__ = ["ResolvedGuide", "as_seed", "resolve_guidance", "settings_record", "versions"]

#: ``guidance="default"``: the preset's own guide.
DEFAULT = "default"
_SEED_MAX = 2**32 - 1


def as_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, 2**32 - 1]``.

    Parameters
    ----------
    seed : int, numpy integer or numpy.random.Generator
        A generator is advanced by one draw (``integers(0, 2**32)``).

    Raises
    ------
    TypeError
        Not an int, numpy integer or Generator (bools and floats included).
    ValueError
        An integer outside ``[0, 2**32 - 1]``.
    """
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, _SEED_MAX + 1))
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"{name} must be an int, a numpy integer or a numpy.random.Generator, got "
            f"{seed!r} ({type(seed).__name__})"
        )
    if not 0 <= int(seed) <= _SEED_MAX:
        raise ValueError(f"{name} must be an int in [0, {_SEED_MAX}], got {int(seed)}")
    return int(seed)


@dataclass
class ResolvedGuide:
    """A guidance request resolved once: what to call per image and how to record it.

    Attributes
    ----------
    guidance : None, array, tensor or callable
        Passed to the per-image pipeline (a built guide object for a named guide).
    name : str or None
        The guide's name (``"kmeans"``, ``"segformer"``, ``"array"``, a callable's name).
    options : dict
        The options the guide was built with (after the seed was filled in).
    """

    guidance: Any
    name: str | None
    options: dict[str, Any]


def _takes_seed(factory: Any) -> bool:
    try:
        return "seed" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def resolve_guidance(
    guidance: Any, options: dict[str, Any] | None, config: RefineConfig, seed: int
) -> ResolvedGuide:
    """Resolve ``guidance`` (as :func:`dynaguide.segment` takes it) for ``config``.

    ``"default"`` means the preset's guide with the preset's options (unless ``options``
    are given); a registered name is built here with ``options``, plus ``seed`` when its
    factory takes one and ``options`` do not; a :class:`ResolvedGuide` is returned as it
    is; anything else (None, a label array, a
    :class:`~dynaguide.guidance.Guide` object, a callable) is passed through.

    Raises
    ------
    KeyError
        An unknown guide name (the message lists the registered ones).
    TypeError, ValueError
        ``options`` is not a dict, or the guide's factory refused the options.
    """
    from dynaguide.guidance.base import _REGISTRY, get_guide

    if isinstance(guidance, ResolvedGuide):
        return guidance
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"guidance_options must be a dict, got {type(options).__name__}")
    if isinstance(guidance, str) and guidance == DEFAULT:
        guidance = config.default_guidance
        if options is None and config.default_guidance_options:
            options = dict(config.default_guidance_options)
    if guidance is None or (isinstance(guidance, str) and guidance.lower() == "none"):
        return ResolvedGuide(None, None, {})
    if isinstance(guidance, str):
        key = guidance.lower()
        built = dict(options or {})
        factory = _REGISTRY.get(key, (None, ""))[0]
        if factory is not None and "seed" not in built and _takes_seed(factory):
            built["seed"] = seed
        return ResolvedGuide(get_guide(key, **built), key, built)
    name = getattr(guidance, "name", None)
    if not isinstance(name, str):
        name = "array" if hasattr(guidance, "shape") else getattr(guidance, "__name__", None)
        name = name if isinstance(name, str) else type(guidance).__name__
    described: dict[str, Any] = {}
    if dataclasses.is_dataclass(guidance) and not isinstance(guidance, type):
        described = {
            f.name: getattr(guidance, f.name) for f in dataclasses.fields(guidance) if f.repr
        }
    return ResolvedGuide(guidance, name, described)


def versions() -> dict[str, str]:
    """Versions of dynaguide, Python and the libraries that decide the numbers."""
    import scipy
    import skimage
    import torch

    from dynaguide.segmentation import _version

    found = {
        "dynaguide": _version(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "scikit-image": skimage.__version__,
    }
    try:
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return found


def _plain(value: Any) -> Any:
    """``value`` if it is plain JSON data (numbers, text, lists, dicts of them), else its
    ``repr`` (at most 200 characters): a guide option may be a callable or an array."""
    if isinstance(value, np.generic) and value.ndim == 0:
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and len(value) <= 64:
        return [_plain(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _overridden(config: RefineConfig, base: RefineConfig) -> dict[str, Any]:
    mine, theirs = config.to_dict(), base.to_dict()
    return {k: v for k, v in mine.items() if k != "name" and theirs.get(k) != v}


def settings_record(
    preset: str | RefineConfig,
    config: RefineConfig,
    guide: ResolvedGuide,
    seed: int,
    **call: Any,
) -> dict[str, Any]:
    """The JSON-able record of everything that decided one result.

    Parameters
    ----------
    preset : str or RefineConfig
        What the caller passed (a name, or its own config).
    config : RefineConfig
        The configuration actually used.
    guide : ResolvedGuide
    seed : int
    **call
        Further call settings (``device``, ``scale``, ``amp``, ...), recorded as given.

    Returns
    -------
    dict
        ``{"preset", "overrides", "guide", "guide_options", "seed", "versions", **call}``;
        ``overrides`` holds every field of ``config`` that differs from the named preset
        (for a RefineConfig passed as the preset, every field that differs from the
        defaults of :class:`RefineConfig`).
    """
    if isinstance(preset, RefineConfig):
        name, base = preset.name, RefineConfig()
    else:
        name, base = str(preset).lower(), get_preset(preset)
    options = {k: _plain(v) for k, v in guide.options.items()}
    return {
        "preset": name,
        "overrides": _overridden(config, base),
        "guide": guide.name,
        "guide_options": options,
        "seed": seed,
        **call,
        "versions": versions(),
    }
