"""dynaguide.cli: segment/demo/env plumbing, resume, exit codes, optional subcommands.

Most tests replace ``dynaguide.segment`` with a fast fake (the CLI looks it up at call
time); one end-to-end test runs the real refinement on a tiny image.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import dynaguide
from dynaguide import cli
from dynaguide.config import DEFAULT_PRESET, get_preset
from dynaguide.io import read_label_png
from dynaguide.segmentation import Segmentation


def _fake_segment(calls: list[dict[str, Any]]) -> Any:
    def segment(image: Any, **kwargs: Any) -> Segmentation:
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8
        calls.append(kwargs)
        if kwargs.get("name", "").endswith("explode.png"):
            raise RuntimeError("refinement diverged")
        labels = (image[:, :, 0] > 127).astype(np.int32)
        k = int(labels.max()) + 1
        if k == 2 and labels.min() == 1:
            labels[:] = 0
            k = 1
        return Segmentation(
            labels=labels,
            n_labels=k,
            n_iter=kwargs.get("max_iter") or 3,
            history={"loss": [1.0], "n_labels": [k]},
            guide_labels=None,
            image=image,
            config={"preset": kwargs.get("preset")},
            seconds=0.01,
            stop_reason="fake",
            name=kwargs.get("name"),
            device=str(kwargs.get("device")),
        )

    return segment


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    recorded: list[dict[str, Any]] = []
    monkeypatch.setattr(dynaguide, "segment", _fake_segment(recorded), raising=False)
    return recorded


def _write_image(path: Path, seed: int = 0, size: tuple[int, int] = (10, 12)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    _write_image(d / "a.png", 1)
    _write_image(d / "b.jpg", 2)
    (d / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")
    (d / "notes.txt").write_text("not an image")
    return d


def _outputs(out: Path) -> list[str]:
    """The files in ``out``, without dynaguide's bookkeeping folder (manifest and locks)."""
    return sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and ".dynaguide" not in p.relative_to(out).parts
    )


# --------------------------------------------------------------------------- segment


