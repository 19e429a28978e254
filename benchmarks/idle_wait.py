"""What waiting ranks cost the machine: CPU seconds a rank spends polling while it waits for one message, with
mpisage's pauses as they are against the earlier fixed 2-ms cap, in one run.

    mpirun -n 11 python benchmarks/idle_wait.py [--seconds 10]

Rank 0 sleeps `seconds`, then sends every other rank a small message; the others wait for it in
Transport.recv (as client ranks wait for an aligned aux model or for the round's averages). Each waiting rank
measures its own CPU time (user + system, getrusage) over the wait; rank 0 prints the median and the sum over
the waiting ranks, as seconds and as a share of one core, for each setting.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from mpi4py import MPI

from mpisage.runtime import transport as transport_module
from mpisage.runtime.transport import Kind, Transport

SETTINGS = {"fixed 2-ms cap (before)": (2e-3, 1.0, 2e-3),
            "now": (transport_module.SHORT_PAUSE_S, transport_module.LONG_WAIT_S, transport_module.LONG_PAUSE_S)}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    t = Transport(comm, timeout_s=600)
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == 0:
        print(f"{size - 1} ranks wait {args.seconds:.0f} s for one message on {MPI.Get_processor_name()}",
              flush=True)
    for round, (name, pauses) in enumerate(SETTINGS.items()):
        (transport_module.SHORT_PAUSE_S, transport_module.LONG_WAIT_S, transport_module.LONG_PAUSE_S) = pauses
        comm.Barrier()
        used = np.zeros(1)
        if rank == 0:
            time.sleep(args.seconds)
            for r in range(1, size):
                t.send(r, Kind.CONTROL, torch.zeros(1, dtype=torch.int64), round=round)
            t.flush()
        else:
            before = cpu_seconds()
            t.recv(Kind.CONTROL, 0, round=round, shape=(1,), dtype=torch.int64)
            used[0] = cpu_seconds() - before
        every = np.zeros(size) if rank == 0 else None
        comm.Gather(used, every, root=0)
        if rank == 0:
            waiting = every[1:]
            print(f"{name:26s}: per waiting rank median {np.median(waiting):.3f} CPU s "
                  f"({np.median(waiting) / args.seconds:.1%} of a core); all {size - 1} together "
                  f"{waiting.sum():.2f} CPU s ({waiting.sum() / args.seconds:.1%} of a core)", flush=True)


if __name__ == "__main__":
    main()
