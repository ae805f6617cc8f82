"""SmooSeg training, resume, DDP, prediction, evaluation, the guide and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dynaguide.smooseg.synthetic import write_textured_dataset
from dynaguide.smooseg.train import TrainOptions, load_checkpoint, train


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("smooseg")
    write_textured_dataset(root / "train", n_images=6, size=(48, 64), seed=0)
    write_textured_dataset(root / "val", n_images=4, size=(48, 64), seed=1)
    return root


def _opts(data: Path, out: Path, steps: int, **kw) -> TrainOptions:
    base = {
        "n_classes": 3,
        "batch_size": 4,
        "resolution": 32,
        "workers": 0,
        "device": "cpu",
        "progress": False,
        "checkpoint_every": 1000,
    }
    return TrainOptions(data=data / "train" / "images", out=out, steps=steps, **{**base, **kw})


@pytest.fixture(scope="module")
def trained(data: Path) -> Path:
    result = train(_opts(data, data / "run", 6))
    assert result.step == 6 and result.checkpoint.is_file()
    return result.checkpoint


def test_resume_continues_the_same_run_bitwise(data: Path, tmp_path: Path) -> None:
    full = train(_opts(data, tmp_path / "full", 6))
    half = train(_opts(data, tmp_path / "half", 3))
    assert half.step == 3
    with pytest.raises(ValueError, match="exists; pass resume"):
        train(_opts(data, tmp_path / "half", 6))
    resumed = train(_opts(data, tmp_path / "half", 6, resume=True))
    assert resumed.step == 6
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    for key, value in a["head"].items():
        assert torch.equal(value, b["head"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert a["samples"] == b["samples"] == [24]
    assert not torch.equal(a["head"]["prototypes.teacher"], a["head"]["prototypes.student"])


def test_corrupt_image_is_skipped_and_reported(data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((data / "train" / "images").iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    opts = _opts(data, tmp_path / "run", 4, workers=1)
    opts.data = folder
    result = train(opts)
    assert result.step == 4
    assert result.skipped and all("broken.png" in line for line in result.skipped)


def test_train_refuses_bad_input(data: Path, tmp_path: Path, trained: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    opts = _opts(data, tmp_path / "r", 2)
    opts.data = empty
    with pytest.raises(ValueError, match="no image files found"):
        train(opts)
    with pytest.raises(ValueError, match="amp='bf16' needs a CUDA device"):
        train(_opts(data, tmp_path / "r2", 2, amp="bf16"))
    with pytest.raises(ValueError, match=r"another run .*'seed': \(0, 5\)"):
        train(_opts(data, trained.parent, 8, seed=5, resume=True))
    with pytest.raises(ValueError, match="other head settings"):
        train(_opts(data, trained.parent, 8, n_classes=4, resume=True))
    with pytest.raises(ValueError, match="trained on backbone 'texture"):
        train(_opts(data, trained.parent, 8, resume=True, backbone=_other_backbone()))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    from dynaguide.errors import ModelFileError

    with pytest.raises(ModelFileError, match=r"bad\.pt"):
        load_checkpoint(bad)


def _other_backbone():
    from dynaguide.smooseg.backbones import DenseFeatureBackbone

    return DenseFeatureBackbone(patch_size=4)


def test_predictor_checks_the_backbone_and_labels_images(trained: Path, data: Path) -> None:
    from dynaguide.io import load_image
    from dynaguide.smooseg.predict import SmooSegPredictor

    with pytest.raises(
        ValueError, match=r"was trained on backbone 'texture.* not on 'texture\(p=4"
    ):
        SmooSegPredictor(trained, backbone=_other_backbone())
    pred = SmooSegPredictor(trained, resolution=40)
    image = load_image(next((data / "val" / "images").iterdir()))
    labels = pred(image)
    assert labels.shape == image.shape[:2] and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 3
    with pytest.raises(ValueError, match="uint8"):
        pred(image.astype(np.float32))
    # the dense CRF refines the same probabilities: labels in range, mostly the argmax's
    crf = SmooSegPredictor(trained, resolution=40, crf_iterations=5)
    refined = crf(image)
    assert refined.shape == labels.shape and refined.dtype == np.int32
    assert refined.min() >= 0 and refined.max() < 3
    assert (refined == labels).mean() > 0.5
    with pytest.raises(ValueError, match="crf_iterations"):
        SmooSegPredictor(trained, crf_iterations=-1)


def test_predict_cli_writes_segment_output_sets(trained: Path, data: Path, tmp_path: Path) -> None:
    from dynaguide.cli import main
    from dynaguide.io import load_image
    from dynaguide.smooseg.predict import SmooSegPredictor
    from dynaguide.writing import read_label_png

    out = tmp_path / "pred"
    src = data / "val" / "images"
    argv = ["smooseg", "predict", str(trained), str(src), str(out), "--quiet", "--resolution", "40"]
    assert main(argv) == 0
    pred = SmooSegPredictor(trained, resolution=40)
    for img in sorted(src.iterdir()):
        stem = img.stem
        assert (out / f"{stem}.overlay.png").is_file()
        summary = json.loads((out / f"{stem}.json").read_text())
        assert summary["run"]["settings"]["smooseg"]["resolution"] == 40
        np.testing.assert_array_equal(
            read_label_png(out / f"{stem}.labels.png"), pred(load_image(img))
        )
    assert main([*argv, "--resume"]) == 0


def test_evaluation_is_one_dataset_level_matching(tmp_path: Path) -> None:
    """A predictor that reads the class off the image, with permuted cluster ids, scores 1."""
    from PIL import Image

    from dynaguide.smooseg.evaluate import evaluate

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        mask = np.kron(rng.integers(0, 3, (4, 5)), np.ones((16, 16), np.uint8)).astype(np.uint8)
        Image.fromarray(np.repeat((mask * 100)[..., None], 3, 2).astype(np.uint8)).save(
            tmp_path / "images" / f"{i}.png"
        )
        m = mask.copy()
        m[:4, :4] = 255
        Image.fromarray(m).save(tmp_path / "masks" / f"{i}.png")

    class Fake:
        n_classes, flip, path, crf_iterations = 3, False, "fake", 0

        def log_probs(self, images: torch.Tensor) -> torch.Tensor:
            cls = torch.round(images[:, 0] * 255 / 100).long().clamp(0, 2)
            return torch.nn.functional.one_hot((cls + 1) % 3, 3).permute(0, 3, 1, 2).float()

        def labels(self, log_probs: torch.Tensor, image: np.ndarray) -> np.ndarray:
            return log_probs.argmax(0).numpy()

    scores = evaluate(Fake(), tmp_path, resolution=48)
    assert scores["pixel_accuracy"] > 0.97 and scores["mIoU"] > 0.94
    assert sorted(tuple(a) for a in scores["assignment"]) == [(0, 1), (1, 2), (2, 0)]
    assert scores["n_images"] == 3 and scores["protocol"]["n_gt_classes"] == 3


def test_eval_cli_scores_a_checkpoint(trained: Path, data: Path, tmp_path: Path) -> None:
    from dynaguide.cli import main

    out = tmp_path / "scores.json"
    assert (
        main(
            [
                "smooseg",
                "eval",
                str(trained),
                str(data / "val"),
                "--resolution",
                "48",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    scores = json.loads(out.read_text())
    assert 0 <= scores["pixel_accuracy"] <= 1 and scores["n_images"] == 4
    assert np.asarray(scores["confusion"]).shape == (3, 3)


def test_smooseg_guide_is_loaded_once_and_guides_segment(trained: Path, data: Path) -> None:
    import dynaguide
    from dynaguide.guidance import get_guide
    from dynaguide.io import load_image

    g1 = get_guide("smooseg", checkpoint=str(trained), resolution=40)
    g2 = get_guide("smooseg", checkpoint=str(trained), resolution=40)
    assert g1 is g2
    image = load_image(next((data / "val" / "images").iterdir()))
    np.testing.assert_array_equal(g1(image), g1.predictor(image))
    seg = dynaguide.segment(
        image,
        preset="dynaguide",
        guidance="smooseg",
        guidance_options={"checkpoint": str(trained), "resolution": 40},
        max_iter=3,
    )
    assert seg.labels.shape == image.shape[:2]
    with pytest.raises(ValueError, match="needs checkpoint"):
        get_guide("smooseg")


DDP_SCRIPT = """
import os, sys, torch
from dynaguide.smooseg.train import TrainOptions, train
data, out = sys.argv[1], sys.argv[2]
r = train(TrainOptions(data=data, out=out, n_classes=3, steps=3, batch_size=2, resolution=32,
                       workers=0, device="cpu", progress=False))
torch.save(r.head.state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
"""


def test_ddp_two_cpu_processes_end_with_identical_weights(data: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(data / "train" / "images"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 3
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert not torch.equal(r0["prototypes.teacher"], r0["prototypes.student"]), "it trained"
