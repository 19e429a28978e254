"""Many clients in one job: resident memory of every rank and time per client-round against num_clients.

    python benchmarks/many_clients.py --algorithm fsl_sage --clients 10 100 [--ranks 4] [--model resnet18]
        [--samples-per-client 8] [--rounds 1] [-- key=value ...]

Each (algorithm, num_clients) is one job on a tiny CIFAR-10-format fixture written here (samples_per_client
samples per client, one local step per round with the default batch size), so the figures are the per-client state
and bookkeeping, not training. Prints one markdown row per job: the peak over rounds of each rank's resident memory
(MiB: F-server, S-server, the largest client rank), the first round's seconds and seconds per client-round.

CAUTION: memory grows with num_clients unless the client store keeps idle clients compact; size the job to the
machine (`free -g`) before asking for 1000 clients.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from mpisage.data import write_cifar10_fixture
from mpisage.runtime.environment import job_command
from mpisage.runtime.metrics import read_rounds

MIB = 2 ** 20


def run_job(args, algorithm: str, clients: int, data: str, extra: list[str]) -> dict:
    run_dir = tempfile.mkdtemp(prefix=f"mpisage-many-{algorithm}-{clients}-")
    overrides = [f"algorithm={algorithm}", f"model={args.model}", "dataset.name=cifar10", f"dataset.root={data}",
                 "dataset.distribution=iid", f"dataset.samples_per_client={args.samples_per_client}",
                 f"num_clients={clients}", f"rounds={args.rounds}", f"batch_size={args.samples_per_client}",
                 "fsl.align_steps=2", "eval.samples=64", "checkpoint.interval=0", "asynchronous.local_iters=1",
                 f"asynchronous.active_clients={min(clients, 10)}", f"run_dir={run_dir}", *extra]
    argv, env = job_command(args.ranks, overrides)
    start = time.monotonic()
    job = subprocess.run(["nice", "-n", str(args.nice), *argv], env=env, capture_output=True, text=True,
                         timeout=args.limit_s)
    wall = time.monotonic() - start
    if job.returncode != 0:
        return {"error": (job.stdout + job.stderr)[-1500:], "wall": wall}
    r = read_rounds(os.path.join(run_dir, "metrics.h5"))
    resident = r["resident_bytes_by_rank"].max(0) / MIB
    seconds = float(r["round_seconds"][0])
    return {"fserver": resident[0], "sserver": resident[1], "client": resident[2:].max(), "wall": wall,
            "round": seconds, "per_client": seconds / clients}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithm", action="append", help="repeatable (default fsl_sage)")
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--samples-per-client", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--limit-s", type=float, default=3600.0)
    p.add_argument("overrides", nargs="*", help="extra key=value settings for every job")
    args = p.parse_args()
    data = tempfile.mkdtemp(prefix="mpisage-many-data-")
    write_cifar10_fixture(data, max(args.clients) * args.samples_per_client, 64)
    print(f"model={args.model} -n {args.ranks}, {args.samples_per_client} samples per client, "
          f"{args.rounds} round(s); resident MiB = peak over rounds", flush=True)
    print("| algorithm | clients | F-server MiB | S-server MiB | largest client rank MiB | round s | "
          "s per client-round |", flush=True)
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    failed = 0
    for algorithm in args.algorithm or ["fsl_sage"]:
        for clients in args.clients:
            r = run_job(args, algorithm, clients, data, args.overrides)
            if "error" in r:
                failed += 1
                print(f"| {algorithm} | {clients} | failed after {r['wall']:.0f} s |\n{r['error']}", flush=True)
                continue
            print(f"| {algorithm} | {clients} | {r['fserver']:.0f} | {r['sserver']:.0f} | {r['client']:.0f} | "
                  f"{r['round']:.1f} | {r['per_client']:.3f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
