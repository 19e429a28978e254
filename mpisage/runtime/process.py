"""The process environment every rank runs under, in one place (no heavy imports: it must take effect before MPI
starts). Ranks outnumber cores: each rank keeps to one thread, and MPICH / Open MPI waits yield the CPU instead of
busy-polling. The Makefile and slurm/launch.sh export the same for the launcher's shell."""
import os

RANK_ENVIRONMENT = {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1", "OMPI_MCA_mpi_yield_when_idle": "1", "OMP_NUM_THREADS": "1"}


def prepare_rank_environment(env: dict | None = None) -> dict:
    """Sets every RANK_ENVIRONMENT variable the user has not set, in `env` (default: this process's); returns it."""
    env = os.environ if env is None else env
    for name, value in RANK_ENVIRONMENT.items():
        env.setdefault(name, value)
    return env


def find_rank_process(rank: int, marker: str) -> int:
    """The pid of MPI rank `rank` of the local `python -m mpisage.run` job whose command line contains `marker`
    (its run_dir, say): for fault-injection tests and probes (kill -9, SIGSTOP one rank). Linux (/proc), MPICH."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in env and marker.encode() in cmd and b"mpisage.run" in cmd:
            return int(pid)
    raise LookupError(f"no process of rank {rank} of a job with {marker!r} in its command line")
