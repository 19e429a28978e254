"""Summarises the wire-format runs of benchmarks/wire_runs.sh: per algorithm and format, final test accuracy,
paper-figure GiB (all kinds, and activations + gradients alone) and GiB to a target accuracy, as means with 95 %
Student-t intervals over the seeds that finished. Prints a Markdown table.

    python benchmarks/wire_summary.py runs/wire [--target 0.85]
"""
from __future__ import annotations

import argparse
import glob
import os

import numpy as np
from scipy import stats

from mpisage.runtime.metrics import GIB, read_rounds
from mpisage.runtime.transport import Kind


def interval(values: list[float]) -> str:
    """mean ± half-width of the 95 % t-interval (n >= 2), else the single value."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return "–"
    if np.isnan(v).any():
        return f"not reached in {int(np.isnan(v).sum())}/{len(v)}"
    if len(v) == 1:
        return f"{v[0]:.4g}"
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return f"{v.mean():.4g} ± {half:.2g}"


def gib_to_target(r: dict, target: float) -> float:
    """Paper-figure GiB at the end of the first round whose test accuracy reaches `target` (NaN: never)."""
    hit = np.flatnonzero(r["test_acc"] >= target)
    return r["comm_bytes"][hit[0]] / GIB if len(hit) else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", help="the OUT folder of wire_runs.sh (ALGO/FORMAT/seedN/metrics.h5)")
    ap.add_argument("--target", type=float, default=0.85, help="accuracy for GiB-to-target")
    args = ap.parse_args()
    print(f"| method | wire | seeds | test acc (%) | Δ acc vs float32 (pts) | GiB total | GiB act+grad | "
          f"act+grad vs float32 | GiB to {args.target:.0%} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for algo_dir in sorted(glob.glob(os.path.join(args.root, "*"))):
        if not os.path.isdir(algo_dir):
            continue
        algo, base_acc, base_ag = os.path.basename(algo_dir), None, None
        for fmt in ("float32", "bfloat16", "float16", "int8"):
            runs = sorted(glob.glob(os.path.join(algo_dir, fmt, "seed*", "done")))
            if not runs:
                continue
            rs = [read_rounds(os.path.join(os.path.dirname(d), "metrics.h5")) for d in runs]
            seeds = [os.path.basename(os.path.dirname(d))[4:] for d in runs]
            acc = {s: 100 * r["test_acc"][-1] for s, r in zip(seeds, rs)}
            ag = [(r["paper_bytes_by_kind"][-1][Kind.ACTIVATION] + r["paper_bytes_by_kind"][-1][Kind.GRADIENT]) / GIB
                  for r in rs]
            if fmt == "float32":
                base_acc, base_ag = acc, np.mean(ag)
            # paired by seed: the same data order and initialisation, only the wire differs
            delta = [acc[s] - base_acc[s] for s in seeds if base_acc and s in base_acc]
            ratio = f"{np.mean(ag) / base_ag:.4f}" if base_ag else "–"
            print(f"| {algo} | {fmt} | {','.join(seeds)} | {interval(list(acc.values()))} | "
                  f"{interval(delta) if fmt != 'float32' else '–'} | "
                  f"{interval([r['comm_bytes'][-1] / GIB for r in rs])} | {interval(ag)} | {ratio} | "
                  f"{interval([gib_to_target(r, args.target) for r in rs])} |")


if __name__ == "__main__":
    main()
