"""`python -m mpisage.tools.compare`: run several algorithms on the same settings, one after another, and compare them.

    python -m mpisage.tools.compare --methods fsl_sage,cse_fsl,fed_avg,sl_single_server,sl_multi_server [--ranks 11]
            [--target 0.85] [--out runs/compare] [--skip-existing] [key=value ...]

Each method M runs as `mpirun -n RANKS python -m mpisage.run key=value ... algorithm=M run_dir=OUT/M`. A method may
carry its own overrides after colons, e.g. `--methods gas,gas:gas.generative=false,fed_avg` (the ablation runs in
OUT/gas:gas.generative=false). Then:

- OUT/results.md   the command line that reproduces the comparison, and a table with one row per method (rounds,
                   best and final test accuracy, paper-figure GiB at which the target accuracy was first reached,
                   total GiB, median seconds per round);
- OUT/results.csv  the same table;
- OUT/accuracy_vs_gib.png  test accuracy against paper-figure GiB (target as a dashed line) and against wall time.

`--skip-existing` reuses a method whose run_dir already holds a complete metrics.h5, so an interrupted comparison
resumes where it stopped. A failed run is reported and the others still run; the exit code is then 1. SIGUSR1 or
SIGTERM (Slurm's time-limit warning, pre-emption) is passed to the running job, which checkpoints and stops; the
tool then starts no further run and exits 3.

With `--seeds N` (seeds 0..N-1) or `--seed-list 3,5,8` every method runs once per seed, paired (seed s: the same
partition and initial weights for every method), in OUT/M/seed<s> with resume=auto, and the summary gives means
with 95% t-intervals over the seeds, times to each `--target` (comma-separated) with how many seeds reached it,
and paired differences against `--reference` (default: the first method); see mpisage.tools.compare_seeds.
As a library: `summarize(run_dirs, target)`, `write_table(rows, path_md, path_csv, command)` and
`plot_comparison(run_dirs, target, out)` need no MPI.
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import signal
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from mpisage.config import read_stored_config  # noqa: E402
from mpisage.runtime.environment import job_command  # noqa: E402
from mpisage.runtime.metrics import GIB, read_attrs, read_rounds, run_finished  # noqa: E402
NOT_REACHED = "not reached"
# (row key, column header) in table order; the same keys are the CSV header.
COLUMNS = [("method", "method"), ("rounds", "rounds"), ("best_acc", "best test acc"),
           ("final_acc", "final test acc"), ("gib_to_target", "GiB to target"), ("total_gib", "total GiB"),
           ("median_round_s", "median s/round")]


def metrics_path(run_dir: str) -> str:
    return os.path.join(run_dir, "metrics.h5")


def summarize(run_dirs: dict[str, str], target: float) -> list[dict]:
    """One row per method (in the dict's order) from `<run_dir>/metrics.h5`."""
    rows = []
    for method, run_dir in run_dirs.items():
        r = read_rounds(metrics_path(run_dir))
        acc, gib = np.asarray(r["test_acc"], float), np.asarray(r["comm_bytes"], float) / GIB
        reached = np.flatnonzero(acc >= target)
        secs = np.asarray(r["round_seconds"], float)
        # The first round carries start-up costs (data loading, first compilation/allocation): leave it out.
        steady = secs[1:] if len(secs) > 1 else secs
        rows.append({
            "method": method,
            "rounds": int(len(acc)),
            "best_acc": float(acc.max()),
            "final_acc": float(acc[-1]),
            "gib_to_target": float(gib[reached[0]]) if len(reached) else NOT_REACHED,
            "total_gib": float(gib[-1]),
            "median_round_s": float(np.median(steady)),
        })
    return rows


FORMATS = {"best_acc": "{:.4f}", "final_acc": "{:.4f}", "gib_to_target": "{:.3f}", "total_gib": "{:.3f}",
           "median_round_s": "{:.2f}"}


def _fmt(key: str, value) -> str:
    return str(value) if isinstance(value, str) or key not in FORMATS else FORMATS[key].format(value)


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(k, row[k]) for k, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def write_table(rows: list[dict], path_md: str, path_csv: str, command: str, notes: list[str] = ()) -> None:
    """results.md (the reproducing command, then the table, then any notes such as failed runs) and results.csv."""
    for path in (path_md, path_csv):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path_md, "w") as f:
        f.write(f"Reproduce with:\n\n```\n{command}\n```\n\n{format_table(rows)}\n")
        if notes:
            f.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    with open(path_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k, _ in COLUMNS], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot_comparison(run_dirs: dict[str, str], target: float, out: str) -> str:
    """Accuracy vs paper-figure GiB (with the target dashed, as in the FSL-SAGE paper's figure 1) beside
    accuracy vs wall time; one line per method."""
    runs = {method: read_rounds(metrics_path(run_dir)) for method, run_dir in run_dirs.items()}
    simulated = any("simulated_time" in r for r in runs.values())     # asynchronous runs have a simulated clock
    fig, axes = plt.subplots(1, 3 if simulated else 2, figsize=(16 if simulated else 11, 4.2))
    ax_comm, ax_time = axes[0], axes[1]
    for method, r in runs.items():
        ax_comm.plot(np.asarray(r["comm_bytes"]) / GIB, r["test_acc"], marker=".", label=method)
        ax_time.plot(r["wall_time"], r["test_acc"], marker=".", label=method)
        if simulated and "simulated_time" in r:
            axes[2].plot(r["simulated_time"], r["test_acc"], marker=".", label=method)
    if simulated:
        axes[2].set_xlabel("simulated time (s, straggler clock)")
    for ax in axes:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    ax_comm.set_xlabel("communication load (GiB, paper figure)")
    ax_time.set_xlabel("wall time (s)")
    ax_comm.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def is_complete(run_dir: str) -> bool:
    """True when metrics.h5 is readable and its run stopped as its own config says a run stops: all `rounds`
    done, or the paper-figure load reached `comm_threshold_mb`. An interrupted run fails both."""
    try:
        r = read_rounds(metrics_path(run_dir))
        cfg = read_stored_config(read_attrs(metrics_path(run_dir))["config"])
        done = len(r["test_acc"])
        return done > 0 and run_finished(done, r["comm_bytes"][-1], int(cfg["rounds"]), float(cfg["comm_threshold_mb"]))
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return False


