"""mkdocs hook: the gallery page, made at build time by ``dynaguide demo``.

The default pipeline segments scikit-image's bundled sample images exactly as the
``dynaguide demo`` command does (it is that command, run in-process into a temporary
folder); its overlays, the inputs beside them and a page describing each run are added to the
site as generated files, so the gallery always shows what the installed dynaguide produces
and nothing hand-made is committed.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

PAGE = "gallery.md"
_state: dict[str, Any] = {}


def _run_demo(out: Path) -> str:
    """Run ``dynaguide demo --out OUT``; return what it printed."""
    from dynaguide.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--out", str(out)])
    if code != 0:
        raise PluginError(f"dynaguide demo failed (exit {code}):\n{printed.getvalue()}")
    return printed.getvalue()


def _page(records: list[dict[str, Any]], log: str) -> str:
    from dynaguide.build_info import code_version

    version = code_version()
    lines = [
        "# Gallery",
        "",
        "Made when this site was built, by `dynaguide demo`: the default pipeline "
        f"(preset `{records[0]['preset']}`) on the sample images bundled with scikit-image, "
        f"dynaguide {version['dynaguide']} (commit `{version['git_commit']}`). Left the input, "
        "right the overlay `dynaguide demo` writes (each segment in its own colour, "
        "blended with the image).",
        "",
    ]
    for r in records:
        lines += [
            f"## {r['name']}",
            "",
            f"{r['width']} x {r['height']} pixels, {r['n_labels']} segments, "
            f"guide `{r['guide']}`, {r['n_iter']} refinement iterations.",
            "",
            "| input | overlay |",
            "|---|---|",
            f"| ![{r['name']}](gallery/{r['name']}.input.png) "
            f"| ![{r['name']} overlay](gallery/{r['name']}.overlay.png) |",
            "",
        ]
    lines += ["The command's output in this build:", "", "```text", log.rstrip(), "```", ""]
    return "\n".join(lines)


def _records(out: Path) -> list[dict[str, Any]]:
    records = []
    for meta in sorted(out.glob("*.json")):
        data = json.loads(meta.read_text())
        h, w = data["image_shape"][:2]
        records.append(
            {
                "name": data["name"],
                "width": w,
                "height": h,
                "n_labels": data["n_labels"],
                "n_iter": data["n_iter"],
                "preset": data["config"]["name"],
                "guide": data.get("extra", {}).get("guide", data["config"]["default_guidance"]),
            }
        )
    if not records:
        raise PluginError(f"dynaguide demo wrote no results into {out}")
    return records


def on_files(files: Files, config: Any) -> Files:
    """Run the demo once per build and add the gallery page and its pictures."""
    from PIL import Image

    from dynaguide.cli import bundled_demo_images

    tmp = Path(tempfile.mkdtemp(prefix="dynaguide-gallery-"))
    _state["tmp"] = tmp
    log = _run_demo(tmp / "demo")
    records = _records(tmp / "demo")
    inputs = bundled_demo_images()
    for r in records:
        name = r["name"]
        overlay = tmp / "demo" / f"{name}.overlay.png"
        if not overlay.is_file():
            raise PluginError(f"dynaguide demo wrote no overlay for {name}")
        files.append(
            File.generated(config, f"gallery/{name}.overlay.png", abs_src_path=str(overlay))
        )
        rgb = tmp / f"{name}.input.png"
        Image.open(inputs[name]).convert("RGB").save(rgb)
        files.append(File.generated(config, f"gallery/{name}.input.png", abs_src_path=str(rgb)))
    files.append(File.generated(config, PAGE, content=_page(records, log)))
    return files


def on_post_build(config: Any) -> None:
    """Remove the demo's temporary folder."""
    tmp = _state.pop("tmp", None)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
