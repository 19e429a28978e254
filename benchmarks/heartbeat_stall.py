"""The watcher's own stall: rank 0's main thread holds the GIL in one C call for STALL seconds (as a long C
extension call, a swapped-out or starved process would stop its heartbeat thread) while every other rank keeps
beating. A watcher that measured silence on the wall clock named a healthy peer the moment it woke.

    mpirun -n 6 python benchmarks/heartbeat_stall.py [STALL_S=12] [TIMEOUT_S=8]

Only rank 0 judges at TIMEOUT_S (the others are lenient: rank 0 really is silent to them). Prints "no alarm" when
rank 0 named nobody; otherwise the job aborts with the heartbeat's message."""
import ctypes
import sys
import time

from mpi4py import MPI

from mpisage.runtime.heartbeat import Heartbeat
from mpisage.runtime.transport import Transport

stall = float(sys.argv[1]) if len(sys.argv) > 1 else 12.0
timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 8.0
comm = MPI.COMM_WORLD
heartbeat = Heartbeat(Transport(comm, timeout_s=600), 0.5, timeout if comm.rank == 0 else 10_000).start()
time.sleep(3)
if comm.rank == 0:
    began = time.monotonic()
    ctypes.PyDLL(None).sleep(int(stall))      # libc sleep() through PyDLL: a C call that keeps the GIL
    print(f"rank 0 held the GIL for {time.monotonic() - began:.1f} s (runtime.heartbeat_timeout_s={timeout:g})",
          flush=True)
time.sleep(5)
heartbeat.stop()
if comm.rank == 0:
    print("no alarm", flush=True)