STOPPED = 3      # exit code: a stop signal ended the comparison part-way (slurm/compare.sbatch requeues on it)


def run_method(method: str, ranks: int, overrides: list[str], run_dir: str) -> int:
    # The method's own overrides, algorithm and run_dir come last: they win over the shared ones.
    algorithm, *own = method.split(":")
    cmd, env = job_command(ranks, [*overrides, *own, f"algorithm={algorithm}", f"run_dir={run_dir}"])
    print(f"[compare] {method}: {shlex.join(cmd)}", flush=True)
    job = subprocess.Popen(cmd, env=env)
    received = []

    def forward(signum, frame):      # Slurm's time-limit warning (or a pre-emption): the run checkpoints and stops
        received.append(signal.Signals(signum).name)
        job.send_signal(signum)
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        rc = job.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:     # start no other run: the job is about to end; the same command continues later
        print(f"[compare] {received[0]}: {method} stopped (exit code {rc}); no further runs started; rerun the same "
              f"command to continue", file=sys.stderr, flush=True)
        sys.exit(STOPPED)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m mpisage.tools.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", required=True, help="comma-separated algorithm names")
    p.add_argument("--ranks", type=int, default=11, help="MPI ranks per run (default 11)")
    p.add_argument("--target", default="0.85",
                   help="target test accuracy (default 0.85); with --seeds several, comma-separated")
    p.add_argument("--out", default="runs/compare", help="output folder; run M goes to OUT/M")
    p.add_argument("--skip-existing", action="store_true", help="reuse runs whose metrics.h5 is complete")
    p.add_argument("--seeds", type=int, help="run every method on seeds 0..N-1 (OUT/M/seed<s>, resume=auto)")
    p.add_argument("--seed-list", help="run every method on these comma-separated seeds instead")
    p.add_argument("--reference", help="with --seeds: the method the paired differences are taken against "
                                       "(default: the first of --methods)")
    # Everything else (key=value, or -c FILE) is passed unchanged to every run.
    args, overrides = p.parse_known_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        p.error("--methods needs at least one algorithm name")
    try:
        targets = [float(t) for t in args.target.split(",") if t.strip()]
    except ValueError:
        p.error(f"--target {args.target!r} must be a number, or with --seeds comma-separated numbers (0.8,0.85)")
    if not targets:
        p.error("--target needs a number (example: --target 0.85)")
    if args.seeds is not None or args.seed_list is not None:
        from mpisage.tools.compare_seeds import main_seeds
        return main_seeds(args, overrides, argv, methods, targets, run_method)
    if len(targets) > 1 or args.reference is not None:
        p.error("several --target values and --reference need --seeds N or --seed-list")
    args.target = targets[0]

    done, failed = {}, []
    for method in methods:
        run_dir = os.path.join(args.out, method)
        if args.skip_existing and is_complete(run_dir):
            print(f"[compare] {method}: reusing the complete run in {run_dir}", flush=True)
        else:
            # a rerun replaces the method's earlier run: its files are moved aside (run_dir/replaced-<time>/)
            rc = run_method(method, args.ranks, [*overrides, "overwrite=true"], run_dir)
            if rc == 0 and not os.path.isfile(metrics_path(run_dir)):
                rc = -1    # "succeeded" without training (e.g. --help among the overrides): nothing to compare
            if rc != 0:
                print(f"[compare] {method} FAILED with exit code {rc}", file=sys.stderr, flush=True)
                failed.append(f"{method} failed with exit code {rc}")
                continue
        done[method] = run_dir

    command = "python -m mpisage.tools.compare " + shlex.join(argv)
    rows = summarize(done, args.target)
    write_table(rows, os.path.join(args.out, "results.md"), os.path.join(args.out, "results.csv"), command, failed)
    if done:
        plot_comparison(done, args.target, os.path.join(args.out, "accuracy_vs_gib.png"))
    print(f"\n{command}\n\n{format_table(rows)}")
    for note in failed:
        print(f"[compare] {note}", file=sys.stderr)
    print(f"[compare] wrote {args.out}/results.md, results.csv" + (", accuracy_vs_gib.png" if done else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
