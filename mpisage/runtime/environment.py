"""Facts about the software and machine a run used, stored with its metrics."""
from __future__ import annotations

import json
import os
import platform
import subprocess

import h5py
import numpy as np
import torch
from mpi4py import MPI

import mpisage


def git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(comm, transport=None) -> str:
    """A JSON string: versions, MPI library and size, device facts, git revision. With the job's `transport` (after
    mpisage.runtime.devices.configure_devices), also every rank's device, the payload path and how CUDA-awareness was
    decided; without it, only what this rank's MPI library says."""
    import mpi4py

    from mpisage.runtime.transport import query_mpi_cuda_support
    awareness = getattr(transport, "cuda_awareness", None)
    if awareness is not None:
        cuda_aware = awareness.as_dict()
    else:
        cuda_aware = {"library": query_mpi_cuda_support(),
                      "how": "not decided: mpisage.runtime.devices.configure_devices was not called for this job"}
    return json.dumps({
        "mpisage": mpisage.__version__, "git": git_revision(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__, "h5py": h5py.__version__, "mpi4py": mpi4py.__version__,
        "mpi_library": MPI.Get_library_version().splitlines()[0].strip(), "mpi_ranks": comm.Get_size(),
        "cuda_available": torch.cuda.is_available(), "cuda_aware_mpi": bool(cuda_aware.get("aware", False)),
        "cuda_aware": cuda_aware, "payload_path": getattr(transport, "payload_path", None),
        "devices": getattr(transport, "devices", None),
        "host": platform.node(), "torch_threads": torch.get_num_threads(),
    })


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; elsewhere the peak, from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def job_command(ranks: int, overrides) -> tuple[list[str], dict]:
    """(argv, environment) to launch `mpirun -n RANKS python -m mpisage.run OVERRIDES...` from Python: the mpirun
    beside this interpreter when there is one (pip's MPICH in the venv), waiting ranks told to yield the CPU."""
    import sys
    local = os.path.join(os.path.dirname(sys.executable), "mpirun")
    argv = [local if os.path.exists(local) else "mpirun", "-n", str(ranks), sys.executable, "-m", "mpisage.run",
            *overrides]
    from mpisage.runtime.process import prepare_rank_environment
    return argv, prepare_rank_environment(dict(os.environ))
