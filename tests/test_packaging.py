"""Packaging: the extras never bring both ONNX runtimes, the installed distribution carries
its licence and type marker, and tools/check_wheel.py catches a wheel missing its parts."""

from __future__ import annotations

import importlib.util
import itertools
import re
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}


def _pyproject() -> dict:
    if not PYPROJECT.is_file():
        pytest.skip("no pyproject.toml beside the tests (not a source checkout)")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(PYPROJECT.read_text())


def _extras() -> dict[str, list[str]]:
    return _pyproject()["project"]["optional-dependencies"]


def expand(extras: dict[str, list[str]], chosen: tuple[str, ...]) -> set[str]:
    """Distribution names that ``pip install ".[chosen]"`` asks for, self-references
    (``dynaguide[test]`` inside ``dev``) followed."""
    names: set[str] = set()
    todo, seen = list(chosen), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in extras:
            raise KeyError(f"extra {extra!r} is referenced but not defined")
        for spec in extras[extra]:
            req = Requirement(spec)
            name = canonicalize_name(req.name)
            if name == "dynaguide":
                todo.extend(req.extras)
            else:
                names.add(name)
    return names


def test_expand_follows_self_references_and_fails_on_unknown_extras():
    extras = {
        "a": ["x>=1", "dynaguide[b]"],
        "b": ["y; python_version > '3'"],
        "c": ["dynaguide[z]"],
    }
    assert expand(extras, ("a",)) == {"x", "y"}
    with pytest.raises(KeyError, match="'z'"):
        expand(extras, ("c",))


def test_no_combination_of_extras_brings_both_onnx_runtimes():
    """Each runtime comes only with its own extra, so any combination that does not name
    both [cpu] and [cuda] (test, dev, ray, export, docs included) has at most one."""
    extras = _extras()
    names = sorted(extras)
    checked = 0
    for r in range(1, len(names) + 1):
        for combo in itertools.combinations(names, r):
            found = expand(extras, combo) & RUNTIMES
            assert ("onnxruntime" in found) == ("cpu" in combo), combo
            assert ("onnxruntime-gpu" in found) == ("cuda" in combo), combo
            if not {"cpu", "cuda"} <= set(combo):
                assert len(found) <= 1, f".[{','.join(combo)}] brings {sorted(found)}"
            checked += 1
    assert checked == 2 ** len(names) - 1


def test_runtime_and_tool_extras_are_split():
    extras = _extras()
    assert expand(extras, ("cpu",)) == {"onnxruntime"}
    assert expand(extras, ("cuda",)) == {"onnxruntime-gpu"}
    assert expand(extras, ("export",)) == {"transformers", "onnx", "onnxscript"}
    # what the suite needs beside one runtime (CI installs .[test,cpu])
    test = expand(extras, ("test",))
    assert {"pytest", "hypothesis", "pytest-xdist", "pycocotools", "ray"} <= test
    assert {"transformers", "onnx", "onnxscript"} <= test
    assert expand(extras, ("test", "cpu")) & RUNTIMES == {"onnxruntime"}
    assert expand(extras, ("dev", "cuda")) & RUNTIMES == {"onnxruntime-gpu"}
    assert {"mkdocs", "mkdocstrings"} <= expand(extras, ("docs",))


def test_build_configuration_targets_the_stable_abi():
    config = _pyproject()
    assert config["tool"]["scikit-build"]["wheel"]["py-api"] == "cp312"
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"nanobind_add_module\(_native STABLE_ABI", cmake)
    assert "${SKBUILD_SABI_COMPONENT}" in cmake
    cibw = config["tool"]["cibuildwheel"]
    assert cibw["manylinux-x86_64-image"].startswith("manylinux")
    assert any(b.startswith("cp312-") for b in cibw["build"])


def test_installed_distribution_carries_licence_metadata_and_type_marker():
    dist = distribution("dynaguide")
    files = {str(f) for f in dist.files or []}
    assert any(re.search(r"\.dist-info/licenses/LICENSE$", f) for f in files), files
    assert "dynaguide/py.typed" in files
    meta = dist.metadata
    assert meta["License-Expression"] == "MIT"
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Topic :: Scientific/Engineering") for c in classifiers)
    assert meta.get_all("Project-URL")
    assert set(meta.get_all("Provides-Extra") or []) >= {"cpu", "cuda", "export", "test", "docs"}


