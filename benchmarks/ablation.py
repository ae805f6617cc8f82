"""Quality ablation on BSDS500: refinement candidates x post-processing, paired per image.

    python benchmarks/ablation.py segment --data DIR --limit 50 --out RUNS CANDIDATE...
    python benchmarks/ablation.py score   --data DIR --limit 50 --out RUNS --json FILE \\
        --candidates CANDIDATE... --post POST... [--baseline CAND/POST ...]

``segment`` (slow) writes each candidate's full-size labels, before any post-processing,
to ``RUNS/<candidate>/<id>.npz`` (resumable: images already there are skipped).
``score`` (fast) applies every post-processing setting to every cached map, scores it
with the standard BSDS500 benchmark (Covering, PRI, VoI, boundary F) and segment-best-IoU
(All / Fine / Coarse), and prints and writes dataset scores plus paired per-image
differences against each ``--baseline`` (mean and standard error over images).

A candidate is a name from ``CANDIDATES`` below: a guide alone (``alone:<guide>``, the
guide's labels at full size, no network) or a refinement (preset, guide, overrides).
A post-processing setting is ``raw`` (labels as they are), ``cc`` (8-connected regions),
``a<fraction>`` (regions below that fraction of the image merged into their
closest-colour neighbour), with ``+c<t>`` (colour region-graph merging, threshold t) or
``+b<t>`` (boundary-strength merging) appended; a ``crf+`` prefix first runs 10 mean-field
iterations of the dense CRF on a one-hot unary of the labels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dynaguide.build_info import build_commit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "bsds500" / "val"

# Working size of the CPU protocol: ~0.05 MP (481x321 -> 274x183).
_WORK = {"work_pixels": 50_000, "upsample": "nearest"}
_SMALL = {"n_channels": 32, **_WORK}
_FELZ = {"scale": 300.0, "sigma": 0.8, "min_size": 20}
# Felzenszwalb as a guide at the working size: few enough segments for 32 channels.
_FELZ_WORK = {"scale": 300.0, "sigma": 0.8, "min_size": 250}

#: name -> settings. ``alone`` candidates have only a guide; the others call dg.segment.
CANDIDATES: dict[str, dict[str, Any]] = {
    "alone:kmeans": {"guide": "kmeans"},
    "alone:felz300": {"guide": "felzenszwalb", "guide_options": _FELZ},
    "alone:felz100": {"guide": "felzenszwalb", "guide_options": {**_FELZ, "scale": 100.0}},
    "alone:felz750": {"guide": "felzenszwalb", "guide_options": {**_FELZ, "scale": 750.0}},
    "alone:felz200": {"guide": "felzenszwalb", "guide_options": {**_FELZ, "scale": 200.0}},
    "alone:felz500": {"guide": "felzenszwalb", "guide_options": {**_FELZ, "scale": 500.0}},
    "alone:slic100": {"guide": "slic"},
    # the paper presets at the working size (100 channels), 100 iterations
    "dynaguide:kmeans": {"preset": "dynaguide", "guide": "kmeans", "max_iter": 100, **_WORK},
    "dfc:none": {"preset": "dfc", "guide": None, "max_iter": 100, **_WORK},
    # small network (32 channels), 60 iterations
    "s32:kmeans": {"preset": "dynaguide", "guide": "kmeans", "max_iter": 60, **_SMALL},
    "s32:felz300": {
        "preset": "dynaguide",
        "guide": "felzenszwalb",
        "guide_options": _FELZ,
        "max_iter": 60,
        **_SMALL,
    },
    "s32:felzw": {
        "preset": "dynaguide",
        "guide": "felzenszwalb",
        "guide_options": _FELZ_WORK,
        "max_iter": 60,
        **_SMALL,
    },
    "s32:felzw-anneal": {
        "preset": "dynaguide",
        "guide": "felzenszwalb",
        "guide_options": _FELZ_WORK,
        "max_iter": 60,
        "guidance_anneal": 40,
        **_SMALL,
    },
    "s32:felzw-lab-xy": {
        "preset": "dynaguide",
        "guide": "felzenszwalb",
        "guide_options": _FELZ_WORK,
        "max_iter": 60,
        "input_features": "rgb+lab+xy",
        **_SMALL,
    },
    "s32:felzw-conv": {
        "preset": "dynaguide",
        "guide": "felzenszwalb",
        "guide_options": _FELZ_WORK,
        "max_iter": 100,
        "convergence_tol": 0.01,
        "convergence_window": 10,
        **_SMALL,
    },
    "s32:felzw-bilinear": {
        "preset": "dynaguide",
        "guide": "felzenszwalb",
        "guide_options": _FELZ_WORK,
        "max_iter": 60,
        **_SMALL,
        "upsample": "bilinear",
    },
    "p100:felzw": {
        "preset": "dynaguide",
        "guide": "felzenszwalb",
        "guide_options": _FELZ_WORK,
        "max_iter": 60,
        **_WORK,
    },
    "s32:none": {"preset": "dynaguide", "guide": None, "max_iter": 60, **_SMALL},
    "s32:kmeans-anneal": {
        "preset": "dynaguide",
        "guide": "kmeans",
        "max_iter": 60,
        "guidance_anneal": 40,
        **_SMALL,
    },
    "s32:kmeans-margin": {
        "preset": "dynaguide",
        "guide": "kmeans",
        "max_iter": 60,
        "guide_margin": 1,
        **_SMALL,
    },
    "s32:kmeans-lab-xy": {
        "preset": "dynaguide",
        "guide": "kmeans",
        "max_iter": 60,
        "input_features": "rgb+lab+xy",
        **_SMALL,
    },
    "s32:kmeans-bilinear": {
        "preset": "dynaguide",
        "guide": "kmeans",
        "max_iter": 60,
        **_SMALL,
        "upsample": "bilinear",
    },
    "s32:kmeans8": {
        "preset": "dynaguide",
        "guide": "kmeans",
        "guide_options": {"n_clusters": 8},
        "max_iter": 60,
        **_SMALL,
    },
    # issue 9, round 2: adaptive k-means K, DFC's superpixel vote, multi-seed consensus
    "alone:kmeans-auto": {"guide": "kmeans", "guide_options": {"n_clusters": "auto"}},
    "s32:kmeans-auto": {
        "preset": "dynaguide",
        "guide": "kmeans",
        "guide_options": {"n_clusters": "auto"},
        "max_iter": 60,
        **_SMALL,
    },
    "s32:kmeans12": {
        "preset": "dynaguide",
        "guide": "kmeans",
        "guide_options": {"n_clusters": 12},
        "max_iter": 60,
        **_SMALL,
    },
    "s32:slic-vote": {
        "preset": "dynaguide",
        "guide": "slic",
        "guide_options": {"n_segments": 400, "compactness": 10.0},
        "alignment": "vote",
        "max_iter": 60,
        **_SMALL,
    },
    "s32:felzw-vote": {
        "preset": "dynaguide",
        "guide": "felzenszwalb",
        "guide_options": _FELZ_WORK,
        "alignment": "vote",
        "max_iter": 60,
        **_SMALL,
    },
    "s32:felzw-margin": {
        "preset": "dynaguide",
        "guide": "felzenszwalb",
        "guide_options": _FELZ_WORK,
        "guide_margin": 1,
        "max_iter": 60,
        **_SMALL,
    },
    # amp on CPU: hidden 3x3 convolutions in bf16 (quality check of the faster path)
    "s32:felzw-amp": {
        "preset": "dynaguide",
        "guide": "felzenszwalb",
        "guide_options": _FELZ_WORK,
        "max_iter": 60,
        "amp": True,
        **_SMALL,
    },
    "s32:kmeans-seeds3": {
        "preset": "dynaguide",
        "guide": "kmeans",
        "max_iter": 60,
        "seeds": [0, 1, 2],
        **_SMALL,
    },
}

# SmooSeg as a guide: a head trained on BSDS500 train with the weight-free backbone
# (`dynaguide smooseg train .../train/images RUN --n-classes 8 --steps 1000 --batch-size 16`),
# its checkpoint named by the environment variable below.
_SMOOSEG = {"checkpoint": os.environ.get("ABLATION_SMOOSEG_CHECKPOINT", "smooseg/checkpoint.pt")}
CANDIDATES["alone:smooseg"] = {"guide": "smooseg", "guide_options": _SMOOSEG}
CANDIDATES["s32:smooseg"] = {
    "preset": "dynaguide",
    "guide": "smooseg",
    "guide_options": _SMOOSEG,
    "max_iter": 60,
    **_SMALL,
}


# The paper presets at a tenth of a megapixel's tenth (0.01 MP: 481x321 -> 122x81), 100
# iterations, each preset's own stopping rules and its guide's default settings.
for _preset in ("dfc", "dynaseg-scf", "dynaseg-fsf", "dynaguide"):
    for _guide in ("none", "kmeans", "felzenszwalb"):
        CANDIDATES[f"paper:{_preset}:{_guide}"] = {
            "preset": _preset,
            "guide": None if _guide == "none" else _guide,
            "max_iter": 100,
            "work_pixels": 10_000,
        }


def _items(data: Path, limit: int | None) -> list[str]:
    ids = sorted(p.stem for p in (data / "images").glob("*.jpg"))
    return ids[:limit] if limit else ids


def _run_candidate(name: str, spec: dict[str, Any], rgb: np.ndarray) -> dict[str, Any]:
    import dynaguide as dg
    from dynaguide.guidance import get_guide

    t0 = time.perf_counter()
    if name.startswith("alone:"):
        labels = get_guide(spec["guide"], **spec.get("guide_options", {}))(rgb)
        return {"labels": labels, "seconds": time.perf_counter() - t0, "n_iter": 0}
    skip = ("preset", "guide", "guide_options", "seeds")
    overrides = {k: v for k, v in spec.items() if k not in skip}
    segs = [
        dg.segment(
            rgb,
            preset=spec["preset"],
            guidance=spec["guide"],
            guidance_options=spec.get("guide_options"),
            seed=seed,
            **overrides,
        )
        for seed in spec.get("seeds", [0])
    ]
    labels = segs[0].labels if len(segs) == 1 else consensus([s.labels for s in segs])
    return {
        "labels": labels,
        "seconds": time.perf_counter() - t0,
        "n_iter": sum(s.n_iter for s in segs),
        "stop": segs[0].stop_reason,
    }


def consensus(maps: list[np.ndarray]) -> np.ndarray:
    """Per-pixel majority of several label maps of one image (multi-seed consensus).

    Each map's labels are matched to the first map's by a Hungarian assignment on their
    overlap (unmatched labels get fresh ids), then each pixel takes the label most maps
    agree on; ties go to the first map.
    """
    from scipy.optimize import linear_sum_assignment

    ref = np.asarray(maps[0], dtype=np.int64)
    n_ref = int(ref.max()) + 1
    aligned = [ref]
    for m in maps[1:]:
        m = np.asarray(m, dtype=np.int64)
        n_m = int(m.max()) + 1
        overlap = np.bincount(m.ravel() * n_ref + ref.ravel(), minlength=n_m * n_ref)
        rows, cols = linear_sum_assignment(overlap.reshape(n_m, n_ref), maximize=True)
        mapping = np.arange(n_m, dtype=np.int64) + n_ref  # unmatched: ids after the first's
        mapping[rows] = cols
        aligned.append(mapping[m])
    stack = np.stack(aligned)
    best, best_votes = stack[0], (stack == stack[0]).sum(axis=0)
    for s in stack[1:]:
        votes = (stack == s).sum(axis=0)
        take = votes > best_votes
        best, best_votes = np.where(take, s, best), np.where(take, votes, best_votes)
    return best


def segment(args: argparse.Namespace) -> int:
    """Stage 1: cache each candidate's full-size labels."""
    from dynaguide.io import load_image

    ids = _items(args.data, args.limit)
    shard, n_shards = (int(v) for v in args.shard.split("/"))
    ids = ids[shard::n_shards]
    for name in args.candidates:
        if name not in CANDIDATES:
            raise SystemExit(f"unknown candidate {name!r}; known: {', '.join(CANDIDATES)}")
    for name in args.candidates:
        folder = args.out / name.replace(":", "__")
        folder.mkdir(parents=True, exist_ok=True)
        for i in ids:
            path = folder / f"{i}.npz"
            if path.exists():
                continue
            rgb = load_image(args.data / "images" / f"{i}.jpg")
            r = _run_candidate(name, CANDIDATES[name], rgb)
            tmp = folder / f".{i}.tmp.npz"
            np.savez_compressed(
                tmp,
                labels=r["labels"].astype(np.int32),
                seconds=r["seconds"],
                n_iter=r["n_iter"],
                stop=r.get("stop", ""),
            )
            os.replace(tmp, path)
            print(f"{name} {i} {r['seconds']:.1f}s", flush=True)
    return 0


