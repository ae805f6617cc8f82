"""dynaguide.errors: the documented types, the per-image policy and the argument checks; the
manifest of written files; the bad-input table script on a sample of its cases."""

from __future__ import annotations

import errno
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from dynaguide import errors
from dynaguide.manifest import OutputLocks, read_manifest, record_written, written_by_dynaguide

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "output"),
        (OSError(errno.EROFS, "Read-only file system"), "output"),
        (MemoryError("big"), "resource"),
        (errors.RefinementDivergedError("nan"), "diverged"),
        (errors.GuideError("guide failed"), "guide"),
        (errors.ImageReadError("x.png: corrupt"), "input"),
        (FileNotFoundError("x.png: no such file"), "input"),
        (KeyError("unknown preset"), "input"),
        (ZeroDivisionError("division by zero"), "internal"),
    ],
)
def test_classify(exc: BaseException, kind: str) -> None:
    assert errors.classify(exc) == kind
    assert errors.stops_run(exc) == (kind == "output")


def test_image_failure_names_the_image_once() -> None:
    f = errors.image_failure(ValueError("a.png: bad shape"), "a.png")
    assert f.message == "ValueError: a.png: bad shape" and f.kind == "input"
    f = errors.image_failure(ZeroDivisionError("division by zero"), "b.png")
    assert f.message.startswith("b.png: ZeroDivisionError: division by zero")
    assert "please report" in f.message and f.kind == "internal"
    assert errors.image_failure(KeyError("unknown guide 'x'"), "c").message == (
        "c: KeyError: unknown guide 'x'"
    )
    assert errors.image_failure(RuntimeError(""), "d").message.startswith("d: RuntimeError (")
    assert errors.image_failure(ValueError("two\nlines"), "e").message == "e: ValueError: two"
    with pytest.raises(OSError, match="No space"):
        errors.image_failure(OSError(errno.ENOSPC, "No space left on device"), "f")
    with pytest.raises(KeyboardInterrupt):
        errors.image_failure(KeyboardInterrupt(), "g")
    assert set(errors.image_failure(TypeError("t"), "h").to_dict()) == {
        "name", "kind", "error", "message"
    }  # fmt: skip


def test_documented_types_are_what_they_say() -> None:
    for cls in (errors.InputError, errors.ImageReadError, errors.ImageTooLargeError,
                errors.ModelFileError):  # fmt: skip
        assert issubclass(cls, ValueError) and issubclass(cls, errors.DynaguideError)
    assert issubclass(errors.OutputSafetyError, OSError)
    assert issubclass(errors.GuideError, RuntimeError)
    assert all(issubclass(c, BaseException) for c in errors.DOCUMENTED_ERRORS)
    import dynaguide.io

    assert dynaguide.io.ImageReadError is errors.ImageReadError


def test_as_int_and_as_number() -> None:
    assert errors.as_int(np.int64(3), "k") == 3 and type(errors.as_int(np.uint8(3), "k")) is int
    for bad in (True, 3.0, "3", None, np.float64(3)):
        with pytest.raises(TypeError, match="k must be an int"):
            errors.as_int(bad, "k")
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 5\], got 6"):
        errors.as_int(6, "k", minimum=0, maximum=5)
    assert errors.as_number(np.float32(0.5), "x") == 0.5 and errors.as_number(2, "x") == 2.0
    for bad in (True, "1", None):
        with pytest.raises(TypeError, match="x must be a number"):
            errors.as_number(bad, "x")
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="x must be a finite number"):
            errors.as_number(bad, "x", minimum=0)
    with pytest.raises(ValueError, match=r"\(0"):
        errors.as_number(0, "x", minimum=0, positive=True)


def test_manifest_records_content_not_names(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    record_written(target, b"dynaguide's bytes")
    assert not written_by_dynaguide(target)  # recorded but not there yet
    target.write_bytes(b"dynaguide's bytes")
    assert written_by_dynaguide(target)
    target.write_bytes(b"the user's bytes!")  # same name, same size, other content
    assert not written_by_dynaguide(target)
    manifest = tmp_path / ".dynaguide" / "manifest.jsonl"
    with manifest.open("a") as fh:
        fh.write('{"name": "torn line')  # a crash mid-append
    assert set(read_manifest(tmp_path)) == {"a.json"}
    assert read_manifest(tmp_path / "elsewhere") == {}


def test_output_locks_are_shared_between_processes(tmp_path: Path) -> None:
    import subprocess

    locks = OutputLocks(tmp_path)
    try:
        assert locks.acquire("a") and locks.acquire("a")  # re-entrant within one process
        code = (
            "import sys; from dynaguide.manifest import OutputLocks; "
            f"l = OutputLocks({str(tmp_path)!r}); "
            "print(l.acquire('a'), l.acquire('b'))"
        )
        run = lambda: subprocess.run([sys.executable, "-c", code], capture_output=True,  # noqa: E731
                                     text=True, check=True, cwd=tmp_path).stdout.split()  # fmt: skip
        assert run() == ["False", "True"]
        locks.release("a")
        assert run() == ["True", "True"]
    finally:
        locks.close()


def test_bad_input_table_on_a_sample(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    spec = importlib.util.spec_from_file_location(
        "bad_inputs", ROOT / "benchmarks" / "bad_inputs.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bad_inputs"] = mod
    spec.loader.exec_module(mod)
    pool = mod.build_pool(tmp_path / "pool", bombs=False)
    cases = [c for c in mod.all_cases(pool, tmp_path / "work", cli=False) if not c.isolated]
    sample = cases[::9]
    results = [{"kind": c.kind, **mod.classify(c)} for c in sample]
    table = mod.summarize(results)
    known = {"hungarian_match", "bsds_scores", "coco_scores", "resize_nearest"}
    unexpected = [(c.id, r) for c, r in zip(sample, results, strict=True)
                  if r["outcome"] not in ("clear", "accepted")
                  and not any(c.id.startswith(k + "(") for k in known)]  # fmt: skip
    assert unexpected == [] and table["files_lost"] == 0 and table["refused"] == 0
    assert table["bad_inputs_tried"] > 40
