"""Behaviour unchanged, shown to the bit: run every synchronous method with `runtime.deterministic=true` on a small
Fashion-MNIST setting and keep each run's metrics, then compare two such sets (e.g. before and after a refactor).

  mpirun -n 4 python benchmarks/deterministic_metrics.py run OUT [ALGO,ALGO,...]
  python benchmarks/deterministic_metrics.py compare OUT_BEFORE OUT_AFTER
  python benchmarks/deterministic_metrics.py compare-runs RUN_DIR_BEFORE RUN_DIR_AFTER     (any two runs' metrics.h5)

`compare-runs` is for runs made otherwise, e.g. a simulated-schedule GAS run (same seed, same run) before and after
a change: its accuracy, loss, simulated time, participations and bytes must match.

Timings, memory and heartbeat-driven figures are left out of the comparison: they vary run to run (the heartbeat
is counted as CONTROL wire traffic, so wire_bytes can differ by a few 8-byte beats between two runs of the same
code). GAS is asynchronous (arrival order) and not compared here.
"""
import os
import sys

import numpy as np

ALGORITHMS = ["fsl_sage", "cse_fsl", "local_loss", "fed_avg", "sl_single_server", "sl_multi_server", "sl_vanilla",
              "sglr"]
VARYING = {"wall_time", "round_seconds", "eval_seconds", "client_train_seconds", "sserver_busy_seconds",
           "sserver_round_seconds", "wait_seconds_by_rank", "resident_bytes_by_rank", "checkpoint_seconds",
           "client_idle_seconds_by_rank", "eval_lag_seconds", "align_seconds"}


def run(out: str, algorithms: list[str]) -> None:
    from mpi4py import MPI

    from mpisage.config import load_config
    from mpisage.run import run_job
    from mpisage.runtime.metrics import read_rounds
    comm = MPI.COMM_WORLD
    for algorithm in algorithms:
        run_dir = os.path.join(out, algorithm)
        extra = ["fsl.align_interval=2", "fsl.align_buffer_size=64",
                 "fsl.align_steps=5"] if algorithm == "fsl_sage" else []
        cfg = load_config(None, [f"algorithm={algorithm}", "runtime.deterministic=true", "num_clients=4", "rounds=3",
                                 "dataset.samples_per_client=96", "eval.samples=300", "batch_size=32",
                                 f"run_dir={run_dir}", "checkpoint.interval=2", *extra])
        job = comm.Dup()
        run_job(cfg, job, log=lambda line: None)
        job.Free()
        if comm.Get_rank() == 0:
            rounds = read_rounds(os.path.join(run_dir, "metrics.h5"))
            np.savez(os.path.join(out, algorithm + ".npz"), **{k: np.asarray(v) for k, v in rounds.items()})
            print(algorithm, "test_acc", rounds["test_acc"], flush=True)


def compare(before: str, after: str) -> None:
    for algorithm in ALGORITHMS:
        compare_rounds(algorithm, np.load(os.path.join(before, algorithm + ".npz")),
                       np.load(os.path.join(after, algorithm + ".npz")))


def compare_runs(before: str, after: str) -> None:
    from mpisage.runtime.metrics import read_rounds
    compare_rounds(os.path.basename(os.path.normpath(after)), read_rounds(os.path.join(before, "metrics.h5")),
                   read_rounds(os.path.join(after, "metrics.h5")))


def compare_rounds(name: str, a, b) -> None:
    """Prints which figures of two runs' rounds are identical, which differ (and by how much), which one has."""
    same, differ, one_side = [], [], []
    if len(a["round"]) != len(b["round"]):
        print(f"{name:17s} {len(a['round'])} rows before, {len(b['round'])} after: not comparable")
        return
    for key in sorted((set(a) | set(b)) - VARYING):
        if key not in a or key not in b:
            one_side.append(f"{key} ({'before' if key in a else 'after'} only)")
        elif np.array_equal(a[key], b[key], equal_nan=True):
            same.append(key)
        else:
            differ.append(key)
    print(f"{name:17s} {len(same):2d} figures identical; differ: {differ or 'none'}; {one_side or ''}")
    for key in differ:
        delta = b[key].astype(float) - a[key].astype(float)
        print(f"    {key}, after - before, per round: {delta.reshape(len(delta), -1).sum(1).tolist()}")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3].split(",") if len(sys.argv) > 3 else ALGORITHMS)
    elif sys.argv[1] == "compare-runs":
        compare_runs(sys.argv[2], sys.argv[3])
    else:
        compare(sys.argv[2], sys.argv[3])