def test_segment_folder_with_a_corrupt_file(
    folder: Path, tmp_path: Path, calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = cli.main(["segment", str(folder), str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert "2 segmented, 0 skipped (resume), 1 failed" in captured.out
    assert str(folder / "c.png") in captured.err
    assert "ImageReadError" in captured.err
    assert _outputs(out) == [
        "a.json",
        "a.labels.png",
        "a.overlay.png",
        "b.json",
        "b.labels.png",
        "b.overlay.png",
    ]  # nothing for c, no temporary files
    assert len(calls) == 2
    labels = read_label_png(out / "a.labels.png")
    assert labels.shape == (10, 12)
    meta = json.loads((out / "a.json").read_text())
    assert meta["name"] == str(folder / "a.png")
    assert meta["stop_reason"] == "fake"


def test_segment_all_good_exit_0_and_options_forwarded(
    tmp_path: Path, calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    img = _write_image(tmp_path / "one.png")
    out = tmp_path / "out"
    argv = ["segment", str(img), str(out), "--preset", "dfc", "--guidance", "none"]
    argv += ["--max-iter", "7", "--scale", "0.5", "--seed", "3", "--quiet"]
    argv += ["--guide-option", "k=4", "--guide-option", "path=/x/y"]
    assert cli.main(argv) == 0
    assert "1 segmented, 0 skipped (resume), 0 failed" in capsys.readouterr().out
    (kwargs,) = calls
    guide = kwargs.pop("guidance")  # resolved once for the run (no guide: nothing built)
    assert (guide.guidance, guide.name) == (None, None)
    assert kwargs == {
        "preset": "dfc",
        "device": "auto",
        "seed": 3,
        "max_iter": 7,
        "scale": 0.5,
        "name": str(img),
    }
    assert _outputs(out) == ["one.json", "one.labels.png", "one.overlay.png"]


def test_segment_default_guidance_and_named_guide(
    tmp_path: Path, calls: list[dict[str, Any]]
) -> None:
    img = _write_image(tmp_path / "one.png")
    assert cli.main(["segment", str(img), str(tmp_path / "o1"), "--quiet"]) == 0
    default = calls[-1]["guidance"]  # the preset's guide with the preset's options
    assert default.name == "felzenszwalb"
    assert default.options == get_preset(DEFAULT_PRESET).default_guidance_options
    assert "guidance_options" not in calls[-1]
    assert calls[-1]["preset"] == DEFAULT_PRESET
    assert (
        cli.main(["segment", str(img), str(tmp_path / "o2"), "--guidance", "SLIC", "--quiet"]) == 0
    )
    assert calls[-1]["guidance"].name == "slic"


def test_resume_skips_complete_outputs(
    folder: Path, tmp_path: Path, calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    (folder / "c.png").unlink()
    assert cli.main(["segment", str(folder), str(out), "--quiet"]) == 0
    assert len(calls) == 2
    capsys.readouterr()
    assert cli.main(["segment", str(folder), str(out), "--resume", "--quiet"]) == 0
    assert "0 segmented, 2 skipped (resume), 0 failed" in capsys.readouterr().out
    assert len(calls) == 2  # nothing re-run
    (out / "b.json").unlink()  # the JSON is written last: without it b is incomplete
    assert cli.main(["segment", str(folder), str(out), "--resume", "--quiet"]) == 0
    assert "1 segmented, 1 skipped (resume), 0 failed" in capsys.readouterr().out
    assert calls[-1]["name"] == str(folder / "b.jpg")
    # without --resume everything is redone
    assert cli.main(["segment", str(folder), str(out), "--quiet"]) == 0
    assert len(calls) == 5


def test_segment_failure_inside_segment_is_reported(
    folder: Path, tmp_path: Path, calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    _write_image(folder / "explode.png")
    code = cli.main(["segment", str(folder), str(tmp_path / "out"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert "2 segmented, 0 skipped (resume), 2 failed" in captured.out
    assert "RuntimeError" in captured.err and "refinement diverged" in captured.err
    assert str(folder / "explode.png") in captured.err


def test_stem_collisions_and_recursive(
    tmp_path: Path, calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    _write_image(src / "x.png", 1)
    _write_image(src / "x.jpg", 2)
    _write_image(src / "sub" / "y.png", 3)
    out = tmp_path / "out"
    assert cli.main(["segment", str(src), str(out), "--quiet"]) == 0
    assert _outputs(out) == sorted(
        f"{s}{e}" for s in ("x.jpg", "x.png") for e in (".json", ".labels.png", ".overlay.png")
    )
    out2 = tmp_path / "out2"
    assert cli.main(["segment", str(src), str(out2), "--recursive", "--quiet"]) == 0
    assert "sub/y.json" in _outputs(out2)
    assert "3 segmented" in capsys.readouterr().out


def test_progress_bar_on_stderr_unless_quiet(
    tmp_path: Path, calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    img = _write_image(tmp_path / "one.png")
    assert cli.main(["segment", str(img), str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "1/1" in captured.err and "1/1" not in captured.out
    assert cli.main(["segment", str(img), str(tmp_path / "o"), "--quiet"]) == 0
    assert "1/1" not in capsys.readouterr().err


def test_keyboard_interrupt_returns_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(image: Any, **kwargs: Any) -> Segmentation:
        raise KeyboardInterrupt

    monkeypatch.setattr(dynaguide, "segment", interrupted, raising=False)
    img = _write_image(tmp_path / "one.png")
    assert cli.main(["segment", str(img), str(tmp_path / "o"), "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra",
    [
        ["--preset", "nope"],
        ["--max-iter", "0"],
        ["--max-iter", "x"],
        ["--scale", "0"],
        ["--scale", "1.5"],
        ["--guidance", "no-such-guide"],
        ["--guide-option", "novalue"],
        ["--device", "tpu"],
        ["--device", "nonsense:!"],
        ["--bogus"],
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path,
    calls: list[dict[str, Any]],
    extra: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    img = _write_image(tmp_path / "one.png")
    assert cli.main(["segment", str(img), str(tmp_path / "o"), *extra]) == 2
    assert "error" in capsys.readouterr().err
    assert calls == []


def test_usage_errors_paths(
    tmp_path: Path, calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["segment", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["segment", str(empty), str(tmp_path / "o")]) == 2
    assert "no image files" in capsys.readouterr().err
    img = _write_image(tmp_path / "one.png")
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    assert cli.main(["segment", str(img), str(blocker)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["segment"]) == 2
    assert cli.main(["--version"]) == 0
    assert calls == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_usage_error(
    tmp_path: Path, calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    img = _write_image(tmp_path / "one.png")
    assert cli.main(["segment", str(img), str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


# --------------------------------------------------------------------------- demo, env


def test_demo_uses_only_bundled_images(
    tmp_path: Path, calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    bundled = cli.bundled_demo_images()
    assert set(bundled) == set(cli.DEMO_IMAGES)  # all ship with scikit-image 0.26
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--max-iter", "2"]) == 0
    text = capsys.readouterr().out
    for name in cli.DEMO_IMAGES:
        assert name in text
        assert (out / f"{name}.json").is_file()
    assert "512x512" in text  # astronaut
    assert str(out.resolve()) in text
    assert [c["max_iter"] for c in calls] == [2] * len(cli.DEMO_IMAGES)
    assert all(c["scale"] == cli.DEMO_SCALE for c in calls)


def test_env(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "backend torch" in out and "available" in out
    assert "kmeans" in out


# --------------------------------------------------------------------------- optional subcommands


def test_optional_subcommands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dg_test_hello_cli.py").write_text(
        textwrap.dedent(
            """
            def register(subparsers):
                p = subparsers.add_parser("hello")
                p.add_argument("--who", default="world")
                p.set_defaults(func=lambda args: print("hello", args.who) or 0)
            """
        )
    )
    (tmp_path / "dg_test_broken_cli.py").write_text("import dg_test_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        cli, "OPTIONAL_SUBCOMMANDS", ("dynaguide.no_such_module_xyz.cli", "dg_test_hello_cli")
    )
    assert cli.main(["hello", "--who", "you"]) == 0
    assert "hello you" in capsys.readouterr().out
    # a genuine missing dependency inside an existing module is not hidden
    monkeypatch.setattr(cli, "OPTIONAL_SUBCOMMANDS", ("dg_test_broken_cli",))
    with pytest.raises(ModuleNotFoundError, match="dg_test_missing_dependency_xyz"):
        cli.main(["env"])
    sys.modules.pop("dg_test_hello_cli", None)


# --------------------------------------------------------------------------- real end to end


def test_end_to_end_real_segment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rgb = np.zeros((20, 24, 3), np.uint8)
    rgb[:, 12:] = (230, 40, 20)
    rgb[5:15, 3:9] = (20, 60, 220)
    img = tmp_path / "tiny.png"
    Image.fromarray(rgb).save(img)
    out = tmp_path / "out"
    argv = ["segment", str(img), str(out), "--max-iter", "3", "--scale", "0.5", "--quiet"]
    assert cli.main(argv) == 0
    assert "1 segmented, 0 skipped (resume), 0 failed" in capsys.readouterr().out
    labels = read_label_png(out / "tiny.labels.png")
    assert labels.shape == (20, 24)
    meta = json.loads((out / "tiny.json").read_text())
    assert 1 <= meta["n_iter"] <= 3
    assert meta["n_labels"] == len(np.unique(labels))
    assert meta["image_shape"] == [20, 24, 3]
    assert meta["config"]["name"] == DEFAULT_PRESET


def test_size_and_time_flags_reach_segment(tmp_path: Path, calls: list[dict[str, Any]]) -> None:
    img = _write_image(tmp_path / "one.png")
    argv = ["segment", str(img), str(tmp_path / "o"), "--quiet", "--max-pixels", "5000",
            "--work-pixels", "400", "--time-budget", "2.5"]  # fmt: skip
    assert cli.main(argv) == 0
    assert calls[-1]["max_pixels"] == 5000 and calls[-1]["work_pixels"] == 400
    assert calls[-1]["time_budget"] == 2.5
    assert cli.main(["segment", str(img), str(tmp_path / "o2"), "--quiet", "--max-pixels",
                     "none"]) == 0  # fmt: skip
    assert calls[-1]["max_pixels"] is None
    n_calls = len(calls)
    for bad in (["--max-pixels", "3"], ["--time-budget", "0"], ["--work-pixels", "x"]):
        assert cli.main(["segment", str(img), str(tmp_path / "o3"), *bad]) == 2
    assert len(calls) == n_calls  # refused before any image
