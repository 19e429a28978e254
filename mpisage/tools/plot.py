"""`python -m mpisage.tools.plot RUN_DIR... [-o out.png]`: test accuracy against communication (GiB, the paper's
figure) and against wall time, one line per run."""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mpisage.runtime.metrics import GIB, read_attrs, read_rounds  # noqa: E402


def label_of(run_dir: str) -> str:
    attrs = read_attrs(os.path.join(run_dir, "metrics.h5"))
    algo = json.loads(attrs.get("algorithm", "{}")).get("algorithm", "?")
    return f"{algo} ({os.path.basename(os.path.normpath(run_dir))})"


def plot(run_dirs: list[str], out: str) -> str:
    fig, (ax_comm, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run_dir in run_dirs:
        r = read_rounds(os.path.join(run_dir, "metrics.h5"))
        label = label_of(run_dir)
        ax_comm.plot(r["comm_bytes"] / GIB, r["test_acc"], marker=".", label=label)
        ax_time.plot(r["wall_time"], r["test_acc"], marker=".", label=label)
    ax_comm.set_xlabel("communication load (GiB, paper figure)")
    ax_time.set_xlabel("wall time (s)")
    for ax in (ax_comm, ax_time):
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    ax_comm.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpisage.tools.plot", description=__doc__)
    p.add_argument("run_dirs", nargs="+", help="run directories holding metrics.h5")
    p.add_argument("-o", "--out", help="PNG to write (default: RUN_DIR/accuracy.png for one run, accuracy.png else)")
    args = p.parse_args(argv)
    missing = [d for d in args.run_dirs if not os.path.isfile(os.path.join(d, "metrics.h5"))]
    if missing:
        print(f"no metrics.h5 in {', '.join(missing)} (give the run_dir of a run)", file=sys.stderr)
        return 2
    out = args.out or (os.path.join(args.run_dirs[0], "accuracy.png") if len(args.run_dirs) == 1 else "accuracy.png")
    print(f"wrote {plot(args.run_dirs, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
