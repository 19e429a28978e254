"""`python -m mpisage.tools.bench [-n RANKS] [--rounds R] [key=value ...]`: runs a fixed job under mpirun and prints
seconds per round, how busy the S-server was and how idle the clients were, from the run's own metrics.

Figures are medians over the steady-state rounds (an alignment round is reported on its own); they come from one
run, so compare ratios within a run rather than absolute times across machines."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from mpisage.runtime.environment import job_command
from mpisage.runtime.metrics import GIB, read_rounds

FIXED = ["algorithm=fsl_sage", "model=cnn", "dataset=fashion_mnist", "dataset.distribution=iid", "batch_size=64",
         "seed=200", "checkpoint.interval=1000"]



def figures(metrics_path: str) -> dict:
    r = read_rounds(metrics_path)
    rounds = r["round_seconds"]
    s_busy = (r["sserver_busy_seconds"] + r["eval_seconds"]) / rounds
    client_idle = r["wait_seconds_by_rank"][:, 2:] / rounds[:, None]
    aligned = ~np.isnan(r["align_loss"][:, 0, 0])
    steady = ~aligned
    steady[0] = False      # the first round also pays start-up skew
    pick = steady if steady.any() else np.ones_like(steady)
    return {
        "rounds": len(rounds),
        "s_per_round": float(np.median(rounds[pick])),
        "alignment_rounds": [(int(i), float(rounds[i])) for i in np.flatnonzero(aligned)],
        "sserver_busy_fraction": float(np.median(s_busy[pick])),
        "client_idle_fraction": float(np.median(client_idle[pick])),
        "eval_seconds": float(np.median(r["eval_seconds"][pick])),
        "test_acc": float(r["test_acc"][-1]),
        "gib_per_round": float(np.median(np.diff(np.concatenate([[0], r["comm_bytes"]]))[pick]) / GIB),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpisage.tools.bench", description=__doc__)
    p.add_argument("-n", "--ranks", type=int, default=11)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--keep", help="keep the run here instead of a temporary directory")
    p.add_argument("overrides", nargs="*", help="extra key=value settings")
    args = p.parse_args(argv)
    run_dir = args.keep or tempfile.mkdtemp(prefix="mpisage-bench-")
    cmd, env = job_command(args.ranks, [*FIXED, f"rounds={args.rounds}", f"run_dir={run_dir}", *args.overrides])
    print("[bench]", " ".join(cmd[:3] + ["python", "-m", "mpisage.run"] + cmd[6:]), flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        return 1
    f = figures(os.path.join(run_dir, "metrics.h5"))
    print(f"[bench] {args.ranks} ranks, {f['rounds']} rounds (medians over steady-state rounds)")
    print(f"[bench] seconds per round        {f['s_per_round']:.2f}")
    for i, seconds in f["alignment_rounds"]:
        print(f"[bench] seconds, alignment round {i:<3d}{seconds:.2f}")
    print(f"[bench] S-server busy fraction   {f['sserver_busy_fraction']:.2f}  (server steps + alignment + eval)")
    print(f"[bench] client idle fraction     {f['client_idle_fraction']:.2f}  (waiting on peers, median rank)")
    print(f"[bench] evaluation seconds       {f['eval_seconds']:.2f}")
    print(f"[bench] GiB per round (paper)    {f['gib_per_round']:.3f}")
    print(f"[bench] final test accuracy      {f['test_acc']:.4f}")
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
