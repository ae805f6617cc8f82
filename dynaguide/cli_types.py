"""Value types for ``argparse`` options, shared by every dynaguide command line.

Each function parses one option's text and raises :class:`argparse.ArgumentTypeError`
(shown by argparse as a usage error naming the option) when it is out of range.
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type, expected: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(_number(text, int, "an integer >= 1"))
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1] (a scale factor)."""
    value = _number(text, float, "a number in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    value = _number(text, float, "seconds > 0")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def pixels(text: str) -> int | str:
    """A pixel count >= 4, or ``"none"`` (no limit)."""
    if text.lower() == "none":
        return "none"
    value = int(_number(text, int, "a pixel count >= 4 or 'none'"))
    if value < 4:
        raise argparse.ArgumentTypeError(f"expected a pixel count >= 4 or 'none', got {text!r}")
    return value


def plain_text(doc: str) -> str:
    """A reST docstring as plain text for ``--help``: ``literal`` and :role:`target`
    markup reduced to the text itself, a leading title line's markup included."""
    import re

    text = re.sub(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", doc)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"(?<!`)`([^`]+)`(?!`)", r"\1", text).strip("\n")
