"""The evaluation runner: segment every image of a dataset, cache, score, report.

(Over 400 lines: the loop, the per-image error policy and the report it writes share the
run's state; the settings, cache and metric code live in their own modules.)

:func:`evaluate` is used by ``dynaguide eval`` and by the quality-table scripts.
Predictions are cached per image (``<out>/predictions/<id>.npz``, written atomically)
so an interrupted run resumes where it stopped; the settings a cache was made with are
kept in ``<out>/protocol.json`` and a resume with other settings is refused.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dynaguide.build_info import code_version
from dynaguide.errors import image_failure
from dynaguide.eval.bsds_benchmark import standard_image_scores, standard_scores
from dynaguide.eval.datasets import BSDS500Dataset, DatasetItem, FolderDataset, open_dataset
from dynaguide.eval.label_maps import prepare_prediction
from dynaguide.eval.metrics import BSDS_MODES, bsds_image_scores, voc_image_scores
from dynaguide.eval.prediction_cache import (
    CACHE_FORMAT,
    check_protocol,
    load_cached,
    save_cached,
)
from dynaguide.eval.settings import EvalSettings
from dynaguide.io import to_jsonable

__all__ = ["CACHE_FORMAT", "EvalSettings", "code_version", "evaluate", "load_cached", "summarize"]

_SCORE_DOC = {
    "raw": "prediction scored as returned by dynaguide.segment",
    "cc": "prediction relabelled into {c}-connected components before scoring "
    "(the preprocessing behind DFC's published numbers)",
}

_BSDS_DOC = (
    "BSDS500 segment-best-IoU: per GT segment the best IoU with a whole "
    "predicted region (many-to-one); All = every annotation, Fine / Coarse = the "
    "annotation with the most / fewest labels (first on a tie); each mode averages ONE "
    "global list of GT segments over the dataset; Mean = (All + Fine + Coarse) / 3"
)
_STANDARD_DOC = (
    "standard BSDS500 benchmark (Arbelaez et al., TPAMI 2011) under 'standard', against "
    "every annotator: Segmentation Covering of the annotations by the prediction (pooled: "
    "sum of |R| max IoU over all annotators' regions / (annotators x pixels), summed over "
    "images); Probabilistic Rand Index (mean over annotators of the Rand index over "
    "n(n-1)/2 pixel pairs; dataset: mean over images); Variation of Information, 'voi' in "
    "nats and 'voi_bits' in bits (the benchmark's code uses log2, so published VoI values "
    "are bits; mean over annotators, then over images; lower is better); boundary "
    "precision / recall / F (seg2bmap boundary pixels, the prediction's thinned, matched "
    "one-to-one within 0.0075 x the image diagonal by a maximum bipartite matching; "
    "recall pools matched GT pixels over "
    "annotators, a predicted pixel is correct if matched for any annotator; dataset: "
    "pooled counts). One fixed output per image, so ODS = OIS"
)
_VOC_DOC = (
    "VOC segment-best-IoU: each mask value one GT segment, background 0 "
    "counted as one segment, void 255 ignored; one global list of GT segments"
)


def _guidance_name(guidance: Any) -> Any:
    if guidance is None or isinstance(guidance, str):
        return guidance
    return getattr(guidance, "name", None) or type(guidance).__name__


def _effective_config(preset: Any, max_iter: int | None) -> Any:
    import dynaguide

    config = dynaguide.get_preset(preset) if isinstance(preset, str) else preset
    if max_iter is not None:
        config = dataclasses.replace(config, max_iter=max_iter)
    return config


def _stopping_rule(config: Any) -> dict[str, Any]:
    keys = (
        "max_iter",
        "min_labels",
        "convergence_window",
        "convergence_tol",
        "check_every",
        "silhouette",
        "silhouette_stop",
        "final_pass",
    )
    return {k: getattr(config, k) for k in keys if hasattr(config, k)}


# --------------------------------------------------------------------------- cache
# ------------------------------------------------------------------------- scoring
def _score(
    item_kind: str,
    labels: np.ndarray,
    annotations: list[np.ndarray],
    *,
    cc: bool,
    connectivity: int,
    resize: bool,
) -> dict[str, Any]:
    if item_kind == "bsds":
        pred = prepare_prediction(
            labels,
            annotations[0].shape,
            name="prediction",
            resize=resize,
            connected_components=cc,
            connectivity=connectivity,
        )
        s = bsds_image_scores(pred, annotations)
        out = {k: s[k] for k in (*BSDS_MODES, "Mean", "counts", "sums", "n_pred_segments")}
        out["standard"] = standard_image_scores(pred, annotations)
        return out
    s = voc_image_scores(
        labels, annotations[0], connected_components=cc, connectivity=connectivity, resize=resize
    )
    return {"mIoU": s["mIoU"], "counts": {"mIoU": s["count"]}, "sums": {"mIoU": s["sum"]}}


def summarize(images: list[dict[str, Any]], metric: str, key: str) -> dict[str, Any]:
    """Dataset scores from per-image records (global segment lists: sums / counts).

    For BSDS500 records that carry the standard benchmark (``"standard"``), the
    dataset-level Covering / PRI / VoI / boundary P, R, F of
    :func:`dynaguide.eval.standard_scores` are added under ``"standard"``.

    Parameters
    ----------
    images : list of dict
        Per-image records of :func:`evaluate` (failed ones are skipped).
    metric : {"bsds", "voc"}
    key : str
        Score variant, e.g. ``"raw"`` or ``"cc8"``.
    """
    modes = BSDS_MODES if metric == "bsds" else ("mIoU",)
    sums = dict.fromkeys(modes, 0.0)
    counts = dict.fromkeys(modes, 0)
    scored = [rec["scores"][key] for rec in images if key in rec.get("scores", {})]
    n = len(scored)
    for s in scored:
        for m in modes:
            sums[m] += s["sums"][m]
            counts[m] += s["counts"][m]
    out: dict[str, Any] = {m: (sums[m] / counts[m] if counts[m] else float("nan")) for m in modes}
    if metric == "bsds":
        out["Mean"] = sum(out[m] for m in BSDS_MODES) / 3.0
    out["counts"] = counts
    out["n_images"] = n
    standard = [s["standard"] for s in scored if "standard" in s]
    if metric == "bsds" and len(standard) == len(scored):
        out["standard"] = standard_scores(standard)
    return out


# ------------------------------------------------------------------------- runner
def evaluate(
    dataset: BSDS500Dataset | FolderDataset | str | os.PathLike[str],
    settings: EvalSettings | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Segment and score a dataset; returns (and with ``cache_dir`` writes) a report.

    Parameters
    ----------
    dataset : dataset object or path
        A :class:`BSDS500Dataset` / :class:`FolderDataset`, or a folder (layout
        detected: ``gt/`` -> BSDS500, else images/ + masks/).
    settings : EvalSettings, optional
        How to segment, score and write (default: ``EvalSettings()``).
    **options
        Fields of :class:`EvalSettings` (``preset=``, ``cache_dir=``, ``limit=``, ...)
        overriding those of ``settings``.

    Returns
    -------
    dict
        ``protocol`` (all settings, dataset, code version), ``scores`` (``raw`` and
        ``cc<N>``: dataset-level All / Fine / Coarse / Mean or mIoU with segment
        counts; for BSDS500 also ``standard``: Covering, PRI, VoI, boundary precision /
        recall / F of :func:`dynaguide.eval.standard_scores`), ``images`` (per-image
        records), ``failed`` (id and error of every image that could not be scored),
        ``n_images``, ``n_scored``, ``seconds``.

    Raises
    ------
    ValueError
        Bad settings, or a cache made with other settings.
    TypeError
        An option that is not a field of :class:`EvalSettings`.
    """
    st = EvalSettings(**options) if settings is None else dataclasses.replace(settings, **options)
    preset, guidance, scale, max_iter = st.preset, st.guidance, st.scale, st.max_iter
    seed, device, cache_dir, limit = st.seed, st.device, st.cache_dir, st.limit
    connected_components, connectivity, resize = st.connected_components, st.connectivity, st.resize
    resume, overwrite, plot, n_plot = st.resume, st.overwrite, st.plot, st.n_plot
    segment_fn = st.segment_fn
    ds = open_dataset("auto", dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    items: list[DatasetItem] = list(ds.items[:limit] if limit else ds.items)
    metric = ds.metric
    config = _effective_config(preset, max_iter)
    if segment_fn is None:
        import dynaguide

        segment_fn = dynaguide.segment
    cc_key = f"cc{connectivity}"
    fingerprint = {
        "preset": preset if isinstance(preset, str) else getattr(preset, "name", "custom"),
        "guidance": _guidance_name(guidance),
        "scale": scale,
        "max_iter": max_iter,
        "seed": seed,
        "config": to_jsonable(dataclasses.asdict(config))
        if dataclasses.is_dataclass(config)
        else None,
        "cache_format": CACHE_FORMAT,
    }
    protocol = {
        **{k: v for k, v in fingerprint.items() if k != "config"},
        "effective_max_iter": getattr(config, "max_iter", None),
        "stopping_rule": _stopping_rule(config),
        "device": str(device),
        "dataset": ds.describe(),
        "n_images": len(items),
        "limit": limit,
        "metric": _BSDS_DOC if metric == "bsds" else _VOC_DOC,
        **({"standard_metrics": _STANDARD_DOC} if metric == "bsds" else {}),
        "scores": {
            "raw": _SCORE_DOC["raw"],
            **({cc_key: _SCORE_DOC["cc"].format(c=connectivity)} if connected_components else {}),
        },
        "resize_to_annotation": resize,
        "code_version": code_version(),
        "python": sys.version.split()[0],
        "config": fingerprint["config"],
    }
    out_dir = Path(cache_dir) if cache_dir is not None else None
    if out_dir is not None:
        check_protocol(out_dir, fingerprint, resume=resume, overwrite=overwrite)

    records: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    plot_rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    bar = None
    if st.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=f"eval {ds.kind}", unit="img", file=sys.stderr)
    try:
        for item in items:
            rec = _run_one(
                item,
                metric=metric,
                segment_fn=segment_fn,
                kwargs=st.segment_kwargs(),
                out_dir=out_dir,
                resume=resume and not overwrite,
                cc=connected_components,
                connectivity=connectivity,
                resize=resize,
                keep_for_plot=plot and len(plot_rows) < n_plot,
            )
            if "error" in rec:
                failed.append({"id": item.id, "error": rec["error"]})
                warnings.warn(f"{item.id}: skipped ({rec['error']})", stacklevel=2)
            else:
                row = rec.pop("_plot", None)
                if row is not None:
                    plot_rows.append(row)
                records.append(rec)
            if bar is not None:
                bar.update(1)
                if records:
                    key = "All" if metric == "bsds" else "mIoU"
                    s = summarize(records, metric, "raw")[key]
                    post = {key: f"{s:.3f}"}
                    if connected_components:
                        post[cc_key] = f"{summarize(records, metric, cc_key)[key]:.3f}"
                    bar.set_postfix(post, refresh=False)
    finally:
        if bar is not None:
            bar.close()

    report: dict[str, Any] = {
        "protocol": protocol,
        "scores": {"raw": summarize(records, metric, "raw")},
        "n_images": len(items),
        "n_scored": len(records),
        "n_failed": len(failed),
        "failed": failed,
        "n_cached": sum(1 for r in records if r["cached"]),
        "seconds": time.perf_counter() - t_start,
        "segment_seconds": sum(r["seconds"] for r in records),
        "images": records,
    }
    if connected_components:
        report["scores"][cc_key] = summarize(records, metric, cc_key)
    if out_dir is not None:
        if plot and plot_rows:
            report["plots"] = _write_plots(out_dir / "plots", plot_rows)
        from dynaguide.io import save_json

        save_json(out_dir / "report.json", report)
    return report


