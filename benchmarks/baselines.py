"""Classic segmenters alone on BSDS500 val, scored with the standard benchmark.

    OMP_NUM_THREADS=1 python benchmarks/baselines.py [--data DIR] [--limit N] [--out FILE]
        [--workers 0|1] [--methods felzenszwalb,slic,...] [--knobs METHOD=V1,V2 ...]

Each method sweeps one knob; every setting is scored raw and after 8-connected
relabelling (``relabel_connected_components``) with Segmentation Covering, PRI, VoI and
boundary P / R / F (:mod:`dynaguide.eval.bsds_benchmark`), reported as ODS (one knob
value for the dataset, per measure) and OIS (best value per image), plus the
segment-best-IoU All / Fine / Coarse of every setting. Two calibration rows: one single
segment per image, and each annotator scored against the others (human leave-one-out).
The published values (Arbeláez et al., TPAMI 2011, BSDS500 test, ODS) are printed beside
them, marked published. Writes one JSON (command, commit, versions, every figure).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dynaguide.build_info import build_commit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "bsds500" / "val"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality" / "baselines-bsds500-val.json"

#: knob name, knob values and the fixed parameters of every method.
METHODS: dict[str, dict[str, Any]] = {
    "felzenszwalb": {
        "knob": "scale",
        "values": [50, 100, 200, 300, 500, 750, 1000, 1500, 2000],
        "params": {"sigma": 0.8, "min_size": 20},
    },
    "slic": {
        "knob": "n_segments",
        "values": [5, 10, 25, 50, 100, 200, 400],
        "params": {"compactness": 10.0, "sigma": 1.0, "space": "CIE-LAB (skimage default)"},
    },
    "quickshift": {
        "knob": "kernel_size",
        "values": [3, 5, 7],
        "params": {"ratio": 0.5, "max_dist": "2 x kernel_size", "sigma": 0, "space": "CIE-LAB"},
    },
    "kmeans": {
        "knob": "k",
        "values": list(range(2, 13)),
        "params": {"space": "CIE-LAB", "sample": 20000, "n_init": 4, "seed": 42},
    },
}

PUBLISHED = {
    "source": "published (Arbeláez et al. TPAMI 2011, BSDS500 test, ODS)",
    "rows": {
        "gPb-owt-ucm": {"covering": 0.59, "pri": 0.83, "voi": 1.69, "f": 0.73},
        "Mean Shift": {"covering": 0.54, "pri": 0.79, "voi": 1.85, "f": 0.64},
        "Felzenszwalb-Huttenlocher": {"covering": 0.52, "pri": 0.80, "voi": 2.21, "f": 0.61},
        "NCuts": {"covering": 0.45, "pri": 0.78, "voi": 2.23, "f": 0.64},
        "human": {"covering": 0.72, "pri": 0.88, "voi": 1.17, "f": None},
    },
}


def segmenter(method: str, value: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The label-map function of ``method`` at knob ``value`` (fixed parameters above)."""
    from dynaguide.guidance.classic import FelzenszwalbGuide, KMeansGuide, SlicGuide

    p = METHODS[method]["params"]
    if method == "felzenszwalb":
        return FelzenszwalbGuide(scale=float(value), sigma=p["sigma"], min_size=p["min_size"])
    if method == "slic":
        return SlicGuide(n_segments=int(value), compactness=p["compactness"], sigma=p["sigma"])
    if method == "kmeans":
        return KMeansGuide(n_clusters=int(value), sample=p["sample"], n_init=p["n_init"],
                           seed=p["seed"])  # fmt: skip
    if method == "quickshift":
        from skimage.segmentation import quickshift

        ks = int(value)
        return lambda image: quickshift(
            image, ratio=p["ratio"], kernel_size=ks, max_dist=2 * ks, sigma=p["sigma"]
        )
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _scores(pred: np.ndarray, gts: list[np.ndarray], image_id: str) -> tuple[dict, float]:
    from dynaguide.eval import bsds_image_scores, standard_image_scores

    t = time.perf_counter()
    std = standard_image_scores(pred, gts, name=f"prediction of {image_id}")
    seconds = time.perf_counter() - t
    iou = bsds_image_scores(pred, gts)
    entry = {"standard": {**std, "id": image_id}, "iou": {k: iou[k] for k in ("sums", "counts")}}
    return entry, seconds


