"""`dynaguide bench --tiny` end to end on CPU (writes to a temporary folder)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from dynaguide import bench_cli as bench


@pytest.fixture
def data(tmp_path):
    """Three small images in two orientations (two size buckets)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 60), (60, 40), (40, 60)]):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, : w // 2] = rng.integers(0, 256, 3)
        img[:, w // 2 :] = rng.integers(0, 256, 3)
        img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder


def test_tiny_end_to_end_through_the_cli(data, tmp_path, capsys):
    from dynaguide.cli import main

    out = tmp_path / "results"
    argv = ["bench", "--tiny", "--data", str(data), "--out", str(out), "--scale", "0.5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for section in ("(a) objective", "(b) one training iteration", "(c) throughput"):
        assert section in printed
    result = json.loads((out / "bench-tiny-cpu.json").read_text())
    env = result["environment"]
    assert env["device_type"] == "cpu" and env["torch"] and "commit" in env and "command" in env
    assert result["tiny"] is True and result["matmul_gflops"] > 0

    losses = result["losses"]
    assert losses["reference"]["seconds"]["median"] > 0
    if losses["fast_path"] is None:  # no native build: said so, reference timed once
        assert "fast" not in losses and "no fast path" in printed
    else:
        assert losses["fast"]["seconds"]["median"] > 0 and losses["speedup"] > 0
        assert losses["loss_rel_diff"] < 1e-4
    for key in ("min", "median", "max"):
        assert losses["reference"]["seconds"][key] > 0

    image = result["image"]
    assert image["floor_seconds_per_iter"] > 0 and image["speedup"] > 0
    assert image["default"]["seconds_per_iter"]["median"] > 0

    tp = result["throughput"]
    assert tp["images"] == 3 and sorted(tp["sizes"]) == [[20, 30], [30, 20]]
    assert tp["iterations"] > 0 and tp["floor_images_per_second"] > 0
    assert set(tp["images_per_second"]) == {"sequential", "batched"}
    assert tp["identical_results"] == 3  # batched equals one at a time
    assert tp["seconds"]["batched"]["median"] > 0


def test_sections_subset_and_bad_arguments(data, tmp_path):
    parser = bench.build_parser()
    args = parser.parse_args(
        ["--tiny", "--data", str(data), "--out", str(tmp_path), "--sections", "losses"]
    )
    assert bench.run(args) == 0
    result = json.loads((tmp_path / "bench-tiny-cpu.json").read_text())
    assert "losses" in result and "image" not in result and "throughput" not in result

    for bad in (["--limit", "0"], ["--scale", "2"], ["--batch-size", "x"], ["--max-iter", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    for argv in (["--sections", "nope"], ["--device", "tpu"], ["--preset", "unknown"]):
        with pytest.raises(SystemExit):
            bench.run(parser.parse_args(["--tiny", "--out", str(tmp_path), *argv]))
    missing = parser.parse_args(
        ["--tiny", "--data", str(tmp_path / "none"), "--sections", "throughput"]
    )
    with pytest.raises(SystemExit):
        bench.run(missing)


def test_register_adds_the_subcommand():
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--tiny", "--device", "cpu"])
    assert args.func is bench.run and args.tiny and args.batch_size == "auto"