def parse_post(text: str) -> dict[str, Any]:
    """Post-processing keywords of :func:`dynaguide.postprocess.postprocess` from a name."""
    if text == "raw":
        return {"connectivity": 0}
    if text == "cc":
        return {"connectivity": 8}
    out: dict[str, Any] = {"connectivity": 8}
    for part in text.split("+"):
        if part == "crf":
            out["crf_iterations"] = 10
        elif part.startswith("a"):
            out["min_area"] = float(part[1:])
        elif part.startswith("c"):
            out["merge"], out["threshold"] = "colour", float(part[1:])
        elif part.startswith("b"):
            out["merge"], out["threshold"] = "boundary", float(part[1:])
        else:
            raise SystemExit(f"bad post-processing {text!r}")
    return out


def _score_one(labels: np.ndarray, rgb: np.ndarray, gts: list[np.ndarray], post: str) -> dict:
    from dynaguide.eval.bsds_benchmark import standard_image_scores
    from dynaguide.eval.metrics import bsds_image_scores
    from dynaguide.postprocess import postprocess

    t0 = time.perf_counter()
    out = postprocess(labels, rgb, **parse_post(post))
    post_s = time.perf_counter() - t0
    std = standard_image_scores(out, gts)
    sb = bsds_image_scores(out, gts, connected_components=False)
    return {
        "std": std,
        "sbiou": {k: sb[k] for k in ("All", "Fine", "Coarse")},
        "sbiou_sums": sb["sums"],
        "sbiou_counts": sb["counts"],
        "n_segments": int(out.max()) + 1,
        "post_seconds": post_s,
    }