def score_image(job: tuple[str, str, str, dict[str, list[Any]]]) -> dict[str, Any]:
    """Segment one image with every method and knob value; score raw and cc8."""
    from dynaguide.eval import load_bsds_annotations, relabel_connected_components
    from dynaguide.io import load_image

    image_id, image_path, gt_path, sweeps = job
    image, gts = load_image(image_path), load_bsds_annotations(gt_path)
    out: dict[str, Any] = {
        "id": image_id,
        "methods": {},
        "segment_seconds": {},
        "metric_seconds": [],
    }
    for method, values in sweeps.items():
        per_variant: dict[str, dict[Any, Any]] = {"raw": {}, "cc8": {}}
        seg_time = 0.0
        for value in values:
            t = time.perf_counter()
            labels = np.asarray(segmenter(method, value)(image))
            seg_time += time.perf_counter() - t
            for variant, pred in (("raw", labels), ("cc8", relabel_connected_components(labels))):
                per_variant[variant][value], sec = _scores(pred, gts, image_id)
                out["metric_seconds"].append(sec)
        out["methods"][method] = per_variant
        out["segment_seconds"][method] = seg_time / len(values)
    out["single_segment"] = _scores(np.zeros(gts[0].shape, np.int32), gts, image_id)[0]
    out["human"] = [
        _scores(gt, gts[:k] + gts[k + 1 :], f"{image_id}/annotator{k}")[0]
        for k, gt in enumerate(gts)
        if len(gts) > 1
    ]
    return out


def _iou_summary(entries: list[dict[str, Any]]) -> dict[str, float]:
    modes = ("All", "Fine", "Coarse")
    s = {m: sum(e["iou"]["sums"][m] for e in entries) for m in modes}
    n = {m: sum(e["iou"]["counts"][m] for e in entries) for m in modes}
    out = {m: s[m] / n[m] for m in modes}
    out["Mean"] = sum(out.values()) / 3.0
    return out


def summarize_method(images: list[dict[str, Any]], method: str, variant: str) -> dict[str, Any]:
    """ODS / OIS of the standard measures and segment-best-IoU per knob value."""
    from dynaguide.eval import ods_ois

    values = list(images[0]["methods"][method][variant])
    per = {v: [img["methods"][method][variant][v] for img in images] for v in values}
    result = ods_ois({v: [e["standard"] for e in per[v]] for v in values})
    iou = {v: _iou_summary(per[v]) for v in values}
    for row in result["by_knob"]:
        row["segment_best_iou"] = iou[row["knob"]]
    result["segment_best_iou_at_ods"] = {
        metric: {"knob": result["ods"][metric]["knob"], **iou[result["ods"][metric]["knob"]]}
        for metric in ("covering", "f")
    }
    best = max(values, key=lambda v: iou[v]["All"])
    result["segment_best_iou_best_all"] = {"knob": best, **iou[best]}
    return result


def _fixed_row(entries: list[dict[str, Any]]) -> dict[str, Any]:
    from dynaguide.eval import standard_scores

    s = standard_scores([e["standard"] for e in entries])
    s.pop("sums")
    return {**s, "segment_best_iou": _iou_summary(entries)}


def _table(results: dict[str, Any]) -> str:
    head = (
        "| method | variant | Covering ODS / OIS | PRI ODS / OIS | VoI bits ODS / OIS | F ODS / OIS "
        "| knob at ODS Cov | best-IoU All / Fine / Coarse at ODS Cov |"
    )
    lines = [head, "|" + "---|" * 8]
    for method, spec in results["methods"].items():
        for variant in ("raw", "cc8"):
            r = spec[variant]
            cells = [
                f"{r['ods'][m][k]:.3f} / {r['ois'][m][k]:.3f}"
                for m, k in (
                    ("covering", "value"),
                    ("pri", "value"),
                    ("voi", "bits"),
                    ("f", "value"),
                )
            ]
            iou = r["segment_best_iou_at_ods"]["covering"]
            lines.append(
                f"| {method} | {variant} | " + " | ".join(cells) + f" | {spec['knob']}="
                f"{r['ods']['covering']['knob']} | {iou['All']:.3f} / {iou['Fine']:.3f} / "
                f"{iou['Coarse']:.3f} |"
            )
    for name in ("single_segment", "human_leave_one_out"):
        r = results[name]
        iou = r["segment_best_iou"]
        lines.append(
            f"| {name} | fixed | {r['covering']:.3f} | {r['pri']:.3f} | {r['voi_bits']:.3f} | "
            f"{r['f']:.3f} | - | {iou['All']:.3f} / {iou['Fine']:.3f} / {iou['Coarse']:.3f} |"
        )
    for name, r in PUBLISHED["rows"].items():
        f = "-" if r["f"] is None else f"{r['f']:.2f}"
        lines.append(
            f"| {name} (published) | ODS | {r['covering']:.2f} | {r['pri']:.2f} | "
            f"{r['voi']:.2f} | {f} | - | - |"
        )
    note = (
        f"\n({PUBLISHED['source']}; VoI in bits, as the benchmark's code computes it: "
        "the JSON also has it in nats)"
    )
    return "\n".join(lines) + note


