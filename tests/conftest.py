"""Shared test helpers. Multi-rank tests run in one `mpirun -n 4 pytest --with-mpi -m mpi` launch; each job gets
its own duplicated communicator so message streams of different tests never mix."""
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_root(fn, root: int = 0) -> np.ndarray:
    """Runs `fn` (returning a list of numbers) on rank `root` and broadcasts the result, so every rank asserts on
    it. If `fn` raises there, the other ranks still get an answer (NaN) instead of hanging in the broadcast."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    values = [float("nan")]
    if comm.Get_rank() == root:
        try:
            values = [float(v) for v in fn()]
        except Exception:  # noqa: BLE001 - reported on rank 0, turned into a failure on every rank
            import traceback
            traceback.print_exc()
            values = [float("nan")]
    out = bcast_array(comm, values, root=root)
    assert not (len(out) == 1 and np.isnan(out[0])), f"the check on rank {root} raised (traceback above)"
    return out


def write_on_root(fn, *args, **kwargs) -> None:
    """Rank 0 writes (fixtures, file surgery); every rank waits until it has."""
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_rank() == 0:
        fn(*args, **kwargs)
    MPI.COMM_WORLD.Barrier()


def bcast_array(comm, values, root: int = 0) -> np.ndarray:
    """Broadcast float64 values from `root` (raw buffer, no pickling) so every rank can assert on them."""
    n = np.array([len(values) if comm.Get_rank() == root else 0], dtype=np.int64)
    comm.Bcast(n, root=root)
    buf = np.asarray(values, dtype=np.float64) if comm.Get_rank() == root else np.empty(int(n[0]))
    comm.Bcast(buf, root=root)
    return buf


@pytest.fixture
def shared_tmp():
    """One temporary directory, the same path on every rank (rank 0 creates it)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    path = tempfile.mkdtemp(prefix="mpisage-test-") if comm.Get_rank() == 0 else ""
    raw = bytearray(path.encode().ljust(256, b"\0"))
    comm.Bcast(raw, root=0)
    path = raw.rstrip(b"\0").decode()
    yield path
    comm.Barrier()
    if comm.Get_rank() == 0:
        # Jobs' checkpoints run to hundreds of MB: a suite that keeps them fills the disk in a few runs.
        shutil.rmtree(path, ignore_errors=True)


def run_job(overrides: list[str], ranks: int | None = None) -> dict | None:
    """Runs a job in-process over a private communicator (the first `ranks` ranks, default all); rank 0 returns
    the last round, ranks outside the job return None at once."""
    from mpi4py import MPI

    from mpisage.config import load_config
    from mpisage.run import run_job as _run
    cfg = load_config(None, overrides)
    world = MPI.COMM_WORLD
    inside = ranks is None or world.Get_rank() < ranks
    comm = world.Split(0 if inside else MPI.UNDEFINED, world.Get_rank())
    if not inside:
        return None
    try:
        return _run(cfg, comm, log=lambda line: None)
    except BaseException:
        # The other ranks would wait for this one forever: fail the whole launch now, loudly.
        import traceback
        traceback.print_exc()
        sys.stderr.write(f"[test] rank {comm.Get_rank()} failed inside a job; aborting the launch\n")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
    finally:
        comm.Free()
