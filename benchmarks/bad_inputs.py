"""The adversarial bad-input table: every public entry point against inputs it must refuse.

    python benchmarks/bad_inputs.py [--quick] [--out benchmarks/results]

Each case calls one entry point (API function, guide, metric or CLI command) with one bad
input and classifies what happened:

clear   one of ``dynaguide.errors.DOCUMENTED_ERRORS`` whose message names the input (for the
        CLI: exit code 1 or 2, an error line naming it, no traceback; for
        ``segment_batch(on_error="skip")``: a ``None`` slot and a warning naming it)
raw     any other exception, a documented one whose message names nothing, a traceback,
        a crash or an out-of-memory kill
silent  a result where an error was due
lost    (CLI cases) a file the user owned was changed or removed

A second list holds inputs that must be *accepted* (numpy integers, big-endian arrays, ...);
each counts as ``accepted`` or ``refused``. Resource bombs (a 13000x13000 PNG, an ONNX file
whose metadata asks for a 100000x100000 input, a refine-net config with 20000 channels) run
in a subprocess with a 6 GiB address-space limit and report their peak memory. Writes
``<out>/bad-inputs.json`` with the table and every case's outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ISOLATED_LIMIT = 6 * 2**30
CASE_TIMEOUT = 60  # seconds before an in-process case counts as hung


# --------------------------------------------------------------------------- bad files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")


def png_bomb(path: Path, side: int, *, truncated: bool) -> Path:
    """A grayscale PNG of ``side`` x ``side`` zeros: ~side**2/1000 bytes, or only its header."""
    if path.is_file() and path.stat().st_size > 0:
        return path  # built by an earlier call
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    parts = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", ihdr)]
    if truncated:
        parts.append(_png_chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    else:
        comp = zlib.compressobj(9)
        row = b"\0" * (side + 1)
        idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
        parts += [_png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b"")]
    path.write_bytes(b"".join(parts))
    return path


def onnx_identity(path: Path, meta: dict[str, str], *, int_input: bool = False) -> Path:
    """A one-node ONNX model ``pixel_values -> logits`` (Identity) with ``meta``."""
    import onnx
    from onnx import TensorProto, helper

    dtype = TensorProto.INT64 if int_input else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixel_values"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("pixel_values", dtype, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", dtype, [1, 3, "h", "w"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    helper.set_model_props(model, meta)
    onnx.save(model, str(path))
    return path


def build_pool(root: Path, *, bombs: bool = True) -> dict[str, Path]:
    """Create the bad files (images, model files, checkpoint folders) under ``root``.

    ``bombs=False`` leaves out the 13000x13000 PNG that really decodes (seconds to write).
    """
    import torch
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    p: dict[str, Path] = {}

    def put(name: str, data: bytes) -> Path:
        path = root / name
        path.write_bytes(data)
        p[name] = path
        return path

    good = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(good).save(buf, format="PNG")
    png = buf.getvalue()
    put("empty.png", b"")
    put("garbage.png", b"\x89PNG\r\n\x1a\n garbage " * 3)
    put("truncated.png", png[: len(png) // 2])
    put("text.jpg", b"just some text, not a jpeg\n")
    put("good.png", png)
    (root / "dir.png").mkdir(exist_ok=True)
    p["dir.png"] = root / "dir.png"
    p["missing.png"] = root / "missing.png"
    for name, target in (("loop.png", "loop.png"), ("broken.png", "nowhere.png")):
        link = root / name
        if not link.is_symlink():
            link.symlink_to(target)
        p[name] = link
    fifo = root / "fifo.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    p["fifo.png"] = fifo
    p["header-13000.png"] = png_bomb(root / "header-13000.png", 13000, truncated=True)
    if bombs:
        p["bomb-13000.png"] = png_bomb(root / "bomb-13000.png", 13000, truncated=False)

    pre = {"size": [64, 64], "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    seg = {"dynaguide.kind": "segformer"}
    put("garbage.onnx", b"\x08\x07garbage-protobuf" * 8)
    p["big-meta.onnx"] = onnx_identity(
        root / "big-meta.onnx",
        {**seg, "dynaguide.preprocess": json.dumps({**pre, "size": [100000, 100000]})},
    )
    p["bad-json.onnx"] = onnx_identity(
        root / "bad-json.onnx", {**seg, "dynaguide.preprocess": "{not json"}
    )
    p["int-input.onnx"] = onnx_identity(
        root / "int-input.onnx", {**seg, "dynaguide.preprocess": json.dumps(pre)}, int_input=True
    )
    vit = {"dynaguide.kind": "vit-attention", "dynaguide.preprocess": json.dumps(pre)}
    p["vit-patch0.onnx"] = onnx_identity(
        root / "vit-patch0.onnx", {**vit, "dynaguide.patch_size": "0", "dynaguide.layers": "[1]"}
    )
    p["vit-layers.onnx"] = onnx_identity(
        root / "vit-layers.onnx", {**vit, "dynaguide.patch_size": "8", "dynaguide.layers": "{x"}
    )
    p["vit-output.onnx"] = onnx_identity(
        root / "vit-output.onnx", {**vit, "dynaguide.patch_size": "8", "dynaguide.layers": "[1]"}
    )

    from dynaguide.config import get_preset
    from dynaguide.model import build_model

    cfg = get_preset("dfc").to_dict()
    state = build_model(get_preset("dfc")).state_dict()
    torch.save({"config": cfg, "state_dict": state}, root / "good.pt")
    torch.save({"config": {**cfg, "n_channels": 20000}, "state_dict": {}}, root / "huge.pt")
    torch.save({"config": {**cfg, "n_channels": 50}, "state_dict": state}, root / "mismatch.pt")
    torch.save({"config": {**cfg, "bogus": 1}, "state_dict": state}, root / "bogus-key.pt")
    torch.save({"weights": state}, root / "nokeys.pt")
    torch.save([1, 2, 3], root / "list.pt")
    for name in ("good.pt", "huge.pt", "mismatch.pt", "bogus-key.pt", "nokeys.pt", "list.pt"):
        p[name] = root / name
    put("garbage.pt", b"PK\x03\x04 not a zip at all" * 4)
    put("evil.pt", b"\x80\x04cos\nsystem\n(S'echo owned'\ntR.")

    for kind, model_type in (("seg", "segformer"), ("vit", "vit")):
        for case in ("no-config", "config-list", "bad-json", "garbage-safetensors", "evil-bin"):
            folder = root / f"{kind}-{case}"
            folder.mkdir(exist_ok=True)
            p[f"{kind}-{case}"] = folder
            cfg_path = folder / "config.json"
            if case == "config-list":
                cfg_path.write_text("[1, 2]")
            elif case == "bad-json":
                cfg_path.write_text("{model_type: }")
            elif case != "no-config":
                cfg_path.write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 2}))
            if case == "garbage-safetensors":
                (folder / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0garbage!" * 8)
            if case == "evil-bin":
                (folder / "pytorch_model.bin").write_bytes(
                    b"\x80\x04cos\nsystem\n(S'echo owned'\ntR."
                )
    return p


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One bad (or must-accept) input.

    ``call()`` performs it; ``tokens``: one must appear in the error message; ``kind``:
    ``"api"``, ``"skip"`` (segment_batch with on_error="skip"), ``"cli"`` or ``"accept"``.
    """

    id: str
    group: str
    call: Callable[[], Any]
    tokens: tuple[str, ...]
    kind: str = "api"
    isolated: bool = False
    user_files: tuple[Path, ...] = ()


