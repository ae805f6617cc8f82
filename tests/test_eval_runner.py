"""dynaguide.eval.evaluate and the ``dynaguide eval`` command.

The plumbing tests inject a fake segment function (its output is known, so the scores
are known); the end-to-end test runs the real ``dynaguide.segment`` at a tiny size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import dynaguide
from dynaguide.config import DEFAULT_PRESET
from dynaguide.eval import BSDS500Dataset, evaluate, load_cached, summarize
from dynaguide.eval.cli import register
from dynaguide.eval.plots import comparison_grid

H, W = 12, 16
BSDS_VAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bsds500" / "val"

# a0: left/right halves (2 labels); a1: quadrants (4 labels).
A0 = np.ones((H, W), np.uint16)
A0[:, W // 2 :] = 2
A1 = A0 + 2 * (np.arange(H)[:, None] >= H // 2)
# The fake segmenter returns a0. a0's segments score 1; each quadrant of a1 lies inside
# one predicted half: IoU = (1/4) / (1/2) = 1/2. Per image: All = (1 + 1 + 4 * 1/2) / 6
# = 2/3, Fine = a1 = 1/2, Coarse = a0 = 1. CC changes nothing (the halves are connected).
EXPECTED = {"All": 2 / 3, "Fine": 0.5, "Coarse": 1.0, "Mean": (2 / 3 + 0.5 + 1.0) / 3}
# Standard benchmark of the same prediction (N = 192 pixels, 18336 pairs):
# Covering: a0 covered exactly (192), each 48-pixel quadrant of a1 by IoU 1/2 (96) -> 288 / 384.
# Rand vs a1: agree = 18336 + 2 * 4512 - 4512 - 9120 = 13728 of 18336; vs a0: 1.
# VoI vs a1 = H(a1 | pred) = ln 2, vs a0 0. Boundaries: the prediction's 12 pixels of column
# 7 coincide with a0's 12 and with 12 of a1's 27 (column 7 + row 5); the tolerance
# 0.0075 x 20 = 0.15 px allows only exact matches: P = 1, R = 24 / 39.
EXPECTED_STANDARD = {
    "covering": 288 / 384,
    "pri": (1 + 13728 / 18336) / 2,
    "voi": np.log(2) / 2,
    "precision": 1.0,
    "recall": 24 / 39,
    "f": 2 * (24 / 39) / (1 + 24 / 39),
}


def _dataset(root: Path, ids=("a", "b", "c"), corrupt=("b",)) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "gt").mkdir()
    rng = np.random.default_rng(0)
    for i in ids:
        path = root / "images" / f"{i}.jpg"
        if i in corrupt:
            path.write_bytes(b"\xff\xd8\xff\xe0 broken jpeg")
        else:
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
        np.savez_compressed(root / "gt" / f"{i}.npz", a0=A0, a1=A1)
    return root


class FakeSegment:
    """Stands in for dynaguide.segment: loads the image (so corrupt files fail), returns a0."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, image, **kwargs):
        self.calls.append((str(image), kwargs))
        rgb = dynaguide.io.load_image(image)
        labels = (A0 - 1).astype(np.int32)
        return SimpleNamespace(
            labels=labels,
            n_labels=2,
            n_iter=4,
            history={"loss": [3.0, 2.0, 1.5, 1.0], "n_labels": [9, 5, 3, 2]},
            guide_labels=np.zeros((H, W), np.int32),
            image=rgb,
            seconds=0.01,
            stop_reason="max_iter (4)",
        )


def _run(root, out, fake, **kw):
    kw.setdefault("progress", False)
    with pytest.warns(UserWarning, match="skipped"):
        return evaluate(BSDS500Dataset(root), cache_dir=out, segment_fn=fake, max_iter=4, **kw)


