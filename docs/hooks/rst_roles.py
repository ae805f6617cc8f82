"""mkdocs hook: drop Sphinx role prefixes (``:func:``, ``:class:`` ...) from rendered pages.

The docstrings use Sphinx-style cross references (:func:`dynaguide.segment`); mkdocstrings
renders the name as code and leaves the role in front of it. The role adds nothing on these
pages, so it is removed and the code-formatted name stays.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|data|attr|exc|obj|const):(?=<code>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    """The page's HTML without role prefixes before inline code."""
    return _ROLE.sub("", html)
