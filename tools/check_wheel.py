"""Check a built dynaguide wheel: its tags and what it contains.

    python tools/check_wheel.py DIST_DIR_OR_WHEEL [--root REPO]

Tags: a CPython 3.12+ build must be the stable-ABI wheel ``cp312-abi3-<platform>`` (one per
platform, also for 3.13+), an older CPython an ordinary ``cpXY-cpXY-<platform>`` wheel; never
``any``. Contents: the licence under ``*.dist-info/licenses/``, ``License-Expression: MIT``
in METADATA, ``dynaguide/py.typed``, ``dynaguide/_build_info.py``, exactly one compiled
``dynaguide/_native`` whose suffix matches the tag (``.abi3.so`` for abi3), every module of
the repository's ``kernels/`` and ``export/`` under ``dynaguide/kernels`` and
``dynaguide/export``, and nothing of the checkout that does not belong in an install
(tests, benchmarks, C++ sources, ``__pycache__``). Prints the tags and a summary; exits 1
with one line per problem.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

from packaging.utils import parse_wheel_filename

#: Files every wheel has, relative to its root.
REQUIRED = ("dynaguide/__init__.py", "dynaguide/py.typed", "dynaguide/_build_info.py")
#: Repository folders mapped into the package by [tool.scikit-build.wheel.packages].
MAPPED = {"kernels": "dynaguide/kernels", "export": "dynaguide/export"}
#: Checkout paths that must not end up in an install.
FORBIDDEN = re.compile(r"^(tests|benchmarks|csrc|build|docs)/|(^|/)__pycache__/")


def _tag_problems(wheel: Path, python: tuple[int, int]) -> list[str]:
    name, _version, _build, tags = parse_wheel_filename(wheel.name)
    out = []
    if name != "dynaguide":
        out.append(f"{wheel.name}: distribution {name!r}, expected 'dynaguide'")
    major, minor = python
    for tag in tags:
        if tag.platform == "any":
            out.append(f"{wheel.name}: platform 'any' for a package with a compiled extension")
        if (major, minor) >= (3, 12):
            if (tag.interpreter, tag.abi) != ("cp312", "abi3"):
                out.append(
                    f"{wheel.name}: tag {tag} on CPython {major}.{minor}, expected cp312-abi3"
                )
        elif (tag.interpreter, tag.abi) != (f"cp{major}{minor}", f"cp{major}{minor}"):
            out.append(f"{wheel.name}: tag {tag}, expected cp{major}{minor}-cp{major}{minor}")
    return out


def _native_problems(names: list[str], wheel: Path) -> list[str]:
    natives = [n for n in names if re.fullmatch(r"dynaguide/_native\.[^/]*(so|pyd)", n)]
    if len(natives) != 1:
        return [f"expected one compiled dynaguide/_native, found {natives or 'none'}"]
    abi3 = any(t.abi == "abi3" for t in parse_wheel_filename(wheel.name)[3])
    native = natives[0]
    if abi3 and not (native.endswith(".abi3.so") or native.endswith(".pyd")):
        return [f"{native}: an abi3 wheel needs the stable-ABI extension (.abi3.so)"]
    if not abi3 and ".abi3." in native:
        return [f"{native}: a stable-ABI extension in a version-specific wheel"]
    return []


def problems(wheel: Path, root: Path, *, python: tuple[int, ...] | None = None) -> list[str]:
    """Every problem found in ``wheel`` (empty when it is complete); ``root`` is the
    repository it was built from, ``python`` the interpreter version it was built for."""
    py = tuple(python or sys.version_info[:2])[:2]
    out = _tag_problems(wheel, (int(py[0]), int(py[1])))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = [n for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        meta = zf.read(metadata[0]).decode() if metadata else ""
    present = set(names)
    out += [f"missing {f}" for f in REQUIRED if f not in present]
    if not any(re.fullmatch(r"[^/]+\.dist-info/licenses/LICENSE[^/]*", n) for n in names):
        out.append("missing the licence file (*.dist-info/licenses/LICENSE)")
    if "License-Expression: MIT" not in meta:
        out.append("METADATA has no 'License-Expression: MIT'")
    out += _native_problems(names, wheel)
    for folder, target in MAPPED.items():
        sources = sorted((root / folder).glob("*.py"))
        if not sources:
            out.append(f"no {folder}/*.py in {root} to compare with")
        out += [
            f"missing {target}/{f.name}" for f in sources if f"{target}/{f.name}" not in present
        ]
    out += [f"does not belong in the wheel: {n}" for n in names if FORBIDDEN.search(n)]
    return out


def _wheels(path: Path) -> list[Path]:
    return sorted(path.glob("dynaguide-*.whl")) if path.is_dir() else [path]


def main(argv: list[str] | None = None) -> int:
    """Check every dynaguide wheel given (a file or a folder of them); exit 1 on a problem."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path, help="a .whl file or a folder of them")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = ap.parse_args(argv)
    wheels = _wheels(args.wheel)
    if not wheels:
        print(f"error: no dynaguide wheel in {args.wheel}", file=sys.stderr)
        return 1
    failed = False
    for wheel in wheels:
        found = problems(wheel, args.root)
        tags = sorted(str(t) for t in parse_wheel_filename(wheel.name)[3])
        with zipfile.ZipFile(wheel) as zf:
            n_files = len(zf.namelist())
        size = wheel.stat().st_size / 2**20
        print(f"{wheel.name}: tags {', '.join(tags)}; {n_files} files, {size:.1f} MiB")
        for p in found:
            print(f"  problem: {p}", file=sys.stderr)
        failed = failed or bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
