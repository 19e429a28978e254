"""Replays the probe of faults and bad inputs at tiny size, one line per probe with its outcome:

    python benchmarks/probe_edges.py [--ranks 4] [--work DIR]

Each probe launches `mpirun -n 4 python -m mpisage.run` (a few seconds each, about 3 minutes in all) on a tiny
Fashion-MNIST fixture. The disk-full probe mounts a small tmpfs (needs root; otherwise it says it was skipped)."""
from __future__ import annotations

import argparse
import glob
import gzip
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENV = {**os.environ, "PYTHONPATH": ROOT, "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1", "OMP_NUM_THREADS": "1",
       "MPISAGE_TRACEBACK": "0"}


def launch(args: list[str], ranks: int, env=None, wait=True):
    from mpisage.runtime.environment import job_command
    cmd, job_env = job_command(ranks, args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**job_env, **ENV, **(env or {})})
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def line_with(out: str, *words: str) -> str:
    for line in out.splitlines():
        if all(w in line for w in words):
            return line.strip()[:200]
    return "(no such line) " + " / ".join(out.strip().splitlines()[-2:])[:200]


def metrics_rounds(run_dir: str) -> str:
    from mpisage.runtime.metrics import read_rounds
    try:
        return str([int(r) for r in read_rounds(os.path.join(run_dir, "metrics.h5"))["round"]])
    except Exception as e:  # noqa: BLE001 - the outcome is what is printed
        return f"UNREADABLE ({type(e).__name__})"


def checkpoints(run_dir: str) -> str:
    return ",".join(os.path.basename(p)[16:22].lstrip("0") or "0" for p in sorted(glob.glob(f"{run_dir}/checkpoint_*")))


