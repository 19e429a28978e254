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