def _versions() -> dict[str, str]:
    import scipy
    import skimage
    import sklearn

    import dynaguide

    return {
        "dynaguide": dynaguide.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-image": skimage.__version__,
        "scikit-learn": sklearn.__version__,
        "python": sys.version.split()[0],
    }


def _parse_knobs(items: list[str], methods: list[str]) -> dict[str, list[Any]]:
    sweeps = {m: list(METHODS[m]["values"]) for m in methods}
    for item in items:
        name, _, vals = item.partition("=")
        if name not in sweeps or not vals:
            raise SystemExit(f"--knobs {item!r}: expected METHOD=V1,V2 with METHOD in {methods}")
        sweeps[name] = [type(METHODS[name]["values"][0])(float(v)) for v in vals.split(",")]
    return sweeps


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the table and write the results JSON."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BSDS500 split folder")
    ap.add_argument("--limit", type=int, default=None, help="first N images only")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--workers", type=int, choices=(0, 1), default=0,
                    help="worker processes beside the main one")  # fmt: skip
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--knobs", action="append", default=[], help="METHOD=V1,V2 (override)")
    args = ap.parse_args(argv)
    from dynaguide.bench_utils import environment
    from dynaguide.eval import BSDS500Dataset
    from dynaguide.io import save_json

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    sweeps = _parse_knobs(args.knobs, methods)
    items = BSDS500Dataset(args.data).items
    items = items[: args.limit] if args.limit else items
    jobs = [(it.id, str(it.image_path), str(it.annotation_path), sweeps) for it in items]
    t0 = time.perf_counter()
    if args.workers:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            images = list(pool.imap(score_image, jobs))
    else:
        images = [score_image(job) for job in jobs]
    wall = time.perf_counter() - t0
    metric_seconds = np.concatenate([img["metric_seconds"] for img in images])
    results: dict[str, Any] = {
        "command": " ".join(["baselines.py", *(sys.argv[1:] if argv is None else argv)]),
        "commit": build_commit(),
        "versions": _versions(),
        "environment": environment(__import__("torch").device("cpu")),
        "data": str(args.data),
        "n_images": len(images),
        "image_ids": [img["id"] for img in images],
        "protocol": {
            "cc8": "prediction relabelled into 8-connected components before scoring",
            "boundary_max_dist": "0.0075 x image diagonal",
            "voi_units": "voi: nats, voi_bits / bits: bits (log2, as the benchmark's "
            "match_segmentations2.m and the published values)",
            "boundary_thinning": "predicted boundary map thinned (skimage.morphology.thin)",
            "ods": "per measure, the knob value with the best pooled dataset score",
            "ois": "per measure and image, the best knob value; then pooled",
            "segment_best_iou": "All / Fine / Coarse, one global list of GT segments",
            "human_leave_one_out": "each annotator scored against the other annotators",
            "workers": args.workers,
        },
        "methods": {},
        "published": PUBLISHED,
    }
    for method in methods:
        spec = METHODS[method]
        results["methods"][method] = {
            "knob": spec["knob"],
            "values": sweeps[method],
            "params": spec["params"],
            "segment_seconds_per_call": float(
                np.mean([img["segment_seconds"][method] for img in images])
            ),
            **{v: summarize_method(images, method, v) for v in ("raw", "cc8")},
        }
    results["single_segment"] = _fixed_row([img["single_segment"] for img in images])
    results["human_leave_one_out"] = _fixed_row([h for img in images for h in img["human"]])
    results["timing"] = {
        "wall_seconds": wall,
        "standard_image_scores_seconds": {
            "mean": float(metric_seconds.mean()),
            "median": float(np.median(metric_seconds)),
            "max": float(metric_seconds.max()),
            "n_calls": int(metric_seconds.size),
        },
        "annotators_per_image": float(
            np.mean([img["single_segment"]["standard"]["n_annotators"] for img in images])
        ),
    }
    table = _table(results)
    results["table"] = table
    save_json(args.out, results)
    print(table)
    t = results["timing"]["standard_image_scores_seconds"]
    print(
        f"\n{len(images)} images, {wall:.0f} s wall; standard_image_scores per call: "
        f"mean {t['mean']:.3f} s, median {t['median']:.3f} s, max {t['max']:.3f} s; "
        f"written {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