def _dataset(records: list[dict]) -> dict[str, Any]:
    from dynaguide.eval.bsds_benchmark import standard_scores

    std = standard_scores([r["std"] for r in records])
    sb = {
        m: sum(r["sbiou_sums"][m] for r in records)
        / max(1, sum(r["sbiou_counts"][m] for r in records))
        for m in ("All", "Fine", "Coarse")
    }
    return {
        "covering": std["covering"],
        "pri": std["pri"],
        "voi": std["voi"],
        "voi_bits": std["voi"] / math.log(2),
        "f": std["f"],
        "sbiou_all": sb["All"],
        "sbiou_fine": sb["Fine"],
        "sbiou_coarse": sb["Coarse"],
        "segments": float(np.mean([r["n_segments"] for r in records])),
        "seconds": float(np.mean([r["seconds"] for r in records])),
    }


def _per_image(r: dict, metric: str) -> float:
    if metric.startswith("sbiou_"):
        return r["sbiou"][metric[6:].capitalize()]
    return float(r["std"][metric])


PAIRED = ("covering", "pri", "voi", "f", "sbiou_all")


def paired(a: list[dict], b: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and standard error over images of the per-image difference a - b."""
    out = {}
    for m in PAIRED:
        d = np.array([_per_image(x, m) - _per_image(y, m) for x, y in zip(a, b, strict=True)])
        out[m] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d)))}
    return out


def _score_images(args: argparse.Namespace, ids: list[str]) -> dict[str, list[dict]]:
    """Per-image records of every candidate x post-processing over this shard of ``ids``."""
    from dynaguide.eval.datasets import load_bsds_annotations
    from dynaguide.io import load_image

    shard, n_shards = (int(v) for v in args.shard.split("/"))
    table: dict[str, list[dict]] = {}
    for i in ids[shard::n_shards]:
        rgb = load_image(args.data / "images" / f"{i}.jpg")
        gts = load_bsds_annotations(args.data / "gt" / f"{i}.npz")
        for cand in args.candidates:
            cached = np.load(args.out / cand.replace(":", "__") / f"{i}.npz")
            for post in args.post:
                rec = _score_one(cached["labels"], rgb, gts, post)
                rec["seconds"] = float(cached["seconds"]) + rec["post_seconds"]
                rec["n_iter"] = int(cached["n_iter"])
                rec["id"] = i
                table.setdefault(f"{cand}/{post}", []).append(rec)
        print(i, file=sys.stderr, flush=True)
    return table


def _merge_parts(parts: list[Path], ids: list[str]) -> dict[str, list[dict]]:
    """Per-image records of several ``--part`` files, in the order of ``ids``."""
    merged: dict[str, dict[str, dict]] = {}
    for part in parts:
        for key, recs in json.loads(part.read_text()).items():
            merged.setdefault(key, {}).update({r["id"]: r for r in recs})
    table = {}
    for key, by_id in merged.items():
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise SystemExit(f"{key}: no record for {len(missing)} images, e.g. {missing[0]}")
        table[key] = [by_id[i] for i in ids]
    return table


def score(args: argparse.Namespace) -> int:
    """Stage 2: post-process, score (or merge scored parts), compare."""
    ids = _items(args.data, args.limit)
    if args.merge:
        table = _merge_parts(args.merge, ids)
    else:
        table = _score_images(args, ids)
        if args.part:
            args.part.write_text(json.dumps(table))
            return 0
    rows = {key: _dataset(recs) for key, recs in table.items()}
    comparisons = {}
    for base in args.baseline:
        if base not in table:
            raise SystemExit(f"baseline {base!r} is not among the scored runs")
        comparisons[base] = {k: paired(table[k], table[base]) for k in table if k != base}
    print(f"{'run':44s} {'Cov':>6s} {'PRI':>6s} {'VoIbit':>6s} {'F':>6s} {'All':>6s} {'Fine':>6s} "
          f"{'Coarse':>6s} {'segs':>6s} {'s/img':>6s}")  # fmt: skip
    for key, r in sorted(rows.items(), key=lambda kv: -kv[1]["covering"]):
        print(
            f"{key:44s} {r['covering']:6.3f} {r['pri']:6.3f} {r['voi_bits']:6.3f} {r['f']:6.3f} "
            f"{r['sbiou_all']:6.3f} {r['sbiou_fine']:6.3f} {r['sbiou_coarse']:6.3f} "
            f"{r['segments']:6.1f} {r['seconds']:6.2f}"
        )
    for base, comp in comparisons.items():
        print(f"\npaired differences against {base} (mean +- standard error over images)")
        for key, c in comp.items():
            cells = " ".join(f"{m} {c[m]['mean']:+.3f}±{c[m]['se']:.3f}" for m in PAIRED)
            print(f"  {key:44s} {cells}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": "python " + " ".join(sys.argv),
            "commit": build_commit(),
            "machine": platform.processor() or platform.machine(),
            "data": str(args.data),
            "n_images": len(ids),
            "ids": ids,
            "candidates": {c: CANDIDATES[c] for c in args.candidates},
            "post": {p: parse_post(p) for p in args.post},
            "scores": rows,
            "paired": comparisons,
            "per_image": {
                k: [
                    {
                        "id": r["id"],
                        **{m: _per_image(r, m) for m in PAIRED},
                        "segments": r["n_segments"],
                        "seconds": r["seconds"],
                    }
                    for r in recs
                ]
                for k, recs in table.items()
            },
        }
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``segment`` or ``score``."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("segment", "score"):
        p = sub.add_parser(cmd)
        p.add_argument("--data", type=Path, default=DEFAULT_DATA)
        p.add_argument("--limit", type=int, default=None)
        p.add_argument("--out", type=Path, required=True)
        if cmd == "segment":
            p.add_argument("candidates", nargs="+")
            p.add_argument("--shard", default="0/1", help="I/N: every N-th image from the I-th")
        else:
            p.add_argument("--candidates", nargs="+", required=True)
            p.add_argument("--post", nargs="+", default=["raw", "cc"])
            p.add_argument("--baseline", nargs="*", default=[])
            p.add_argument("--json", type=Path, default=None)
            p.add_argument("--shard", default="0/1", help="I/N: score every N-th image only")
            p.add_argument("--part", type=Path, default=None, help="write this shard's records")
            p.add_argument("--merge", type=Path, nargs="*", default=None, help="merge parts")
    args = ap.parse_args(argv)
    return segment(args) if args.cmd == "segment" else score(args)


if __name__ == "__main__":
    raise SystemExit(main())