def report(name: str, outcome: str) -> None:
    print(f"{name:<34} {outcome}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="probe-edges-")
    from mpisage.data import write_fashion_mnist_fixture
    data = os.path.join(work, "data")
    write_fashion_mnist_fixture(data, 300, 60)
    n = a.ranks
    S = ["num_clients=2", "rounds=6", f"dataset.root={data}", "batch_size=32", "checkpoint.interval=1",
         "runtime.deterministic=true", "runtime.heartbeat_s=1", "runtime.heartbeat_timeout_s=10"]
    R = lambda name: os.path.join(work, name)  # noqa: E731

    # 1. a fresh run in a used run_dir
    rc, _ = launch(S + [f"run_dir={R('reused')}"], n)
    before = checkpoints(R("reused"))
    rc, out = launch(S + ["rounds=3", "seed=7", f"run_dir={R('reused')}"], n)
    report("1 new run in a used run_dir", f"exit {rc}; {line_with(out, 'run_dir error')[:110]}...; checkpoints "
           f"{before} -> {checkpoints(R('reused'))}, metrics rounds {metrics_rounds(R('reused'))}")
    rc, out = launch(S + ["rounds=3", "seed=7", "overwrite=true", f"run_dir={R('reused')}"], n)
    aside = glob.glob(R("reused") + "/replaced-*")
    report("1 ... with overwrite=true", f"exit {rc}; old files in {[os.path.basename(p) for p in aside]}: "
           f"{sorted(os.listdir(aside[0])) if aside else None}; new checkpoints {checkpoints(R('reused'))}")

    # 2. two jobs on one run_dir, with and without HDF5's own file locking
    for env, label in (({}, ""), ({"HDF5_USE_FILE_LOCKING": "FALSE"}, " (HDF5 locking off)")):
        d = R("twice" + ("_nolock" if env else ""))
        first = launch(S + ["rounds=200", f"run_dir={d}"], n, env=env, wait=False)
        while not os.path.exists(os.path.join(d, "mpisage.lock")) and first.poll() is None:
            time.sleep(0.1)
        time.sleep(3)
        rc, out = launch(S + [f"run_dir={d}"], n, env=env)
        time.sleep(2)
        first.send_signal(signal.SIGTERM)      # the first job, undisturbed, stops with a checkpoint
        first_out, _ = first.communicate(timeout=300)
        report("2 second job on a run_dir" + label, f"exit {rc}: {line_with(out, 'in use')}; first job "
               f"(SIGTERM after) exit {first.returncode}, {line_with(first_out, 'stopped after')[:60]}")
    # a lock left by a job that died: this host, a pid that no longer exists
    d = R("stale")
    os.makedirs(d)
    dead = subprocess.Popen(["true"])
    dead.wait()
    import json
    import socket
    with open(os.path.join(d, "mpisage.lock"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "started": time.time(), "started_utc": "earlier",
                   "slurm_job_id": ""}, f)
    rc, out = launch(S + ["rounds=1", f"run_dir={d}"], n)
    report("2 lock left by a dead job", f"exit {rc}: {line_with(out, 'taking over')}")

    # 3. resume with another rank count
    rc, out = launch(S + [f"run_dir={R('reused')}", "rounds=6", "seed=7", "resume=auto"], n - 1)
    report(f"3 resume with -n {n - 1}", f"exit {rc}: {line_with(out, 'ranks')[:170]}; metrics rounds "
           f"{metrics_rounds(R('reused'))}")

    # 4. a full disk
    report("4 disk full", disk_full(work, S, n))

    # 5. a changed heartbeat on resume
    rc, out = launch(S + ["rounds=4", f"run_dir={R('reused')}", "seed=7", "resume=auto", "runtime.heartbeat_timeout_s=20",
                          "runtime.heartbeat_s=2"], n)
    report("5 resume with other heartbeat_s/_timeout_s", f"exit {rc}: {line_with(out, 'resuming')}")

    # 6. small ones
    bad = os.path.join(work, "bad_data")
    shutil.copytree(data, bad)
    gz = sorted(glob.glob(bad + "/*labels*"))[0]
    if not gz.endswith(".gz"):
        with open(gz, "rb") as f, gzip.open(gz + ".gz", "wb") as g:
            g.write(f.read())
        os.remove(gz)
        gz += ".gz"
    with open(gz, "r+b") as f:
        f.seek(20)
        f.write(b"\xff" * 16)
    rc, out = launch(S + ["rounds=1", f"dataset.root={bad}", f"run_dir={R('gz')}"], n)
    report("6 corrupt .gz", f"exit {rc}: {line_with(out, 'error')}")
    rc, out = launch([a for a in S if not a.startswith("dataset.root")] + [
        "rounds=1", "dataset.root=/nonexistent/fmnist", "dataset.samples_per_client=100", "eval.samples=100",
        f"run_dir={R('noroot')}"], n)
    report("6 dataset.root does not exist", f"exit {rc}: {line_with(out, 'does not exist')} | "
           f"{line_with(out, 'reading the idx')}")
    rc, out = launch(S + ["rounds=1", "resume=auto", f"run_dir={R('fresh_auto')}"], n)
    report("6 resume=auto, no checkpoint", f"exit {rc}: {line_with(out, 'no checkpoint')}")
    rc, out = launch(S + ["rounds=2", "optim.lr=1e12", "optim.name=sgd", f"run_dir={R('nan')}"], n)
    report("6 non-finite loss", f"exit {rc}: {line_with(out, 'non-finite')}")

    # the good cases: kill -9 of a rank then resume=auto, SIGTERM, a truncated checkpoint
    d = R("kill9")
    job = launch(S + ["rounds=40", f"run_dir={d}"], n, wait=False)
    while len(glob.glob(d + "/checkpoint_*.h5")) < 2 and job.poll() is None:
        time.sleep(0.2)
    killed_at = time.monotonic()
    from mpisage.runtime.process import find_rank_process
    os.kill(find_rank_process(n - 1, f"run_dir={d}"), signal.SIGKILL)
    job.communicate(timeout=120)
    ended = time.monotonic() - killed_at
    rc, out = launch(S + ["rounds=6", f"run_dir={d}", "resume=auto"], n)
    report("good: kill -9 a rank, resume=auto", f"job ended {ended:.1f} s after, exit {job.returncode}; resumed: "
           f"exit {rc}, {line_with(out, 'resuming')[:80]}; metrics rounds {metrics_rounds(d)}")
    d = R("sigterm")
    job = launch(S + ["rounds=40", f"run_dir={d}"], n, wait=False)
    while not glob.glob(d + "/checkpoint_*.h5") and job.poll() is None:
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=120)
    report("good: SIGTERM", f"exit {job.returncode}: {line_with(out, 'stopped after')}")
    newest = sorted(glob.glob(d + "/checkpoint_*.h5"))[-1]
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    rc, out = launch(S + ["rounds=40", "checkpoint.interval=40", f"run_dir={d}", "resume=auto", "rounds=8"], n)
    report("good: truncated newest checkpoint", f"exit {rc}: {line_with(out, 'skipping')[:110]}... "
           f"{line_with(out, 'resuming')[:70]}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


def disk_full(work: str, S: list[str], n: int) -> str:
    mnt = os.path.join(work, "tmpfs")
    os.makedirs(mnt)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", mnt], capture_output=True).returncode:
        return "skipped (cannot mount a tmpfs here: needs root)"
    try:
        d = os.path.join(mnt, "run")
        rc, out = launch(S + ["rounds=20", "checkpoint.keep=2", f"run_dir={d}"], n)
        tmp = glob.glob(d + "/*.tmp")
        lines = [f"checkpoints: exit {rc}: {line_with(out, 'no space')[:150]}; segfault: "
                 f"{'egmentation' in out or rc in (11, 139)}; partial files left: {len(tmp)}; metrics rounds "
                 f"{metrics_rounds(d)}"]
        # the metrics file: the disk all but full (3 MiB left) before the run starts
        shutil.rmtree(d)
        with open(os.path.join(mnt, "filler"), "wb") as f:
            f.write(b"\0" * (shutil.disk_usage(mnt).free - 3 * 1024 ** 2))
        d = os.path.join(mnt, "run2")
        rc, out = launch(S + ["rounds=2", f"run_dir={d}"], n)
        lines.append(f"metrics: exit {rc}: {line_with(out, 'no space')[:150]}; segfault: "
                     f"{'egmentation' in out or rc in (11, 139)}")
        return "\n" + " " * 35 + ("\n" + " " * 35).join(lines)
    finally:
        for _ in range(10):       # the aborted job's processes may take a moment to let go of it
            if subprocess.run(["umount", mnt], capture_output=True).returncode == 0:
                break
            time.sleep(1)
        else:
            subprocess.run(["umount", "-l", mnt])


if __name__ == "__main__":
    main()
