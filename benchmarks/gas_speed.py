"""GAS speed: seconds per global update of the default GAS job (issue 11), and the S-server's busy seconds per update.

    python benchmarks/gas_speed.py [--rounds 3] [--ranks 6] [--tree DIR] [--nice 10] [-- key=value ...]
    python benchmarks/gas_speed.py --statistics 20 [--tree DIR]

Runs `mpirun -n RANKS python -m mpisage.run algorithm=gas num_clients=4 rounds=ROUNDS` (checkpoints off, evaluation
on the first 1,000 test images so that evaluation does not dominate a short run) from the checkout in --tree (default:
this one; pass an older checkout to measure before/after on the same machine), then prints per global update: wall
seconds (from the F-server's metrics), the S-server's busy seconds (time inside its handlers: gradients, server
steps, statistics and generation; less sensitive to a loaded machine than wall time, though not immune), server steps
and generated activations; the CPU seconds of all ranks together (the least load-sensitive figure); and the medians
over the updates after the first (the first also holds start-up).

--statistics N: no job; in one process (one thread), the S-server's statistics work of N server steps of that job,
alone: each step folds Q_s = 4 batches of 64 activations of D = 16 x 14 x 14 (the default CNN's cut, 10 labels) into
the full-covariance statistics and tops every label up to B = 64 by sampling, as `Gas.server_batch` does once every
label has statistics. Prints the seconds of each step and their median; with --tree, of that checkout's code."""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from mpisage.runtime.environment import job_command
from mpisage.runtime.metrics import read_rounds


def statistics_worker(steps: int) -> None:
    import torch

    from mpisage.algorithms.gas import merge_statistics
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    running, seconds = {}, []
    for step in range(steps):
        z = torch.relu(torch.randn(4 * 64, 16 * 14 * 14, generator=g))
        y = torch.randint(0, 10, (4 * 64,), generator=g)
        w = torch.full((4 * 64,), float(step + 1))
        start = time.perf_counter()
        merge_statistics(running, z, y, w, diagonal=False)
        for label, n in enumerate(torch.bincount(y, minlength=10).tolist()):
            if n < 64:
                running[label].sample(64 - n, 1e-4, g)
        seconds.append(time.perf_counter() - start)
    print("seconds per server step:", " ".join(f"{x:.2f}" for x in seconds))
    print(f"median {np.median(seconds):.2f} s per server step (load average {os.getloadavg()[0]:.1f})")


def report(path: str) -> None:
    r = read_rounds(path)
    busy = np.diff(np.concatenate([[0.0], r["sserver_busy_seconds"]]))
    steps = np.diff(np.concatenate([[0], r["server_steps"]])).astype(int)
    generated = np.diff(np.concatenate([[0], r["generated_samples"]])).astype(int)
    print("update  wall_s  sserver_busy_s  server_steps  generated")
    for i, row in enumerate(zip(r["round_seconds"], busy, steps, generated)):
        print(f"{i + 1:6d} {row[0]:7.1f} {row[1]:15.1f} {row[2]:13d} {row[3]:10d}")
    later = slice(1, None) if len(busy) > 1 else slice(None)
    print(f"median over updates {'2..' if len(busy) > 1 else '1'}: {np.median(r['round_seconds'][later]):.1f} s "
          f"per update, S-server busy {np.median(busy[later]):.1f} s per update "
          f"({np.median(busy[later] / np.maximum(steps[later], 1)):.2f} s per server step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=6)
    parser.add_argument("--tree", default=os.getcwd(), help="the checkout to run (its mpisage package is used)")
    parser.add_argument("--nice", type=int, default=0)
    parser.add_argument("--statistics", type=int, default=0, help="time N server steps' statistics work alone")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help="only print the figures of an existing run's metrics.h5")
    parser.add_argument("extra", nargs="*", help="further key=value overrides (after --)")
    args = parser.parse_args()
    if args.report:
        return report(args.report)
    if args.statistics:
        if args.worker:
            return statistics_worker(args.statistics)
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.tree), "OMP_NUM_THREADS": "1"}
        print(f"statistics of {args.statistics} server steps, code of {args.tree}", flush=True)
        sys.exit(subprocess.run([sys.executable, os.path.abspath(__file__), "--statistics", str(args.statistics),
                                 "--worker"], env=env).returncode)
    run_dir = tempfile.mkdtemp(prefix="mpisage-gas-speed-")
    overrides = ["algorithm=gas", "num_clients=4", f"rounds={args.rounds}", "checkpoint.interval=0",
                 "eval.samples=1000", f"run_dir={run_dir}/run", *args.extra]
    argv, env = job_command(args.ranks, overrides)
    env["PYTHONPATH"] = os.path.abspath(args.tree)
    if args.nice:
        argv = ["nice", "-n", str(args.nice), *argv]
    print("command:", " ".join(argv), f"(tree {args.tree})", flush=True)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=args.tree)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)     # every rank, each waited for by its parent
    cpu = usage.ru_utime + usage.ru_stime
    print(f"exit status {done.returncode}, {time.perf_counter() - start:.1f} s in all, CPU seconds of all ranks "
          f"together {cpu:.1f} (start-up and evaluation included), load average {os.getloadavg()[0]:.1f}")
    report(os.path.join(run_dir, "run", "metrics.h5"))
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
