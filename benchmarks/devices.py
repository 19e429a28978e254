"""Seconds per round with the S-server on the CPU and on a GPU, for one config.

    python benchmarks/devices.py [--ranks 4] [--rounds 4] [key=value ...]

Runs the job with device.sserver=cpu and, when this machine has a CUDA GPU, with device.sserver=cuda (and, when that
job sends GPU memory to MPI directly, once more with MPISAGE_CUDA_AWARE=0 to time the staged path). The data is a
small Fashion-MNIST fixture unless dataset.root=... is given. Prints the median seconds per round after the first
(warm-up) round, the payload path each job used and how CUDA-awareness was decided."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

from mpisage.data import write_fashion_mnist_fixture
from mpisage.runtime.environment import job_command
from mpisage.runtime.metrics import read_attrs, read_rounds


def timed_job(name: str, ranks: int, overrides: list[str], env_extra: dict) -> tuple[float, dict]:
    """Runs one job; returns (median seconds per round after the first, its environment record)."""
    cmd, env = job_command(ranks, overrides)
    print(f"[devices] {name}: {' '.join(cmd[3:])}", flush=True)
    if subprocess.run(cmd, env={**env, **env_extra}, check=False).returncode:
        raise SystemExit(f"[devices] the {name} job failed (its output is above)")
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir="))
    seconds = read_rounds(os.path.join(run_dir, "metrics.h5"))["round_seconds"]
    environment = json.loads(read_attrs(os.path.join(run_dir, "metrics.h5"))["environment"])
    return float(np.median(seconds[1:] if len(seconds) > 1 else seconds)), environment


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every job")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="mpisage-devices-")
    common = [f"rounds={args.rounds}", "checkpoint.interval=1000", *args.overrides]
    if not any(o.startswith("dataset.root=") for o in args.overrides):
        common.append(f"dataset.root={write_fashion_mnist_fixture(os.path.join(work, 'data'), 2000, 500)}")
    jobs = [("cpu S-server", ["device.sserver=cpu"], {})]
    if torch.cuda.is_available():
        jobs.append(("gpu S-server", ["device.sserver=cuda"], {}))
    else:
        print("[devices] no CUDA GPU here: timing the CPU S-server only", flush=True)
    results = []
    while jobs:
        name, extra, env_extra = jobs.pop(0)
        run = [*common, *extra, f"run_dir={os.path.join(work, name.replace(' ', '_'))}"]
        seconds, environment = timed_job(name, args.ranks, run, env_extra)
        path = environment.get("payload_path")
        results.append((name, seconds, path, environment.get("cuda_aware", {}).get("how", "?")))
        if path == "direct" and not env_extra:
            jobs.append(("gpu S-server staged", extra, {"MPISAGE_CUDA_AWARE": "0"}))
    print(f"[devices] {args.ranks} ranks, {args.rounds} rounds, median seconds per round after the first:")
    for name, seconds, path, how in results:
        print(f"[devices] {name:22s} {seconds:8.3f} s/round  payload path {path}  ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
