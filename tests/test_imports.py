"""What importing dynaguide costs and where it comes from.

``import dynaguide`` and ``dynaguide --help`` import no heavy library (checked in fresh
interpreters through ``sys.modules``); the source checkout is refused with advice instead of
importing a package without its compiled parts; the installed package records its version
and build commit from build metadata and points nowhere into a checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import dynaguide
from dynaguide import _source_tree, build_info

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(dynaguide.__file__).resolve().parent
HEAVY = ("torch", "scipy", "skimage", "sklearn", "PIL", "triton", "onnxruntime", "transformers")


def _run(code: str, cwd: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _modules_after(code: str, cwd: Path) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = _run(probe, cwd)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_import_dynaguide_imports_nothing_heavy(tmp_path):
    loaded = _modules_after("import dynaguide\nassert dynaguide.__version__", tmp_path)
    assert "dynaguide" in loaded
    assert not [m for m in HEAVY if m in loaded], sorted(m for m in HEAVY if m in loaded)
    assert "numpy" not in loaded


def test_help_does_not_import_torch_or_scipy_optimize(tmp_path):
    code = (
        "from dynaguide.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
    )
    loaded = _modules_after(code, tmp_path)
    assert "dynaguide.cli" in loaded
    for heavy in ("torch", "scipy", "scipy.optimize", "skimage", "triton", "onnxruntime"):
        assert heavy not in loaded, heavy


def test_eval_and_export_packages_import_lazily(tmp_path):
    loaded = _modules_after("import dynaguide.eval, dynaguide.export", tmp_path)
    assert "torch" not in loaded and "scipy" not in loaded


def test_lazy_names_resolve_and_match_all():
    names = set(dynaguide.__all__) - {"__version__"}
    assert names == set(dynaguide._LAZY)
    assert set(dynaguide.__all__) <= set(dir(dynaguide))
    for name in sorted(names):
        value = getattr(dynaguide, name)
        assert getattr(value, "__name__", name) == name
    # submodules still resolve after a bare `import dynaguide`, unknown names do not
    assert dynaguide.io.load_image is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = dynaguide.no_such_name
    import dynaguide.export as ex

    import dynaguide.eval as ev

    assert callable(ev.evaluate) and callable(ex.export_refine_net)
    assert set(ev.__all__) == set(ev._LAZY) and set(ex.__all__) == set(ex._LAZY)


def _checkout() -> Path:
    if not ((ROOT / "CMakeLists.txt").is_file() and (ROOT / "dynaguide").is_dir()):
        pytest.skip("the tests do not sit in a source checkout")
    return ROOT


def test_importing_from_the_source_tree_fails_at_once_with_advice():
    root = _checkout()
    proc = _run("import dynaguide", root)
    assert proc.returncode != 0
    assert "ImportError: you are importing dynaguide from its source tree" in proc.stderr
    assert "pip install ." in proc.stderr and "dynaguide._native" in proc.stderr
    # the message comes before anything heavy: torch is never imported
    proc = _run(
        "import sys\ntry:\n import dynaguide\nexcept ImportError:\n print('torch' in sys.modules)",
        root,
    )
    assert proc.stdout.strip() == "False"
    # -P keeps the checkout off sys.path: the installed package imports from there too
    proc = _run("import dynaguide; print(dynaguide.__file__)", root, "-P")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve().parent == PACKAGE


def test_a_copied_source_package_is_refused_only_inside_a_checkout(tmp_path):
    src = tmp_path / "checkout" / "dynaguide"
    src.mkdir(parents=True)
    for name in ("__init__.py", "_lazy.py", "_source_tree.py", "build_info.py"):
        shutil.copy(PACKAGE / name, src / name)
    proc = _run("import dynaguide", src.parent)
    assert proc.returncode == 0, proc.stderr  # not a checkout: nothing to say
    (src.parent / "CMakeLists.txt").write_text("project(x)\n")
    (src.parent / "csrc").mkdir()
    proc = _run("import dynaguide", src.parent)
    assert "source tree" in proc.stderr and str(src.parent) in proc.stderr


def test_python_m_pytest_from_the_checkout_tests_the_installed_package():
    root = _checkout()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "tests/test_imports.py::test_missing_parts_of_the_installed_package_are_none"],
        cwd=root, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_missing_parts_of_the_installed_package_are_none():
    assert _source_tree.missing_parts() == []
    assert not _source_tree._is_checkout(PACKAGE.parent)


# ------------------------------------------------------------------- build metadata


def test_build_commit_comes_from_the_generated_build_info(monkeypatch):
    commit = build_info.build_commit()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", commit), commit
    fake = types.ModuleType("dynaguide._build_info")
    fake.COMMIT = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setitem(sys.modules, "dynaguide._build_info", fake)
    assert build_info.build_commit() == fake.COMMIT
    assert build_info.code_version() == {
        "dynaguide": build_info.package_version(),
        "git_commit": fake.COMMIT,
    }
    fake.COMMIT = ""
    assert build_info.build_commit() == "unknown"
    monkeypatch.setitem(sys.modules, "dynaguide._build_info", None)  # import fails
    assert build_info.build_commit() == "unknown"


def test_every_result_writer_uses_the_one_commit_function(monkeypatch, tmp_path):
    import torch

    from dynaguide import bench_utils as benchmarking
    from dynaguide.eval import runner

    assert runner.code_version is build_info.code_version
    monkeypatch.setattr(build_info, "build_commit", lambda: "abc+dirty")
    monkeypatch.setattr(benchmarking, "build_commit", build_info.build_commit)
    assert benchmarking.environment(torch.device("cpu"))["commit"] == "abc+dirty"
    # results default to the current directory outside a benchmarks/ script
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dynaguide"])
    path = benchmarking.write_results("probe", torch.device("cpu"), {"x": 1})
    assert path == tmp_path / "probe-cpu.json"
    assert json.loads(path.read_text())["environment"]["commit"] == "abc+dirty"


def test_installed_package_points_nowhere_into_a_checkout():
    offenders = []
    pattern = re.compile(
        r"__file__\)?(\.resolve\(\))?\.parents\[[1-9]|[\"']rev-parse[\"']|"
        r"[\"']shared[\"']\s*/|benchmarks/results"
    )
    for path in sorted(PACKAGE.rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{lineno}: {line.strip()}")
    assert offenders == []


def test_bench_without_data_uses_the_bundled_sample_images():
    from dynaguide import bench_cli, bench_sections
    from dynaguide.config import get_preset

    assert bench_cli.DEFAULT_DATA is None
    images, names = bench_sections.load_images(None, 2, 0.1, get_preset("dynaguide"))
    assert len(images) == len(names) == 2
    assert all(im.ndim == 3 and im.shape[2] == 3 for im in images)