def test_evaluate_plumbing_cache_resume_and_failures(tmp_path):
    root = _dataset(tmp_path / "val")
    out = tmp_path / "out"
    fake = FakeSegment()
    report = _run(root, out, fake, plot=True, scale=0.5, seed=3)
    assert len(fake.calls) == 3
    kwargs = fake.calls[0][1]
    assert kwargs["max_iter"] == 4 and kwargs["scale"] == 0.5 and kwargs["seed"] == 3
    assert kwargs["preset"] == DEFAULT_PRESET and kwargs["name"] == "a"
    assert report["n_images"] == 3 and report["n_scored"] == 2 and report["n_failed"] == 1
    assert report["failed"][0]["id"] == "b" and "b.jpg" in report["failed"][0]["error"]
    for key in ("raw", "cc8"):
        s = report["scores"][key]
        for mode, value in EXPECTED.items():
            assert s[mode] == pytest.approx(value, abs=1e-12), (key, mode)
        assert s["counts"] == {"All": 12, "Fine": 8, "Coarse": 4}
        for name, value in EXPECTED_STANDARD.items():
            assert s["standard"][name] == pytest.approx(value, abs=1e-12), (key, name)
        assert s["standard"]["n_images"] == 2
        for rec in report["images"]:
            per_image = rec["scores"][key]["standard"]
            assert per_image["covering"] == pytest.approx(EXPECTED_STANDARD["covering"])
            assert per_image["n_annotators"] == 2
            assert per_image["sums"]["boundary_gt"] == 39
    p = report["protocol"]
    assert p["preset"] == DEFAULT_PRESET and p["max_iter"] == 4 and p["effective_max_iter"] == 4
    assert p["scale"] == 0.5 and p["seed"] == 3 and p["n_images"] == 3
    assert p["stopping_rule"]["max_iter"] == 4 and "git_commit" in p["code_version"]
    assert set(p["scores"]) == {"raw", "cc8"}
    assert "Covering" in p["standard_metrics"] and "nats" in p["standard_metrics"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["scores"]["raw"]["All"] == pytest.approx(2 / 3)
    assert sorted(f.name for f in (out / "predictions").iterdir()) == ["a.npz", "c.npz"]
    cached = load_cached(out / "predictions" / "a.npz")
    assert np.array_equal(cached["labels"], A0 - 1) and cached["history"]["n_labels"] == [
        9,
        5,
        3,
        2,
    ]
    for name in ("grid.png", "history.png"):
        with Image.open(out / "plots" / name) as im:
            assert im.format == "PNG" and im.size[0] > 300

    # resume: only the failed image is attempted again
    fake2 = FakeSegment()
    again = _run(root, out, fake2, resume=True, scale=0.5, seed=3)
    assert [Path(c[0]).stem for c in fake2.calls] == ["b"]
    assert again["n_cached"] == 2 and again["scores"]["raw"]["All"] == pytest.approx(2 / 3)
    # the standard scores are recomputed from the cached predictions
    assert again["scores"]["cc8"]["standard"]["f"] == pytest.approx(EXPECTED_STANDARD["f"])

    # a corrupt cache entry is recomputed with a warning
    (out / "predictions" / "c.npz").write_bytes(b"garbage")
    fake3 = FakeSegment()
    with pytest.warns(UserWarning, match="corrupt prediction cache"):
        _run(root, out, fake3, resume=True, scale=0.5, seed=3)
    assert sorted(Path(c[0]).stem for c in fake3.calls) == ["b", "c"]

    # other settings on the same cache are refused; no --resume is refused; overwrite works
    with pytest.raises(ValueError, match=r"other settings \(seed: cached 3 vs now 4"):
        evaluate(BSDS500Dataset(root), cache_dir=out, segment_fn=fake, max_iter=4, scale=0.5,
                 seed=4, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="already holds 2 cached"):
        evaluate(BSDS500Dataset(root), cache_dir=out, segment_fn=fake, resume=False,
                 progress=False)  # fmt: skip
    fake4 = FakeSegment()
    _run(root, out, fake4, overwrite=True, resume=False, seed=9)
    assert len(fake4.calls) == 3


def test_evaluate_without_cache_and_limit(tmp_path):
    root = _dataset(tmp_path / "val", ids=("a", "b", "c"), corrupt=())
    fake = FakeSegment()
    report = evaluate(root, segment_fn=fake, limit=2, progress=False, connected_components=False)
    assert len(fake.calls) == 2 and report["n_scored"] == 2 and set(report["scores"]) == {"raw"}
    assert report["scores"]["raw"]["All"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="limit"):
        evaluate(root, segment_fn=fake, limit=0)
    with pytest.raises(ValueError, match="cache_dir"):
        evaluate(root, segment_fn=fake, plot=True)
    with pytest.raises(ValueError, match="connectivity"):
        evaluate(root, segment_fn=fake, connectivity=6)


def test_evaluate_takes_a_settings_object(tmp_path):
    from dynaguide.eval import EvalSettings

    root = _dataset(tmp_path / "val", ids=("a", "b", "c"), corrupt=())
    fake = FakeSegment()
    settings = EvalSettings(segment_fn=fake, progress=False, connected_components=False, seed=5)
    report = evaluate(root, settings, limit=2)  # keyword options override the settings
    assert len(fake.calls) == 2 and report["n_scored"] == 2
    assert report["protocol"]["seed"] == 5 and report["protocol"]["limit"] == 2
    assert all(kwargs.get("seed") == 5 for _, kwargs in fake.calls), fake.calls
    assert settings.limit is None  # frozen: the override made a copy
    with pytest.raises(TypeError, match="colour"):
        evaluate(root, settings, colour=True)
    with pytest.raises(ValueError, match="connectivity"):
        EvalSettings(connectivity=6)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="dynaguide")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def test_cli_plumbing(tmp_path, monkeypatch, capsys):
    fake = FakeSegment()
    monkeypatch.setattr(dynaguide, "segment", fake)
    ok = _dataset(tmp_path / "ok", corrupt=())
    out = tmp_path / "out"
    rc = _cli(["bsds500", str(ok), "--max-iter", "4", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "raw" in text and "cc8" in text and "3/3 images scored" in text
    assert "Covering" in text and "VoI" in text
    assert f"{EXPECTED_STANDARD['covering']:.4f}" in text and f"{np.log(2) / 2:.4f}" in text
    assert json.loads((out / "report.json").read_text())["n_scored"] == 3
    # resuming needs --resume; with it nothing is recomputed
    assert _cli(["bsds500", str(ok), "--max-iter", "4", "--out", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    n = len(fake.calls)
    assert _cli(["bsds500", str(ok), "--max-iter", "4", "--out", str(out), "--resume"]) == 0
    assert len(fake.calls) == n
    assert "(3 from cache)" in capsys.readouterr().out
    # a corrupt image: reported, the rest scored, exit status 1
    bad = _dataset(tmp_path / "bad")
    with pytest.warns(UserWarning, match="skipped"):
        rc = _cli(["bsds500", str(bad), "--out", str(tmp_path / "o2"), "--no-cc", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1 and "2/3 images scored" in captured.out and "failed b" in captured.err
    assert "cc8" not in captured.out
    # bad dataset folder / bad options
    assert _cli(["folder", str(tmp_path / "missing"), "--out", str(tmp_path / "o3")]) == 2
    assert "not found" in capsys.readouterr().err
    for argv in (["bsds500", str(ok), "--scale", "2"], ["bsds500", str(ok), "--limit", "0"]):
        with pytest.raises(SystemExit):
            _cli(argv)


@pytest.mark.skipif(not BSDS_VAL.is_dir(), reason=f"BSDS500 data not found at {BSDS_VAL}")
def test_end_to_end_real_segment(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["bsds500", str(BSDS_VAL), "--scale", "0.1", "--max-iter", "3", "--limit", "1"]
    rc = _cli([*argv, "--out", str(out), "--no-progress", "--plot"])
    assert rc == 0, capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["n_scored"] == 1
    rec = report["images"][0]
    assert rec["n_iter"] <= 3 and rec["n_labels"] >= 1
    raw, cc = report["scores"]["raw"], report["scores"]["cc8"]
    assert 0 < raw["All"] <= 1 and 0 < cc["All"] <= 1
    assert raw["counts"] == cc["counts"] and raw["counts"]["All"] > 0
    for s in (raw["standard"], cc["standard"]):
        assert 0 < s["covering"] <= 1 and 0 < s["pri"] <= 1 and s["voi"] >= 0
        assert 0 <= s["f"] <= 1 and s["n_images"] == 1
    assert report["protocol"]["guidance"] == "default"
    assert (out / "plots" / "history.png").is_file()


def test_evaluate_folder_dataset_voc_protocol(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "images" / "x.png")
    mask = np.zeros((H, W), np.uint8)
    mask[: H // 2, : W // 2] = 1  # object: top-left quadrant (48 px)
    mask[:, -1] = 255  # void column
    Image.fromarray(mask).save(tmp_path / "masks" / "x.png")
    report = evaluate(tmp_path, segment_fn=FakeSegment(), progress=False)
    # prediction = halves; void pixels dropped: P_left = 96 px, P_right = 7 * 12 = 84 px
    # object: 48 / 96 = 1/2; background (48 + 84 = 132 px): best 84 / 132 = 7/11 (P_right)
    # mIoU = (1/2 + 7/11) / 2 = 25/44
    for key in ("raw", "cc8"):
        assert report["scores"][key]["mIoU"] == pytest.approx(25 / 44, abs=1e-12)
        assert report["scores"][key]["counts"] == {"mIoU": 2}
    assert report["protocol"]["dataset"]["kind"] == "folder"


def test_summarize_standard_scores_only_when_every_record_has_them(tmp_path):
    root = _dataset(tmp_path / "val", corrupt=())
    report = evaluate(root, segment_fn=FakeSegment(), progress=False)
    images = report["images"]
    assert summarize(images, "bsds", "raw")["standard"]["covering"] == pytest.approx(0.75)
    # records of an older report (segment-best-IoU only) keep summarising as before
    old = [{**r, "scores": {"raw": {k: v for k, v in r["scores"]["raw"].items() if k != "standard"}}}
           for r in images]  # fmt: skip
    s = summarize(old, "bsds", "raw")
    assert "standard" not in s and s["All"] == pytest.approx(2 / 3)


def test_comparison_grid_multiline_titles_are_taller(tmp_path):
    row = {"image": np.zeros((H, W, 3), np.uint8), "annotation": A0, "guide": None, "result": A0}
    one = comparison_grid([{**row, "title": "a"}], tmp_path / "one.png")
    three = comparison_grid([{**row, "title": "a\nraw: Cov 0.5\ncc8: Cov 0.6"}], tmp_path / "3.png")
    with Image.open(one) as a, Image.open(three) as b:
        assert b.size[1] == a.size[1] + 36 and a.size[0] == b.size[0]
