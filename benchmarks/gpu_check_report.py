"""Figures for benchmarks/gpu_check.sh's report, one markdown fragment per call (printed to stdout).

    python benchmarks/gpu_check_report.py env                          torch, CUDA, GPUs, the MPI library mpi4py loads
    python benchmarks/gpu_check_report.py data fashion|cifar10 DIR N_TRAIN N_TEST   writes a data fixture
    python benchmarks/gpu_check_report.py bytes REFERENCE RUN...       paper bytes of each run against the reference's
    python benchmarks/gpu_check_report.py rounds ALIGN_INTERVAL RUN... seconds per normal and per alignment round
    python benchmarks/gpu_check_report.py updates RUN...               GAS: seconds per global update

A RUN is a run directory (its metrics.h5), named in the report by its last path component."""
import json
import os
import platform
import sys

import numpy as np


def env() -> None:
    import torch
    print(f"- python {platform.python_version()}, torch {torch.__version__} (CUDA build {torch.version.cuda}), "
          f"cores {os.cpu_count()}")
    print(f"- CUDA available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}"
          + "".join(f"; cuda:{i} {torch.cuda.get_device_name(i)} "
                    f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB"
                    for i in range(torch.cuda.device_count())))
    try:
        import mpi4py
        from mpi4py import MPI
    except Exception as e:         # noqa: BLE001 - the report says what failed, whatever it was
        print(f"- mpi4py cannot load an MPI library: {type(e).__name__}: {e}")
        return
    # the same lookup the job makes at start-up (mpisage.runtime.devices.configure_devices)
    from mpisage.runtime.transport import query_mpi_cuda_support
    answer = query_mpi_cuda_support()
    print(f"- mpi4py {mpi4py.__version__} loads {MPI.Get_library_version().splitlines()[0].strip()} "
          f"(extension {os.path.basename(MPI.__file__)})")
    print(f"- MPIX_Query_cuda_support(): {'absent' if answer is None else answer} "
          f"({'CUDA-aware' if answer == 1 else 'not CUDA-aware: GPU payloads are staged'})")


def data(kind: str, root: str, n_train: str, n_test: str) -> None:
    from mpisage.data import fixtures
    if kind == "fashion":
        fixtures.write_fashion_mnist_fixture(root, int(n_train), int(n_test))
    else:
        fixtures.write_cifar10_fixture(root, int(n_train), int(n_test), n_batches=5)
    print(f"- {kind} fixture: {n_train} train, {n_test} test images in {root}")


def _rows(run: str) -> tuple[dict, dict]:
    from mpisage.runtime.metrics import read_attrs, read_rounds
    path = os.path.join(run, "metrics.h5")
    return read_rounds(path), json.loads(read_attrs(path)["environment"])


def bytes_(reference: str, runs: list[str]) -> None:
    ref, _ = _rows(reference)
    mismatches = []
    print("| run | payload path | rounds | paper GiB | paper bytes = reference's | final accuracy | s/round (median) |")
    print("|---|---|---:|---:|---|---:|---:|")
    for run in [reference, *runs]:
        r, e = _rows(run)
        same = (r["paper_bytes_by_kind"].shape == ref["paper_bytes_by_kind"].shape
                and np.array_equal(r["paper_bytes_by_kind"], ref["paper_bytes_by_kind"]))
        if not same:
            mismatches.append(os.path.basename(run))
        print(f"| {os.path.basename(run)} | {e.get('payload_path')} | {len(r['round'])} | "
              f"{r['paper_bytes_by_kind'][-1].sum() / 2**30:.4f} | {'yes' if same else 'NO'} | "
              f"{r['test_acc'][-1]:.4f} | {np.median(r['round_seconds']):.2f} |")
    if not runs:
        print(f"\n- paper bytes: no run but {os.path.basename(reference)} finished, nothing to compare")
        return
    print(f"\n- paper bytes: {'DIFFER from ' + os.path.basename(reference) + ' in ' + ', '.join(mismatches) if mismatches else 'every run equals ' + os.path.basename(reference) + ' round by round, kind by kind'}")


def rounds(interval: str, runs: list[str]) -> None:
    print("| run | devices | normal rounds: s (median) | alignment rounds: s (median) | align s (median) |")
    print("|---|---|---:|---:|---:|")
    for run in runs:
        r, e = _rows(run)
        aligned = r["round"].astype(int) % int(interval) == 0
        med = lambda a, rows: f"{np.median(a[rows]):.2f} ({rows.sum()})" if rows.any() else "-"   # noqa: E731
        align = med(r["align_seconds"], aligned) if "align_seconds" in r else "-"
        print(f"| {os.path.basename(run)} | {sorted(set(e.get('devices') or []))} | "
              f"{med(r['round_seconds'], ~aligned)} | {med(r['round_seconds'], aligned)} | {align} |")


def updates(runs: list[str]) -> None:
    print("| run | devices | updates | s/update (median after the first) | first update s |")
    print("|---|---|---:|---:|---:|")
    for run in runs:
        r, e = _rows(run)
        s = r["round_seconds"]
        later = f"{np.median(s[1:]):.2f}" if len(s) > 1 else "-"
        print(f"| {os.path.basename(run)} | {sorted(set(e.get('devices') or []))} | {len(s)} | {later} | {s[0]:.2f} |")


def main(argv: list[str]) -> int:
    what, args = argv[0], argv[1:]
    if what == "env":
        env()
    elif what == "data":
        data(*args)
    elif what == "bytes":
        bytes_(args[0], args[1:])
    elif what == "rounds":
        rounds(args[0], args[1:])
    elif what == "updates":
        updates(args)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
