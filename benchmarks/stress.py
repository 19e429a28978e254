"""Stress: the default job (11 ranks, FSL-SAGE on Fashion-MNIST) run beside N CPU hogs, to check that its liveness
check raises no false alarm when the machine is overloaded.

    python benchmarks/stress.py --hogs 2 [--hogs 4 ...] [--rounds 3] [--nice 10] [-- key=value ...]

Each hog is a busy-looping process (niced by --nice, so the job, not niced, is not starved outright, as on a
shared machine). By default the job is shortened so that its third round is an alignment round right after a
checkpoint, where the false alarm of issue 15 struck: rounds=3 fsl.align_interval=2 checkpoint.interval=2. Prints,
per N: whether the job finished, its exit status, the wall time, the load average at the end, and any heartbeat
alarm line."""
import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

from mpisage.runtime.environment import job_command


def _hog(niceness: int) -> None:
    os.nice(niceness)
    while True:
        pass


def run_once(hogs: int, args, extra: list[str]) -> dict:
    work = tempfile.mkdtemp(prefix=f"mpisage-stress{hogs}-")
    overrides = [f"rounds={args.rounds}", "fsl.align_interval=2", "checkpoint.interval=2", f"run_dir={work}/run",
                 *extra]
    argv, env = job_command(args.ranks, overrides)
    procs = [multiprocessing.Process(target=_hog, args=(args.nice,), daemon=True) for _ in range(hogs)]
    for p in procs:
        p.start()
    start = time.monotonic()
    try:
        job = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.limit_s)
        code, out, err = job.returncode, job.stdout, job.stderr
    except subprocess.TimeoutExpired as e:
        code, out, err = None, str(e.stdout or ""), str(e.stderr or "")
    seconds = time.monotonic() - start
    load = os.getloadavg()[0]
    for p in procs:
        p.terminate()
        p.join()
    alarm = [line for line in err.splitlines() if "stopped answering" in line]
    return {"hogs": hogs, "finished": code == 0 and "[mpisage] done" in out, "code": code, "seconds": seconds,
            "load": load, "alarm": alarm[0] if alarm else "", "tail": (out + err)[-600:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hogs", type=int, action="append", help="number of CPU hogs (repeatable; default 2 and 4)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ranks", type=int, default=11)
    p.add_argument("--nice", type=int, default=10, help="niceness of the hogs (the job itself is not niced)")
    p.add_argument("--limit-s", type=float, default=900.0, help="give up on a job after this long")
    p.add_argument("overrides", nargs="*", help="extra key=value settings for the job")
    args = p.parse_args()
    failed = 0
    for hogs in args.hogs or [2, 4]:
        r = run_once(hogs, args, args.overrides)
        print(f"[stress] {hogs} hogs (nice {args.nice}): finished={r['finished']} exit={r['code']} "
              f"{r['seconds']:.0f} s, load average {r['load']:.1f}" + (f" | ALARM: {r['alarm']}" if r["alarm"] else ""),
              flush=True)
        if not r["finished"]:
            failed += 1
            print(r["tail"], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
