"""Test accuracy of each method at a byte budget, over seeds: the last evaluation whose cumulative paper-figure
bytes are within the budget (a method whose first update already exceeds it has no figure), as mean and 95%
t-interval, and paired against the first method. For runs that stop at `comm_threshold_mb`, where each method
stops after the row that crosses the budget and so ends at different byte counts.

    python benchmarks/at_budget.py runs/claims/gas_shard2 --gib 0.859375 --methods gas,gas:gas.generative=false,fed_avg
"""
from __future__ import annotations

import argparse
import os

from mpisage.runtime.metrics import read_rounds
from mpisage.tools.compare_seeds import t_interval


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="a compare --out directory (OUT/<method>/seed<s>/metrics.h5)")
    p.add_argument("--gib", type=float, required=True, help="the budget in GiB (paper figure)")
    p.add_argument("--methods", required=True, help="comma-separated; the first is the reference")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    acc = {m: {} for m in methods}
    for m in methods:
        for s in seeds:
            r = read_rounds(os.path.join(args.out, m, f"seed{s}", "metrics.h5"))
            within = r["comm_bytes"] / 2 ** 30 <= args.gib
            if within.any():
                acc[m][s] = float(r["test_acc"][within][-1])
    ref = methods[0]
    print(f"| method | seeds with an evaluation within {args.gib:g} GiB | test acc there | minus {ref} (paired) |")
    print("|---|---|---|---|")
    for m in methods:
        own = t_interval(list(acc[m].values())) if acc[m] else None
        pairs = [acc[m][s] - acc[ref][s] for s in seeds if s in acc[m] and s in acc[ref]]
        diff = t_interval(pairs) if pairs and m != ref else None
        print(f"| {m} | {len(acc[m])}/{len(seeds)} | " +
              (f"{own.mean:.3f} [{own.low:.3f}, {own.high:.3f}]" if own else "-") + " | " +
              (f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]" if diff else "") + " |")


if __name__ == "__main__":
    main()
