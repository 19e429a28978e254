"""Soak: hundreds of rounds of a tiny job, with every rank's resident memory sampled each round.

    python benchmarks/soak.py [--rounds 300] [--ranks 4] [--algorithm fsl_sage]

Prints, per rank, the resident memory after the warm-up (round 20), at the end, and the growth between them, and
fails (exit 1) when any rank grew by more than --bound-mib (default 50 MiB)."""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

from mpisage.data import write_fashion_mnist_fixture
from mpisage.runtime.environment import job_command
from mpisage.runtime.metrics import read_rounds

MIB = 1024 ** 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--algorithm", default="fsl_sage")
    p.add_argument("--bound-mib", type=float, default=50.0)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="mpisage-soak-")
    data = write_fashion_mnist_fixture(os.path.join(work, "data"), 600, 100)
    cmd, env = job_command(args.ranks, [
           f"algorithm={args.algorithm}", f"dataset.root={data}", f"num_clients={2 * (args.ranks - 2)}",
           f"rounds={args.rounds}", "batch_size=32", "fsl.align_interval=10", "fsl.align_steps=5",
           "fsl.align_buffer_size=200",
           "checkpoint.interval=50", "runtime.log_interval=50", f"run_dir={work}/run"])
    print("[soak]", " ".join(cmd[3:]), flush=True)
    if subprocess.run(cmd, env=env).returncode:
        return 1
    rss = read_rounds(os.path.join(work, "run", "metrics.h5"))["resident_bytes_by_rank"]
    warm = min(20, len(rss) - 1)
    growth = (rss[-1] - rss[warm]) / MIB
    print(f"[soak] {len(rss)} rounds; resident MiB per rank (0 F-server, 1 S-server, 2.. clients)")
    for rank, (a, b, g) in enumerate(zip(rss[warm] / MIB, rss[-1] / MIB, growth)):
        print(f"[soak] rank {rank}: round {warm + 1}: {a:7.1f}  round {len(rss)}: {b:7.1f}  growth {g:+6.1f}")
    worst = float(np.max(growth))
    print(f"[soak] largest growth {worst:+.1f} MiB (bound {args.bound_mib} MiB)")
    return 0 if worst <= args.bound_mib else 1


if __name__ == "__main__":
    sys.exit(main())
