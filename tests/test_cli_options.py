"""The drop-in surface of ``dynaguide segment``: --set / --config, path lists, --batch-size,
--format / --no-overlay, --start-label, --threads, and the eval / bench help and output."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import dynaguide
from dynaguide import cli
from dynaguide.config_text import field_names, load_config_file, parse_assignment, parse_field

FAST = ["--preset", "dfc", "--max-iter", "2", "--device", "cpu", "--quiet"]


def _folder(tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).save(folder / f"im{i}.png")
    return folder


# --------------------------------------------------------------------------- config text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("n_channels=32", ("n_channels", 32)),
        ("lr=0.05", ("lr", 0.05)),
        ("silhouette_stop=yes", ("silhouette_stop", True)),
        ("upsample=bilinear", ("upsample", "bilinear")),
        ("max_pixels=none", ("max_pixels", None)),
        ("max_pixels=1000", ("max_pixels", 1000)),
        ("merge=none", ("merge", None)),
        ("merge=colour", ("merge", "colour")),
        ("silhouette_k=3,9", ("silhouette_k", (3, 9))),
        ("silhouette_k=[4, 8]", ("silhouette_k", (4, 8))),
        ('default_guidance_options={"k": 2}', ("default_guidance_options", {"k": 2})),
        ("time_budget=2.5", ("time_budget", 2.5)),
    ],
)
def test_set_values_are_typed_by_the_field(text: str, expected: tuple[str, Any]) -> None:
    assert parse_assignment(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("n_chanels=3", "unknown setting 'n_chanels'"),
        ("name=x", "unknown setting 'name'"),
        ("n_channels=3.5", r"n_channels='3.5': expected an integer"),
        ("upsample=cubic", "expected one of nearest, bilinear"),
        ("silhouette_stop=maybe", "expected true or false"),
        ("silhouette_k=3", "expected 2 comma-separated values"),
        ("noequals", "expects KEY=VALUE"),
    ],
)
def test_set_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_assignment(text)


def test_every_field_is_settable_from_its_own_default() -> None:
    cfg = dynaguide.RefineConfig()
    for name in field_names():
        value = getattr(cfg, name)
        text = (
            json.dumps(value) if isinstance(value, dict)
            else ",".join(map(str, value)) if isinstance(value, tuple)
            else "none" if value is None else str(value)
        )  # fmt: skip
        assert parse_field(name, text) == (name, value), name


def test_config_files_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        'preset = "dynaguide"\nn_channels = 24\nsilhouette_k = [3, 7]\nmerge = "none"\n'
    )
    assert load_config_file(toml) == (
        "dynaguide",
        {"n_channels": 24, "silhouette_k": (3, 7), "merge": None},
    )
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"lr": 0.2, "max_pixels": None}))
    assert load_config_file(js) == (None, {"lr": 0.2, "max_pixels": None})
    for name, text, message in (
        ("bad.toml", "n_channels = ", "invalid TOML"),
        ("bad.json", "[1, 2]", "the top level must be a table"),
        ("bad2.json", '{"nope": 1}', "unknown setting 'nope'"),
        ("bad.yaml", "a: 1", "expected a .toml or .json file"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message) as info:
            load_config_file(tmp_path / name)
        assert name in str(info.value)


# --------------------------------------------------------------------------- the CLI


def test_set_and_config_reach_the_results(tmp_path: Path) -> None:
    folder = _folder(tmp_path, 1)
    cfg = tmp_path / "run.toml"
    cfg.write_text('preset = "dynaguide"\nn_channels = 12\nmax_iter = 3\n')
    out = tmp_path / "out"
    argv = ["segment", str(folder), str(out), "--config", str(cfg), "--set", "n_channels=8"]
    argv += ["--connectivity", "4", "--guidance", "none", "--device", "cpu", "--quiet"]
    assert cli.main(argv) == 0
    meta = json.loads((out / "im0.json").read_text())
    assert meta["config"]["name"] == "dynaguide"  # the file's preset
    assert (meta["config"]["n_channels"], meta["config"]["max_iter"]) == (8, 3)  # --set wins
    assert meta["config"]["connectivity"] == 4
    assert meta["extra"]["settings"]["overrides"] == {
        "n_channels": 8,
        "max_iter": 3,
        "connectivity": 4,
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "n_chanels=3"], "unknown setting 'n_chanels'"),
        (["--set", "lr=-1"], "lr must be a finite number"),
        (["--config", "missing.toml"], "--config"),
        (["--format", "labels,jpeg"], "unknown --format"),
        (["--format", "overlay", "--no-overlay"], "leave no output"),
    ],
)
def test_bad_settings_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    folder = _folder(tmp_path, 1)
    assert cli.main(["segment", str(folder), str(tmp_path / "out"), *FAST, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "im0.json").exists()


def test_format_and_no_overlay(tmp_path: Path) -> None:
    folder = _folder(tmp_path, 1)
    out = tmp_path / "out"
    argv = ["segment", str(folder), str(out), *FAST, "--format", "labels,palette,overlay,segments"]
    assert cli.main([*argv, "--no-overlay", "--start-label", "1"]) == 0
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["im0.json", "im0.labels.png", "im0.palette.png", "im0.segments.json"]
    back = dynaguide.load_segmentation(out / "im0.palette.png")
    assert back.start_label == 1 and back.labels.min() == 1
    assert cli.main([*argv, "--no-overlay", "--start-label", "1", "--resume"]) == 0  # kept
    assert cli.main([*argv, "--resume"]) == 0  # other formats: redone, overlay added
    assert (out / "im0.overlay.png").exists()


def test_paths_from_a_file_and_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _folder(tmp_path, 3)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two of them\n{folder / 'im0.png'}\n\n{folder / 'im2.png'}\n")
    out = tmp_path / "out"
    assert cli.main(["segment", str(out), "--paths-from", str(listing), *FAST]) == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["im0.json", "im2.json"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{folder / 'im1.png'}\n"))
    assert cli.main(["segment", "-", str(out), *FAST]) == 0
    assert (out / "im1.json").exists()
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{tmp_path / 'nope.png'}\n"))
    assert cli.main(["segment", "-", str(out), *FAST]) == 2


def test_batch_size_goes_through_segment_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dynaguide.segment_many as batch

    calls: list[int] = []
    real = batch.segment_batch

    def spy(images: Any, **kwargs: Any) -> Any:
        calls.append(len(images))
        assert kwargs["batch_size"] == 2
        return real(images, **kwargs)

    monkeypatch.setattr(batch, "segment_batch", spy)
    folder = _folder(tmp_path, 3)
    (folder / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert cli.main(["segment", str(folder), str(out), *FAST, "--batch-size", "2"]) == 1
    assert sum(calls) == 3  # the unreadable file is reported without a refinement
    one = tmp_path / "one"
    assert cli.main(["segment", str(folder / "im1.png"), str(one), *FAST]) == 0
    a = np.asarray(Image.open(out / "im1.labels.png"))
    np.testing.assert_array_equal(a, np.asarray(Image.open(one / "im1.labels.png")))


def test_threads_and_amp_are_forwarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    real = dynaguide.segment

    def spy(image: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(image, **kwargs)

    monkeypatch.setattr(dynaguide, "segment", spy)
    folder = _folder(tmp_path, 1)
    argv = ["segment", str(folder), str(tmp_path / "o"), *FAST, "--threads", "1", "--amp"]
    assert cli.main(argv) == 0
    assert seen[0]["num_threads"] == 1 and seen[0]["amp"] is True


def test_eval_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out and "report.json" in out


def test_bench_out_defaults_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynaguide import bench_utils as benchmarking
    from dynaguide.bench_cli import build_parser

    assert build_parser().parse_args([]).out == Path(".")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["dynaguide"])  # not a benchmarks/ script
    path = benchmarking.write_results("x", dynaguide.devices.resolve_device("cpu"), {"a": 1})
    assert path == tmp_path / "x-cpu.json"
    assert Path(dynaguide.__file__).parent not in path.parents
