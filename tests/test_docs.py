"""The documentation site's parts that can be checked without building it: the README
sections the pages include exist once and in order, the gallery page describes what
``dynaguide demo`` wrote, and Sphinx roles are dropped from rendered HTML. (CI builds the
site itself with ``mkdocs build --strict``.)"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hook(name: str):
    path = DOCS / "hooks" / f"{name}.py"
    if not path.is_file():
        pytest.skip("docs/ is not beside the tests")
    pytest.importorskip("mkdocs", reason="the [docs] extra is not installed")
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_included_readme_section_exists_once_and_in_order():
    if not DOCS.is_dir():
        pytest.skip("docs/ is not beside the tests")
    readme = (ROOT / "README.md").read_text()
    included = set()
    for page in DOCS.rglob("*.md"):
        included |= set(re.findall(r'--8<-- "README\.md:([a-z][-_0-9a-z]*)"', page.read_text()))
    assert {"install", "quality", "performance"} <= included
    for name in sorted(included):
        start = readme.count(f"<!-- --8<-- [start:{name}] -->")
        end = readme.count(f"<!-- --8<-- [end:{name}] -->")
        assert (start, end) == (1, 1), name
        section = readme.split(f"[start:{name}]", 1)[1].split(f"[end:{name}]", 1)[0]
        assert "[start:" not in section, f"section {name} overlaps another"
        assert len(section.strip()) > 200, name
    # the measured tables are written once, in the README, and only included by the docs
    for page in DOCS.rglob("*.md"):
        assert "| method | Covering |" not in page.read_text()


def test_gallery_page_describes_each_demo_result(tmp_path):
    gallery = _hook("gallery")
    for name, (h, w), k in (("coffee", (400, 600), 23), ("chelsea", (300, 451), 11)):
        record = {
            "name": name,
            "image_shape": [h, w, 3],
            "n_labels": k,
            "n_iter": 0,
            "config": {"name": "felzenszwalb-merge", "default_guidance": "felzenszwalb"},
            "extra": {"guide": "felzenszwalb"},
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    records = gallery._records(tmp_path)
    assert [r["name"] for r in records] == ["chelsea", "coffee"]
    page = gallery._page(records, "dynaguide demo: 2 images\n")
    assert "preset `felzenszwalb-merge`" in page
    assert "600 x 400 pixels, 23 segments" in page and "451 x 300 pixels, 11 segments" in page
    assert "(gallery/coffee.overlay.png)" in page and "(gallery/chelsea.input.png)" in page
    assert "dynaguide demo: 2 images" in page
    with pytest.raises(Exception, match="no results"):
        gallery._records(tmp_path / "empty")


def test_sphinx_roles_are_dropped_before_inline_code_only():
    roles = _hook("rst_roles")
    html = (
        "see :func:<code>dynaguide.segment</code>, :py:class:<code>Segmentation</code> "
        "and :mod:<code>dynaguide.eval</code>; ratio 3:func: stays"
    )
    out = roles.on_page_content(html)
    assert out == (
        "see <code>dynaguide.segment</code>, <code>Segmentation</code> "
        "and <code>dynaguide.eval</code>; ratio 3:func: stays"
    )
