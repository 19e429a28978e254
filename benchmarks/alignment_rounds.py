"""FSL-SAGE's S-server critical path, per round kind: seconds of normal and of alignment rounds, the S-server's
alignment and evaluation seconds, and how much of a round the clients spend waiting.

    python benchmarks/alignment_rounds.py [--variant NAME[@DIR]=key=value,key=value ...] [--tree DIR]
        [--ranks 12] [--rounds 6] [-- key=value ...]

The setting of the side-by-side comparison with the authors' code: ResNet-18 split, Fashion-MNIST written at
32x32x3, 10 clients x 600 IID samples, 2,000 test images, B = 64, Q = 5, l = 3 (alignment rounds 0 and 3), Adam
1e-3, 6 rounds, no checkpoints. Each variant is one job (`mpirun -n RANKS python -m mpisage.run`), run one after
another in this sitting so that their ratios are comparable; `NAME@DIR` runs that variant from another checkout
(e.g. a `git worktree` of an older commit, for a before/after), `--tree DIR` every variant without one. Default
variants: the paper's blocking order on one thread, then on every core (`fsl.align_threads=0`, the default), then
`fsl.align_mode=overlap`.

Per round kind it prints medians over the rounds of that kind (round 0 included: it is an alignment round, and
its first-round costs are part of what a user waits for): round seconds, the S-server's alignment seconds
(`align_seconds`, absent before it was recorded), its evaluation seconds, how long after the round's end its
progress line and metrics row appeared (`eval_lag_seconds`: the previous round's evaluation is what an alignment
round could starve; absent before it was recorded), the S-server's busy seconds, the client ranks' idle fraction
(`client_idle_seconds_by_rank` over round seconds, mean over client ranks; the last round is left out of it: it has
no wait for averages). The physical bound of an alignment round on C cores is a normal round plus the alignment's CPU seconds
over C (the alignment's work spread over every core, the clients' work unchanged): the alignment's CPU seconds are
the one-thread `align s` of a blocking variant, during which the clients wait.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

SETTING = ["model=resnet18", "dataset.name=fashion_mnist", "dataset.image_size=32", "dataset.channels=3",
           "dataset.distribution=iid", "num_clients=10", "dataset.samples_per_client=600", "eval.samples=2000",
           "batch_size=64", "fsl.server_update_interval=5", "fsl.align_interval=3", "optim.name=adam", "optim.lr=0.001",
           "checkpoint.interval=0"]
DEFAULT_VARIANTS = ["blocking_1_thread=fsl.align_mode=blocking,fsl.align_threads=1",
                    "blocking=fsl.align_mode=blocking", "overlap=fsl.align_mode=overlap"]


def run_variant(args, name: str, tree: str, overrides: list[str]) -> dict | None:
    from mpisage.runtime.environment import job_command
    from mpisage.runtime.metrics import read_rounds
    run_dir = tempfile.mkdtemp(prefix=f"mpisage-align-{name}-")
    argv, env = job_command(args.ranks, [*SETTING, f"rounds={args.rounds}", *args.overrides, *overrides,
                                         f"run_dir={run_dir}"])
    env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")     # that checkout's mpisage
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        print(f"{name}: failed after {wall:.0f} s\n{(proc.stdout + proc.stderr)[-2000:]}", flush=True)
        return None
    r = read_rounds(os.path.join(run_dir, "metrics.h5"))
    return {"rows": r, "wall": wall}


def summarize(r: dict, align_interval: int) -> dict[str, dict[str, float]]:
    rounds = r["round"].astype(int)
    seconds = r["round_seconds"]
    # idle seconds by the round they belong to; before they were recorded (older checkouts), the waits as reported,
    # which count a round's wait for its averages in the next round
    client_wait = r["client_idle_seconds_by_rank" if "client_idle_seconds_by_rank" in r else
                    "wait_seconds_by_rank"][:, 2:]
    idle = (client_wait / seconds[:, None]).mean(axis=1)
    idle[-1] = np.nan      # the last round has no wait for averages: leaving it in would flatter its kind
    out = {}
    for kind, rows in (("alignment", rounds % align_interval == 0), ("normal", rounds % align_interval != 0)):
        if not rows.any():
            continue
        med = lambda a: float(np.median(a[rows]))   # noqa: E731
        out[kind] = {"rounds": int(rows.sum()), "round_s": med(seconds),
                     "align_s": med(r["align_seconds"]) if "align_seconds" in r else float("nan"),
                     "eval_s": med(r["eval_seconds"]), "sserver_busy_s": med(r["sserver_busy_seconds"]),
                     # the row of the round BEFORE each round of this kind: what this kind of round delays
                     "lag_s": float(np.median(r["eval_lag_seconds"][np.flatnonzero(rows) - 1][rounds[rows] > 0]))
                     if "eval_lag_seconds" in r and (rounds[rows] > 0).any() else float("nan"),
                     "client_idle": float(np.nanmedian(idle[rows])) if (~np.isnan(idle[rows])).any()
                     else float("nan")}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", help="NAME=key=value,key=value (repeatable)")
    p.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="the checkout whose mpisage runs (default: this one)")
    p.add_argument("--ranks", type=int, default=12)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("overrides", nargs="*", help="extra key=value settings for every variant")
    args = p.parse_args()
    args.tree = os.path.abspath(args.tree)
    print(f"FSL-SAGE ResNet-18, 10 clients x 600 Fashion-MNIST 32x32x3, B=64, Q=5, l=3, {args.rounds} rounds, "
          f"-n {args.ranks}, {args.cores} cores; load average before: "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    print("| variant | round kind | rounds | round s | align s | eval s | previous row's lag s | S-server busy s | "
          "client idle | job s |", flush=True)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    failed = 0
    for spec in args.variant or DEFAULT_VARIANTS:
        name, _, settings = spec.partition("=")
        name, _, tree = name.partition("@")
        result = run_variant(args, name, os.path.abspath(tree or args.tree), [s for s in settings.split(",") if s])
        if result is None:
            failed += 1
            continue
        interval = [int(kv.split("=", 1)[1]) for kv in [*SETTING, *args.overrides, *settings.split(",")]
                    if kv.startswith("fsl.align_interval=")][-1]      # the variant's own l decides the round kinds
        for kind, f in summarize(result["rows"], interval).items():
            print(f"| {name} | {kind} | {f['rounds']} | {f['round_s']:.1f} | {f['align_s']:.1f} | {f['eval_s']:.1f} "
                  f"| {f['lag_s']:.1f} | {f['sserver_busy_s']:.1f} | {f['client_idle']:.0%} | "
                  f"{result['wall']:.0f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