# ------------------------------------------------------------------- wheel checker


def _checker():
    path = ROOT / "tools" / "check_wheel.py"
    if not path.is_file():
        pytest.skip("tools/check_wheel.py is not beside the tests")
    spec = importlib.util.spec_from_file_location("check_wheel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_wheel(folder: Path, tag: str, members: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"dynaguide-0.1.0-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def _good_members(ext: str) -> dict[str, str]:
    meta = "Metadata-Version: 2.4\nName: dynaguide\nVersion: 0.1.0\nLicense-Expression: MIT\n"
    members = {
        "dynaguide/__init__.py": "",
        "dynaguide/py.typed": "",
        "dynaguide/_build_info.py": 'COMMIT = "unknown"\n',
        f"dynaguide/_native{ext}": "",
        "dynaguide-0.1.0.dist-info/METADATA": meta,
        "dynaguide-0.1.0.dist-info/licenses/LICENSE": "MIT License\n",
    }
    for pkg in ("kernels", "export"):
        for f in sorted((ROOT / pkg).glob("*.py")):
            members[f"dynaguide/{pkg}/{f.name}"] = ""
    return members


def test_wheel_checker_accepts_a_complete_abi3_wheel_and_names_what_is_missing(tmp_path):
    check = _checker()
    good = _fake_wheel(tmp_path, "cp312-abi3-linux_x86_64", _good_members(".abi3.so"))
    assert check.problems(good, ROOT, python=(3, 12)) == []

    members = _good_members(".abi3.so")
    del members["dynaguide/py.typed"]
    del members["dynaguide/kernels/fused.py"]
    del members["dynaguide-0.1.0.dist-info/licenses/LICENSE"]
    bad = _fake_wheel(tmp_path / "bad", "cp312-abi3-linux_x86_64", members)
    found = "\n".join(check.problems(bad, ROOT, python=(3, 12)))
    assert "py.typed" in found and "kernels/fused.py" in found and "LICENSE" in found


def test_wheel_checker_wants_abi3_on_312_and_a_version_specific_wheel_before(tmp_path):
    check = _checker()
    plain = _fake_wheel(
        tmp_path, "cp312-cp312-linux_x86_64", _good_members(".cpython-312-x86_64-linux-gnu.so")
    )
    assert any("abi3" in p for p in check.problems(plain, ROOT, python=(3, 12)))
    old = _fake_wheel(
        tmp_path, "cp311-cp311-linux_x86_64", _good_members(".cpython-311-x86_64-linux-gnu.so")
    )
    assert check.problems(old, ROOT, python=(3, 11)) == []
    mixed = _fake_wheel(tmp_path / "m", "cp312-abi3-linux_x86_64", _good_members(".cpython-312.so"))
    assert any("_native" in p for p in check.problems(mixed, ROOT, python=(3, 12)))


def test_wheel_checker_refuses_a_pure_python_wheel(tmp_path):
    check = _checker()
    wheel = _fake_wheel(tmp_path, "py3-none-any", _good_members(".abi3.so"))
    found = check.problems(wheel, ROOT, python=tuple(sys.version_info[:2]))
    assert any("platform" in p for p in found)


def test_sdist_carries_the_licence_and_leaves_results_out(tmp_path):
    if not PYPROJECT.is_file():
        pytest.skip("not a source checkout")
    pytest.importorskip("scikit_build_core", reason="the build backend is not installed here")
    code = f"from scikit_build_core.build import build_sdist; print(build_sdist({str(tmp_path)!r}))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(tmp_path / proc.stdout.strip().splitlines()[-1]) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
    assert {"LICENSE", "pyproject.toml", "CMakeLists.txt", "dynaguide/py.typed"} <= set(names)
    assert not [n for n in names if n.startswith("benchmarks/results/")]