def _img(h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _bad_images(pool: dict[str, Path]) -> list[tuple[str, Callable[[], Any], tuple[str, ...]]]:
    import torch
    from PIL import Image

    u8 = np.uint8
    arrays = {
        "empty": np.zeros((0, 0, 3), u8),
        "1x1": np.zeros((1, 1, 3), u8),
        "1-D": np.zeros(5, u8),
        "0-D": np.array(3, u8),
        "2-channel": np.zeros((4, 4, 2), u8),
        "channels-first": np.zeros((3, 8, 8), u8),
        "4-D": np.zeros((2, 3, 4, 5), u8),
        "bool": np.zeros((4, 4), bool),
        "int8": np.zeros((4, 4, 3), np.int8),
        "int64": np.zeros((4, 4, 3), np.int64),
        "uint32": np.zeros((4, 4, 3), np.uint32),
        "complex": np.zeros((4, 4, 3), np.complex64),
        "object": np.full((4, 4, 3), None, object),
        "nan": np.full((4, 4, 3), np.nan, np.float32),
        "inf": np.full((4, 4, 3), np.inf, np.float64),
        "float-0-255": np.full((4, 4, 3), 200.0, np.float32),
        "negative-float": np.full((4, 4, 3), -0.5, np.float32),
        "float16-nan": np.full((4, 4), np.nan, np.float16),
    }
    out = [(f"array {k}", (lambda a=a: a), ("array",)) for k, a in arrays.items()]
    tensors = {
        "complex": lambda: torch.zeros(4, 4, 3, dtype=torch.complex64),
        "bool": lambda: torch.zeros(4, 4, dtype=torch.bool),
        "int64": lambda: torch.zeros(4, 4, 3, dtype=torch.int64),
        "meta": lambda: torch.zeros(4, 4, 3, device="meta"),
        "5-D": lambda: torch.zeros(1, 1, 4, 4, 3),
    }
    out += [(f"tensor {k}", f, ("tensor",)) for k, f in tensors.items()]
    out += [
        (
            "PIL mode I out of range",
            lambda: Image.fromarray(np.full((4, 4), -5, np.int32)),
            ("PIL",),
        ),
        ("PIL 1x1", lambda: Image.new("RGB", (1, 1)), ("PIL",)),
        ("PIL lazy truncated", lambda: Image.open(pool["truncated.png"]), ("PIL",)),
    ]
    for obj in (None, 3, "", b"bytes", [[1, 2]], {"a": 1}):
        out.append((f"object {obj!r}", (lambda o=obj: o), ("input", "image", repr(obj))))
    for name in (
        "missing.png", "dir.png", "empty.png", "garbage.png", "truncated.png", "text.jpg",
        "loop.png", "broken.png", "fifo.png", "header-13000.png",
    ):  # fmt: skip
        out.append((f"file {name}", (lambda n=name: str(pool[n])), (str(pool[name]),)))
    out.append(("path with NUL", lambda: "bad\0name.png", ("bad",)))
    out.append(("name too long", lambda: "x" * 300 + ".png", ("xxxx",)))
    return out


def _bad_kwargs() -> list[tuple[str, dict[str, Any], tuple[str, ...]]]:
    from dynaguide.config import RefineConfig

    def raise_zero(image: np.ndarray) -> np.ndarray:
        return np.zeros(image.shape[:2], int) + 1 // 0

    out: list[tuple[str, dict[str, Any], tuple[str, ...]]] = []
    for v in (-1, 2**70, 1.5, "1", True, None, np.float64(1.0)):
        out.append((f"seed={v!r}", {"seed": v}, ("seed",)))
    for v in (-1, 1.5, True, "3", 10**12):  # 0 is valid: no refinement, the guide alone
        out.append((f"max_iter={v!r}", {"max_iter": v}, ("max_iter",)))
    for v in (0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5"):
        out.append((f"scale={v!r}", {"scale": v}, ("scale",)))
    for v in ("nope", 3, None):
        out.append((f"preset={v!r}", {"preset": v}, ("preset",)))
    for v in ("tpu", "cuda:99", 3, "nonsense:!"):
        out.append((f"device={v!r}", {"device": v}, ("device",)))
    guides: dict[str, Any] = {
        "unknown name": "nope",
        "a float": 3.5,
        "an object": object(),
        "wrong shape": np.zeros((3, 3), int),
        "non-integer floats": np.full((8, 8), 0.5),
        "ids above int32": np.full((8, 8), 2**40, np.int64),
        "raising ZeroDivisionError": raise_zero,
        "returning a meta tensor": lambda im: __import__("torch").zeros(8, 8, device="meta"),
        "returning None": lambda im: None,
        "returning a string": lambda im: "labels",
        "returning (H, W, 3)": lambda im: np.zeros((8, 8, 3), int),
        "returning a short list": lambda im: [1, 2, 3],
    }
    out += [(f"guidance {k}", {"guidance": v}, ("guid",)) for k, v in guides.items()]
    for v in ({"n_clusters": -3}, {"bogus": 1}, {"n_clusters": True}, {"seed": -1}):
        out.append((f"kmeans options {v}", {"guidance": "kmeans", "guidance_options": v},
                    (*v.keys(), "kmeans")))  # fmt: skip
    numeric = [
        f.name for f in RefineConfig.__dataclass_fields__.values() if f.type in ("int", "float")
    ]
    for field in numeric:
        for v in (float("nan"), -1, True, 10**15):
            out.append((f"{field}={v!r}", {field: v}, (field,)))
    for field in ("skip", "penalty", "weight_mode", "alignment", "final_pass", "silhouette"):
        out.append((f"{field}='x'", {field: "x"}, (field,)))
    for v in ((1e9, 1e9), (1, 5), (5, 3), (True, 4), "ab", (3, 10**6)):
        out.append((f"silhouette_k={v!r}", {"silhouette_k": v}, ("silhouette_k",)))
    out += [
        ("momentum=5", {"momentum": 5}, ("momentum",)),
        ("lr=inf", {"lr": float("inf")}, ("lr",)),
        ("neighbors=True", {"neighbors": True}, ("neighbors",)),
        ("max_pixels=True", {"max_pixels": True}, ("max_pixels",)),
        ("unknown field", {"bogus_field": 1}, ("bogus_field",)),
        ("default_guidance='nope'", {"default_guidance": "nope"}, ("nope",)),
    ]
    return out


def api_cases(pool: dict[str, Path]) -> list[Case]:
    """Cases for load_image, segment, RefineConfig, segment_batch, guides, metrics, native."""
    import torch

    import dynaguide as dg
    from dynaguide.config import RefineConfig
    from dynaguide.guidance import FelzenszwalbGuide, KMeansGuide, SlicGuide
    from dynaguide.io import load_image

    cases: list[Case] = []
    for label, make, tokens in _bad_images(pool):
        cases.append(
            Case(f"load_image({label})", "load_image", lambda m=make: load_image(m()), tokens)
        )
        cases.append(
            Case(
                f"segment({label})", "segment",
                lambda m=make: dg.segment(m(), max_iter=1, name="probe-image"),
                ("probe-image",),
            )
        )  # fmt: skip
    for label, kw, tokens in _bad_kwargs():
        cases.append(
            Case(
                f"segment(img, {label})", "segment",
                lambda kw=kw: dg.segment(_img(), name="probe-image", **{"max_iter": 1, **kw}),
                (*tokens, "probe-image"),
            )
        )  # fmt: skip
    for f in RefineConfig.__dataclass_fields__:
        if f in ("name", "extra", "default_guidance"):  # a guide name is checked at use
            continue
        for v in (float("nan"), "x", -(10**9)):
            cases.append(Case(f"RefineConfig({f}={v!r})", "RefineConfig",
                              lambda f=f, v=v: RefineConfig(**{f: v}), (f,)))  # fmt: skip

    for label, images in (
        ("a str path", lambda: str(pool["good.png"])),
        ("one array", lambda: _img()),
        ("one tensor", lambda: torch.zeros(8, 8, 3)),
        ("a dict", lambda: {"a": _img()}),
        ("an int", lambda: 3),
        ("None", lambda: None),
    ):
        cases.append(Case(f"segment_batch({label})", "segment_batch",
                          lambda f=images: dg.segment_batch(f(), max_iter=1), ("images",)))  # fmt: skip
    for label, kw in (
        ("batch_size=0", {"batch_size": 0}),
        ("batch_size=1.5", {"batch_size": 1.5}),
        ("batch_size='x'", {"batch_size": "x"}),
        ("batch_size=True", {"batch_size": True}),
        ("on_error='ignore'", {"on_error": "ignore"}),
    ):
        cases.append(Case(f"segment_batch([img], {label})", "segment_batch",
                          lambda kw=kw: dg.segment_batch([_img()], max_iter=1, **kw),
                          (next(iter(kw)),)))  # fmt: skip
    marked = _img(8, 8, 1)
    marked[0, 0] = (1, 2, 3)  # the guides below fail on this image only

    def bad_guide_zero(im: np.ndarray) -> np.ndarray:
        return np.zeros(im.shape[:2], int) + (1 // 0 if tuple(im[0, 0]) == (1, 2, 3) else 0)

    def meta_guide(im: np.ndarray) -> Any:
        if tuple(im[0, 0]) == (1, 2, 3):
            return torch.zeros(im.shape[:2], device="meta")
        return np.zeros(im.shape[:2], int)

    for label, items, kw in (
        ("guide raising ZeroDivisionError", [_img(), marked], {"guidance": bad_guide_zero}),
        ("guide returning a meta tensor", [_img(), marked], {"guidance": meta_guide}),
        ("a corrupt file", [_img(), str(pool["garbage.png"])], {}),
        ("a 13000x13000 header", [_img(), str(pool["header-13000.png"])], {}),
        ("a directory", [_img(), str(pool["dir.png"])], {}),
    ):
        for bs in (1, 2):
            cases.append(Case(
                f"segment_batch(skip, batch_size={bs}, {label})", "segment_batch",
                lambda items=items, kw=kw, bs=bs: dg.segment_batch(
                    items, on_error="skip", max_iter=1, batch_size=bs, **kw),
                ("input 1",), kind="skip",
            ))  # fmt: skip

    guide_opts = [
        (KMeansGuide, {"n_clusters": -3}), (KMeansGuide, {"n_clusters": 0}),
        (KMeansGuide, {"n_clusters": 10**9}), (KMeansGuide, {"n_clusters": True}),
        (KMeansGuide, {"n_clusters": "5"}), (KMeansGuide, {"sample": 0}),
        (KMeansGuide, {"n_init": 0}), (KMeansGuide, {"seed": -1}),
        (FelzenszwalbGuide, {"scale": -1}), (FelzenszwalbGuide, {"scale": True}),
        (FelzenszwalbGuide, {"scale": float("nan")}), (FelzenszwalbGuide, {"scale": float("inf")}),
        (FelzenszwalbGuide, {"sigma": -1}), (FelzenszwalbGuide, {"min_size": -1}),
        (SlicGuide, {"n_segments": 0}), (SlicGuide, {"compactness": 0}),
        (SlicGuide, {"compactness": float("nan")}), (SlicGuide, {"sigma": -1}),
    ]  # fmt: skip
    for cls, opts in guide_opts:
        cases.append(Case(f"{cls.__name__}({opts})", "guides",
                          lambda c=cls, o=opts: c(**o)(_img()), tuple(opts)))  # fmt: skip
    for cls in (KMeansGuide, FelzenszwalbGuide, SlicGuide):
        for label, im in (("float image", np.zeros((8, 8, 3))), ("gray", np.zeros((8, 8), np.uint8)),
                          ("empty", np.zeros((0, 0, 3), np.uint8))):  # fmt: skip
            cases.append(Case(f"{cls.__name__}()({label})", "guides",
                              lambda c=cls, im=im: c()(im), ("guide",)))  # fmt: skip
    cfg = dg.get_preset("dfc").replace(max_iter=1)
    for label, call, tokens in (
        ("register_guide(3, f)", lambda: dg.register_guide(3, KMeansGuide), ("guide name",)),
        ("register_guide('x', 3)", lambda: dg.register_guide("probe-x", 3), ("factory",)),
        ("get_guide(3)", lambda: dg.get_guide(3), ("guide",)),
        ("refine_batch(config='dfc')", lambda: dg.refine_batch([_img()], "dfc"), ("config",)),
        ("refine_batch(seed=2**70)", lambda: dg.refine_batch([_img()], cfg, seed=2**70), ("seed",)),
        ("refine_batch(seed=['a'])", lambda: dg.refine_batch([_img()], cfg, seed=["a"]), ("seed",)),
        ("refine_batch(None)", lambda: dg.refine_batch(None, cfg), ("images",)),
        ("refine_batch(gray image)",
         lambda: dg.refine_batch([np.zeros((4, 4), np.uint8)], cfg), ("images[0]",)),
    ):  # fmt: skip
        cases.append(Case(label, "registry and refine_batch", call, tokens))
    cases += _learned_guide_cases(pool)
    cases += _metric_cases()
    cases += _native_cases()
    return cases


def _learned_guide_cases(pool: dict[str, Path]) -> list[Case]:
    from dynaguide.guidance.diffseg import DiffSegGuide
    from dynaguide.guidance.segformer import SegFormerGuide

    cases = []
    for name in ("garbage.onnx", "big-meta.onnx", "bad-json.onnx", "int-input.onnx", "missing.png",
                 "dir.png", "seg-no-config", "seg-config-list", "seg-bad-json",
                 "seg-garbage-safetensors", "seg-evil-bin", "vit-output.onnx"):  # fmt: skip
        path = pool[name]
        cases.append(Case(
            f"SegFormerGuide({name})", "learned guides",
            lambda p=path: SegFormerGuide(p, device="cpu", verify=False)(_img(16, 16)),
            (str(path),), isolated=name == "big-meta.onnx",
        ))  # fmt: skip
    for name in ("garbage.onnx", "vit-patch0.onnx", "vit-layers.onnx", "vit-output.onnx",
                 "big-meta.onnx", "vit-no-config", "vit-config-list", "vit-garbage-safetensors",
                 "vit-evil-bin"):  # fmt: skip
        path = pool[name]
        cases.append(Case(
            f"DiffSegGuide({name})", "learned guides",
            lambda p=path: DiffSegGuide(p, device="cpu", verify=False, size=64)(_img(16, 16)),
            (str(path),),
        ))  # fmt: skip
    return cases


def _metric_cases() -> list[Case]:
    from dynaguide.eval import metrics as m

    lab = np.zeros((6, 6), np.int32)
    lab[:, 3:] = 1
    bad_maps: dict[str, Any] = {
        "float labels": np.full((6, 6), 0.5),
        "3-D labels": np.zeros((2, 6, 6), np.int32),
        "empty labels": np.zeros((0, 6), np.int32),
        "other shape": np.zeros((5, 7), np.int32),
        "None": None,
        "a string": "labels",
        "complex labels": np.zeros((6, 6), np.complex64),
        "object labels": np.full((6, 6), None, object),
    }
    specs: list[tuple[str, Callable[[Any], Any], tuple[str, ...]]] = [
        ("bsds_image_scores", lambda x: m.bsds_image_scores(x, [lab]), ("prediction",)),
        ("bsds_scores", lambda x: m.bsds_scores([x], [[lab]]), ("prediction", "image 0")),
        ("voc_image_scores", lambda x: m.voc_image_scores(x, lab), ("prediction",)),
        ("voc_scores", lambda x: m.voc_scores([x], [lab]), ("prediction", "image 0")),
        ("coco_scores", lambda x: m.coco_scores([x], [lab], n_classes=2), ("prediction", "image 0")),
        ("coco_scores_per_image_matching",
         lambda x: m.coco_scores_per_image_matching([x], [lab], n_classes=2),
         ("prediction", "image 0")),
        ("segment_best_iou", lambda x: m.segment_best_iou(x, lab), ("prediction",)),
        ("confusion_matrix", lambda x: m.confusion_matrix(x, lab, n_classes=2), ("prediction",)),
        ("relabel_connected_components", lambda x: m.relabel_connected_components(x), ("labels",)),
        ("resize_nearest", lambda x: m.resize_nearest(x, (3, 3)), ("labels",)),
        ("hungarian_match", lambda x: m.hungarian_match(x), ("confusion",)),
    ]  # fmt: skip
    cases = []
    for fname, call, tokens in specs:
        for label, value in bad_maps.items():
            valid = {"hungarian_match": ("other shape", "float labels"),
                     "relabel_connected_components": ("other shape",),
                     "resize_nearest": ("other shape",)}  # fmt: skip
            if label in valid.get(fname, ()):
                continue  # a valid input for this function
            cases.append(Case(f"{fname}({label})", "metrics", lambda c=call, v=value: c(v), tokens))
    params = [
        ("bsds_scores(connectivity=5)", lambda: m.bsds_scores([lab], [[lab]], connectivity=5)),
        ("bsds_scores(connectivity=4.0)", lambda: m.bsds_scores([lab], [[lab]], connectivity=4.0)),
        ("bsds_scores(lengths differ)", lambda: m.bsds_scores([lab, lab], [[lab]])),
        ("bsds_scores(not iterable)", lambda: m.bsds_scores(3, [[lab]])),
        ("bsds_scores(no annotation)", lambda: m.bsds_scores([lab], [[]])),
        ("confusion_matrix(n_classes=0)", lambda: m.confusion_matrix(lab, lab, n_classes=0)),
        ("confusion_matrix(n_classes=1.5)", lambda: m.confusion_matrix(lab, lab, n_classes=1.5)),
        ("coco_scores(n_classes=-1)", lambda: m.coco_scores([lab], [lab], n_classes=-1)),
        ("resize_nearest(shape=(0, 0))", lambda: m.resize_nearest(lab, (0, 0))),
        ("resize_nearest(shape='ab')", lambda: m.resize_nearest(lab, "ab")),
        ("relabel_connected_components(connectivity=6)",
         lambda: m.relabel_connected_components(lab, connectivity=6)),
    ]  # fmt: skip
    tok = ("connectivity", "length", "predictions", "annotation", "n_classes", "shape")
    cases += [Case(n, "metrics", f, tok) for n, f in params]
    return cases


def _native_cases() -> list[Case]:
    import dynaguide as dg

    lab = np.zeros((4, 4), np.int32)
    cases = []
    for label, value in (("float", np.zeros((4, 4))), ("0-D", np.array(3)), ("empty", np.zeros((0, 4), int)),
                         ("a list", [[1, 2]]), ("None", None), ("complex", np.zeros((4, 4), complex))):  # fmt: skip
        cases.append(Case(f"relabel_compact({label})", "native",
                          lambda v=value: dg.relabel_compact(v), ("labels",)))  # fmt: skip
        cases.append(Case(f"connected_components({label})", "native",
                          lambda v=value: dg.connected_components(v), ("labels",)))  # fmt: skip
    for v in (4.0, 6, "8", True, None):
        cases.append(Case(f"connected_components(x, {v!r})", "native",
                          lambda v=v: dg.connected_components(lab, v), ("connectivity",)))  # fmt: skip
    for v in (3, "cuda", "nope"):
        cases.append(Case(f"relabel_compact(x, backend={v!r})", "native",
                          lambda v=v: dg.relabel_compact(lab, backend=v), ("backend",)))  # fmt: skip
    cases.append(Case("connected_components(1-D)", "native",
                      lambda: dg.connected_components(np.zeros(4, int)), ("labels",)))  # fmt: skip
    return cases


def accept_cases(pool: dict[str, Path]) -> list[Case]:
    """Inputs that must give a result."""
    import dynaguide as dg
    from dynaguide.eval import metrics as m

    big = np.full((6, 6), 2**63 + 5, np.uint64)
    big[:, 3:] = 2**63 + 9
    gt = np.zeros((6, 6), np.uint16)
    gt[:, 3:] = 1
    g = np.arange(64, dtype=np.int64).reshape(8, 8) + 2**25
    specs = [
        ("segment(seed=np.int64(3))", lambda: dg.segment(_img(), seed=np.int64(3), max_iter=1)),
        ("segment(max_iter=np.int64(2))", lambda: dg.segment(_img(), max_iter=np.int64(2))),
        ("segment(big-endian uint16)",
         lambda: dg.segment(np.zeros((8, 8, 3), ">u2"), max_iter=1, guidance=None)),
        ("segment((H, W, 1) guidance, scale 0.5)",
         lambda: dg.segment(_img(), guidance=np.zeros((8, 8, 1), int), scale=0.5, max_iter=1)),
        ("segment(guide ids above 2**24, scale 0.5)",
         lambda: _check_ids(dg.segment(_img(), guidance=g, scale=0.5, max_iter=1))),
        ("bsds_scores(uint64 >= 2**63)", lambda: m.bsds_scores([big], [[gt]])),
        ("connected_components(np.int64(4))",
         lambda: dg.connected_components(np.zeros((3, 3), int), np.int64(4))),
        ("segment_batch(batch_size=np.int64(1))",
         lambda: dg.segment_batch([_img()], max_iter=1, batch_size=np.int64(1))),
        ("RefineConfig(max_iter=np.int64(5))", lambda: dg.RefineConfig(max_iter=np.int64(5))),
        ("segment(235-character name)", lambda: _long_name_save(pool)),
    ]  # fmt: skip
    return [Case(n, "accepted inputs", f, (), kind="accept") for n, f in specs]


def _check_ids(seg: Any) -> Any:
    n = len(np.unique(seg.guide_labels))
    if n != 16:
        raise AssertionError(f"guide ids merged by the resize: {n} distinct of 16")
    return seg


def _long_name_save(pool: dict[str, Path]) -> Any:
    import dynaguide as dg

    seg = dg.segment(_img(), max_iter=1, guidance=None)
    return seg.save(pool["good.png"].parent / "long-names", "s" * 235)


def cli_cases(pool: dict[str, Path], work: Path) -> list[Case]:
    """``dynaguide`` command lines, each in a fresh folder with user files to protect."""
    from PIL import Image

    cases: list[Case] = []
    n = 0

    def folder_with_inputs(tag: str, names: tuple[str, ...] = ("a.png", "b.png")) -> Path:
        d = work / tag / "in"
        d.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            Image.fromarray(_img(10, 12, i)).save(d / name)
        return d

    def add(label: str, argv_of: Callable[[Path], list[str]], tokens: tuple[str, ...],
            names: tuple[str, ...] = ("a.png", "b.png"),
            prepare: Callable[[Path], list[Path]] | None = None) -> None:  # fmt: skip
        nonlocal n
        n += 1
        src = folder_with_inputs(f"cli{n}", names)
        extra = prepare(src) if prepare is not None else []
        user = (*sorted(src.iterdir()), *extra)
        cases.append(Case(label, "cli", lambda: _run_cli(argv_of(src)), tokens, kind="cli",
                          user_files=tuple(p for p in user if p.is_file())))  # fmt: skip

    quick = ["--max-iter", "1", "--quiet"]
    add("segment IN IN", lambda s: ["segment", str(s), str(s), *quick], ("OUT",))
    add("segment IN IN/sub", lambda s: ["segment", str(s), str(s / "sub"), *quick], ("OUT",))
    add("segment IN IN/. (same folder, other spelling)",
        lambda s: ["segment", str(s), str(s / "."), *quick], ("OUT",))  # fmt: skip
    add("segment with a.png and A.PNG", lambda s: ["segment", str(s), str(s.parent / "o"), *quick],
        ("a.png", "A.PNG"), names=("a.png", "A.PNG"))  # fmt: skip

    def user_json(src: Path) -> list[Path]:
        out = src.parent / "o"
        out.mkdir()
        (out / "a.json").write_text('{"mine": true}\n')
        (out / "b.labels.png").write_bytes(b"my own file")
        return [out / "a.json", out / "b.labels.png"]

    add("segment into OUT holding user's a.json and b.labels.png",
        lambda s: ["segment", str(s), str(s.parent / "o"), *quick], ("a.json", "b.labels.png"),
        prepare=user_json)  # fmt: skip

    def own_outputs(src: Path) -> list[Path]:
        import dynaguide.cli as cli

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli.main(["segment", str(src), str(src.parent / "o"), *quick])
        return []

    add("segment OUT-of-an-earlier-run OUT2 (only dynaguide's files)",
        lambda s: ["segment", str(s.parent / "o"), str(s.parent / "o2"), *quick], ("o",),
        prepare=own_outputs)  # fmt: skip
    for label, argv in (
        ("segment missing IN", lambda s: ["segment", str(s / "nope"), str(s.parent / "o")]),
        ("segment IN = symlink loop",
         lambda s: ["segment", str(pool["loop.png"]), str(s.parent / "o")]),
        ("segment OUT is a file", lambda s: ["segment", str(s), str(s / "a.png")]),
        ("segment --max-iter 0", lambda s: ["segment", str(s), str(s.parent / "o"), "--max-iter", "0"]),
        ("segment --scale 2", lambda s: ["segment", str(s), str(s.parent / "o"), "--scale", "2"]),
        ("segment --seed x", lambda s: ["segment", str(s), str(s.parent / "o"), "--seed", "x"]),
        ("segment --device tpu", lambda s: ["segment", str(s), str(s.parent / "o"), "--device", "tpu"]),
        ("segment --guidance nope", lambda s: ["segment", str(s), str(s.parent / "o"), "--guidance", "nope"]),
        ("segment --preset nope", lambda s: ["segment", str(s), str(s.parent / "o"), "--preset", "nope"]),
        ("segment --guide-option novalue",
         lambda s: ["segment", str(s), str(s.parent / "o"), "--guide-option", "novalue"]),
        ("segment --guide-option n_clusters=-3",
         lambda s: ["segment", str(s), str(s.parent / "o"), "--guide-option", "n_clusters=-3", *quick]),
    ):  # fmt: skip
        add(label, argv, ("IN", "OUT", "argument", "--", "n_clusters", "loop", "nope"))
    add("segment folder with a corrupt file",
        lambda s: ["segment", str(s), str(s.parent / "o"), *quick], ("c.png",),
        prepare=lambda s: ((s / "c.png").write_bytes(b"corrupt"), [])[1])  # fmt: skip

    for name in ("garbage.pt", "evil.pt", "nokeys.pt", "list.pt", "mismatch.pt", "bogus-key.pt",
                 "huge.pt", "missing.png"):  # fmt: skip
        add(f"export refine-net {name}",
            lambda s, nm=name: ["export", "refine-net", str(pool[nm]), str(s.parent / "x.onnx")],
            (str(pool[name]),))  # fmt: skip
    for kind, prefix in (("segformer", "seg"), ("vit-attention", "vit")):
        for case in ("no-config", "config-list", "bad-json", "garbage-safetensors", "evil-bin"):
            key = f"{prefix}-{case}"
            add(f"export {kind} {key}",
                lambda s, k=key, kd=kind: ["export", kd, str(pool[k]), str(s.parent / "x.onnx")],
                (str(pool[key]),))  # fmt: skip
    add("export refine-net --atol nan",
        lambda s: ["export", "refine-net", str(pool["good.pt"]), str(s.parent / "x.onnx"),
                   "--atol", "nan"], ("atol",))  # fmt: skip

    def bsds(src: Path) -> list[Path]:
        root = src.parent / "bsds"
        (root / "images").mkdir(parents=True)
        (root / "gt").mkdir()
        Image.fromarray(_img(10, 12)).save(root / "images" / "1.jpg")
        (root / "gt" / "1.npz").write_bytes(b"not an npz")
        return []

    for label, argv in (
        ("eval missing folder", lambda s: ["eval", "bsds500", str(s / "nope")]),
        ("eval a file", lambda s: ["eval", "bsds500", str(s / "a.png")]),
        ("eval an image folder", lambda s: ["eval", "bsds500", str(s)]),
        ("eval --connectivity 5", lambda s: ["eval", "bsds500", str(s), "--connectivity", "5"]),
    ):
        add(label, argv, ("nope", "a.png", str(Path("in")), "connectivity", "images", "gt"))
    add("eval bsds500 with a corrupt annotation",
        lambda s: ["eval", "bsds500", str(s.parent / "bsds"), "--max-iter", "1", "--no-progress",
                   "--out", str(s.parent / "eval")], ("1",), prepare=bsds)  # fmt: skip
    for label, argv in (("bench --device tpu", ["bench", "--device", "tpu"]),
                        ("bench --sections nope", ["bench", "--sections", "nope", "--tiny"]),
                        ("bench --batch-size 0", ["bench", "--batch-size", "0"])):  # fmt: skip
        add(label, lambda s, a=argv: list(a), ("tpu", "nope", "batch-size", "sections"))
    return cases


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    import dynaguide.cli as cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- running


def _digest(paths: tuple[Path, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in paths:
        try:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError:
            out[str(p)] = None
    return out


class _Hung(BaseException):
    """Raised by SIGALRM in a case that does not return."""


def _hung(signum: int, frame: Any) -> None:
    raise _Hung


def classify(case: Case) -> dict[str, Any]:
    """Run ``case`` in this process and say what happened."""
    try:
        from dynaguide.errors import DOCUMENTED_ERRORS
    except ImportError:  # a dynaguide from before dynaguide.errors: its documented types
        DOCUMENTED_ERRORS = (ValueError, TypeError, KeyError, OSError, MemoryError)

    before = _digest(case.user_files)
    t0 = time.perf_counter()
    caught: list[warnings.WarningMessage] = []
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(CASE_TIMEOUT)  # e.g. opening a FIFO blocks forever
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = case.call()
        error = None
    except _Hung:
        return {"outcome": "raw", "detail": f"still running after {CASE_TIMEOUT} s (hung)"}
    except DOCUMENTED_ERRORS as exc:
        value, error = None, exc
    except BaseException as exc:  # classified, not hidden
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {"outcome": "raw", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - t0
    lost = _digest(case.user_files) != before
    if lost:
        return {"outcome": "lost", "detail": "a user file changed or disappeared"}
    if case.kind == "accept":
        detail = "" if error is None else f"{type(error).__name__}: {error}"[:300]
        return {"outcome": "accepted" if error is None else "refused", "detail": detail}
    if error is not None:
        msg = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        named = any(t in msg for t in case.tokens)
        outcome = "clear" if named else "raw"
        return {"outcome": outcome, "detail": f"{type(error).__name__}: {msg}"[:300],
                "seconds": round(seconds, 3)}  # fmt: skip
    if case.kind == "skip":
        messages = " | ".join(str(w.message) for w in caught)
        ok = isinstance(value, list) and value[1] is None and value[0] is not None
        ok = ok and any(t in messages for t in case.tokens)
        return {"outcome": "clear" if ok else "silent", "detail": messages[:300]}
    if case.kind == "cli":
        rc, _out, err = value
        named = any(t in err for t in case.tokens)
        if "Traceback" in err:
            return {"outcome": "raw", "detail": err[-300:]}
        if rc in (1, 2) and named:
            return {"outcome": "clear", "detail": f"rc={rc}: {err.strip()[:300]}"}
        return {
            "outcome": "silent" if rc == 0 else "raw",
            "detail": f"rc={rc}: {err.strip()[:300]}",
        }
    return {"outcome": "silent", "detail": f"returned {type(value).__name__}"}


def run_isolated(case_id: str, pool_dir: Path) -> dict[str, Any]:
    """Run one case in a subprocess under an address-space limit; peak RSS is reported."""
    cmd = [sys.executable, __file__, "--one", case_id, "--pool", str(pool_dir)]
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        return {"outcome": "raw", "detail": "timed out after 300 s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"outcome": "raw", "detail": f"exit {proc.returncode}: {proc.stderr[-300:]}"}
    rec = json.loads(lines[-1])
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def all_cases(pool: dict[str, Path], work: Path, *, cli: bool = True) -> list[Case]:
    """Every case: API, accepted inputs, isolated resource bombs and (``cli``) the CLI."""
    from dynaguide.export.refine import export_refine_net

    import dynaguide as dg
    from dynaguide.io import load_image

    bombs = [] if "bomb-13000.png" not in pool else [
        Case("load_image(bomb-13000.png)", "resource bombs",
             lambda: load_image(pool["bomb-13000.png"]), (str(pool["bomb-13000.png"]),),
             isolated=True),
        Case("segment(bomb-13000.png, scale=0.001)", "resource bombs",
             lambda: dg.segment(str(pool["bomb-13000.png"]), scale=0.001, max_iter=1),
             (str(pool["bomb-13000.png"]),), isolated=True),
        Case("export_refine_net(huge.pt: n_channels=20000)", "resource bombs",
             lambda: export_refine_net(pool["huge.pt"], work / "huge.onnx"),
             (str(pool["huge.pt"]),), isolated=True),
    ]  # fmt: skip
    return [*api_cases(pool), *accept_cases(pool), *bombs, *(cli_cases(pool, work) if cli else [])]


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ISOLATED_LIMIT, ISOLATED_LIMIT))


def main(argv: list[str] | None = None) -> int:
    """Run the table (or ``--one CASE`` inside a subprocess); returns 0."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="skip the isolated resource bombs")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pool", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import tempfile

    if args.one is not None:
        _limit_memory()
        with tempfile.TemporaryDirectory() as work:
            cases = all_cases(build_pool(args.pool), Path(work), cli=False)
            rec = classify({c.id: c for c in cases}[args.one])
            rec["peak_rss_gib"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3
            )
            print(json.dumps(rec))
        return 0

    with contextlib.ExitStack() as stack:
        scratch = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        pool = build_pool(scratch / "pool")
        cases = all_cases(pool, scratch / "work")
        results = []
        t0 = time.perf_counter()
        for case in cases:
            if case.isolated and args.quick:
                continue
            rec = run_isolated(case.id, scratch / "pool") if case.isolated else classify(case)
            results.append({"id": case.id, "group": case.group, "kind": case.kind, **rec})
        seconds = time.perf_counter() - t0
    table = summarize(results)
    report = {
        "command": " ".join(["python benchmarks/bad_inputs.py", *(argv or sys.argv[1:])]),
        "seconds": round(seconds, 1),
        "table": table,
        "by_group": {
            g: summarize([r for r in results if r["group"] == g])
            for g in dict.fromkeys(r["group"] for r in results)
        },
        "cases": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bad-inputs.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(table, indent=2))
    for r in results:
        if r["outcome"] not in ("clear", "accepted"):
            print(f"  {r['outcome']:>8}  {r['id']}: {r.get('detail', '')}")
    print(f"wrote {path} ({seconds:.0f} s)")
    return 0


def summarize(results: list[dict[str, Any]]) -> dict[str, int]:
    """Counts per outcome: the bad inputs tried and the must-accept inputs."""
    bad = [r for r in results if r["kind"] != "accept"]
    good = [r for r in results if r["kind"] == "accept"]
    count = lambda rs, o: sum(r["outcome"] == o for r in rs)  # noqa: E731
    return {
        "bad_inputs_tried": len(bad),
        "clear_errors": count(bad, "clear"),
        "raw_exceptions": count(bad, "raw"),
        "silent_results": count(bad, "silent"),
        "files_lost": count(bad, "lost"),
        "must_accept_tried": len(good),
        "accepted": count(good, "accepted"),
        "refused": count(good, "refused"),
    }


if __name__ == "__main__":
    sys.exit(main())