def _run_one(
    item: DatasetItem,
    *,
    metric: str,
    segment_fn: Callable[..., Any],
    kwargs: dict[str, Any],
    out_dir: Path | None,
    resume: bool,
    cc: bool,
    connectivity: int,
    resize: bool,
    keep_for_plot: bool,
) -> dict[str, Any]:
    cache_path = out_dir / "predictions" / f"{item.id}.npz" if out_dir is not None else None
    try:
        annotations = item.annotations
        cached = None
        if cache_path is not None and resume and cache_path.exists():
            try:
                cached = load_cached(cache_path)
            except ValueError as exc:
                warnings.warn(f"{exc}; recomputing", stacklevel=3)
        if cached is not None:
            labels, guide, history, meta = (
                cached["labels"],
                cached["guide_labels"],
                cached["history"],
                cached["meta"],
            )
            image = item.load_image() if keep_for_plot else None
        else:
            seg = segment_fn(item.image_path, name=item.id, **kwargs)
            labels = np.asarray(seg.labels)
            guide = None if seg.guide_labels is None else np.asarray(seg.guide_labels)
            history = {k: list(seg.history.get(k, [])) for k in ("loss", "n_labels")}
            meta = {
                "cache_format": CACHE_FORMAT,
                "id": item.id,
                "n_labels": int(seg.n_labels),
                "n_iter": int(seg.n_iter),
                "seconds": float(seg.seconds),
                "stop_reason": str(seg.stop_reason),
            }
            image = (
                np.asarray(seg.image)
                if keep_for_plot and getattr(seg, "image", None) is not None
                else None
            )
            if keep_for_plot and image is None:
                image = item.load_image()
            if cache_path is not None:
                save_cached(cache_path, seg, meta)
        scores = {
            "raw": _score(
                metric, labels, annotations, cc=False, connectivity=connectivity, resize=resize
            )
        }
        if cc:
            scores[f"cc{connectivity}"] = _score(
                metric, labels, annotations, cc=True, connectivity=connectivity, resize=resize
            )
    except Exception as exc:  # the per-image policy of dynaguide.errors (re-raises run stoppers)
        return {"id": item.id, "error": image_failure(exc, item.id).message}
    rec: dict[str, Any] = {
        "id": item.id,
        "image": str(item.image_path),
        "n_labels": meta["n_labels"],
        "n_iter": meta["n_iter"],
        "seconds": meta["seconds"],
        "stop_reason": meta["stop_reason"],
        "cached": cached is not None,
        "scores": scores,
    }
    if keep_for_plot:
        key = "All" if metric == "bsds" else "mIoU"
        title = f"{item.id}  K={meta['n_labels']}  {key} raw {scores['raw'][key]:.3f}"
        if cc:
            title += f"  cc {scores[f'cc{connectivity}'][key]:.3f}"
        if metric == "bsds":
            title += "".join(
                f"\n{k}: Cov {st['covering']:.3f}  PRI {st['pri']:.3f}  "
                f"VoI {st['voi']:.2f} nats  "
                f"F {st['f']:.3f}"
                for k, st in ((k, v["standard"]) for k, v in scores.items())
            )
        rec["_plot"] = {
            "image": image,
            "annotation": annotations[0],
            "guide": guide,
            "result": labels,
            "title": title,
            "history": history,
            "id": item.id,
        }
    return rec


def _write_plots(folder: Path, rows: list[dict[str, Any]]) -> dict[str, str]:
    from dynaguide.eval.plots import comparison_grid, history_plot

    grid = comparison_grid(rows, folder / "grid.png")
    curves = history_plot([(r["id"], r["history"]) for r in rows], folder / "history.png")
    return {"grid": str(grid), "history": str(curves)}
