"""Collect ``dynaguide eval`` reports into the README's quality table and one results JSON.

    python benchmarks/quality_table.py RUNS_DIR [--out benchmarks/results/quality-bsds500-val-cpu.json]

RUNS_DIR holds one ``<preset>-<guide>/report.json`` per run (as written by
``dynaguide eval ... --out RUNS_DIR/<preset>-<guide>``). Prints a markdown table of
All / Fine / Coarse / Mean, raw and after 8-connected relabelling.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Print the table and write the combined JSON."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", type=Path)
    ap.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/quality-bsds500-val-cpu.json")
    )
    ap.add_argument(
        "--baseline",
        default="dynaguide-kmeans",
        help="run compared with the others, paired per image",
    )
    args = ap.parse_args(argv)
    rows = []
    for report in sorted(args.runs.glob("*/report.json")):
        data = json.loads(report.read_text())
        proto = data["protocol"]
        rows.append(
            {
                "preset": proto["preset"],
                "guidance": proto["guidance"] or "none",
                "raw": {k: data["scores"]["raw"][k] for k in ("All", "Fine", "Coarse", "Mean")},
                "cc8": {k: data["scores"]["cc8"][k] for k in ("All", "Fine", "Coarse", "Mean")},
                "n_images": data["n_scored"],
                "mean_seconds_per_image": data["segment_seconds"] / max(1, data["n_scored"]),
                "mean_iterations": sum(i.get("n_iter", 0) for i in data["images"])
                / max(1, len(data["images"])),
                "per_image_mean_cc8": [i["scores"]["cc8"]["Mean"] for i in data["images"]],
                "protocol": {
                    k: proto[k]
                    for k in (
                        "scale",
                        "max_iter",
                        "seed",
                        "stopping_rule",
                        "device",
                        "n_images",
                        "code_version",
                    )
                },
            }
        )
    if not rows:
        raise SystemExit(f"no */report.json under {args.runs}")
    print(
        "| preset | guide | All cc8 | Fine cc8 | Coarse cc8 | Mean cc8 | All raw | Mean raw | iterations | s/image |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["cc8"]["Mean"]):
        c, w = r["cc8"], r["raw"]
        print(
            f"| {r['preset']} | {r['guidance']} | {c['All']:.3f} | {c['Fine']:.3f} | {c['Coarse']:.3f} | "
            f"{c['Mean']:.3f} | {w['All']:.3f} | {w['Mean']:.3f} | {r['mean_iterations']:.0f} | "
            f"{r['mean_seconds_per_image']:.1f} |"
        )
    base = next((r for r in rows if f"{r['preset']}-{r['guidance']}" == args.baseline), None)
    if base is not None:
        print(
            f"\npaired per-image difference of Mean cc8 vs {args.baseline} (mean +- standard error):"
        )
        b = base["per_image_mean_cc8"]
        for r in sorted(rows, key=lambda r: -r["cc8"]["Mean"]):
            d = [x - y for x, y in zip(r["per_image_mean_cc8"], b, strict=True)]
            mean = sum(d) / len(d)
            se = (sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1) / len(d)) ** 0.5
            r["paired_vs_baseline"] = {"baseline": args.baseline, "mean": mean, "stderr": se}
            print(f"  {r['preset']:>12} {r['guidance']:<13} {mean:+.4f} +- {se:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"benchmark": "quality", "dataset": "bsds500/val", "runs": rows}, indent=2)
        + "\n"
    )
    os.replace(tmp, args.out)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
