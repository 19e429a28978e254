"""A run directory at the edges (multi-rank): a new run in a used directory, a directory locked by another live job
and a resume with another rank count are refused on every rank before anything is written, and the earlier run's
files stay as they were."""
import os

import pytest
from conftest import on_root, run_job, write_on_root

pytestmark = pytest.mark.mpi(min_size=4)
OTHERS = "ConfigError"      # what the other ranks raise when rank 0 rejects the start (its message says why)


def refused(overrides: list[str], ranks: int | None = None) -> str:
    """Runs a job expected to be refused; returns the exception's class name on each rank of the job ("" outside,
    "none" if it ran)."""
    from mpi4py import MPI

    from mpisage.config import load_config
    from mpisage.run import run_job as _run
    cfg = load_config(None, overrides)
    world = MPI.COMM_WORLD
    inside = ranks is None or world.Get_rank() < ranks
    comm = world.Split(0 if inside else MPI.UNDEFINED, world.Get_rank())
    if not inside:
        return ""
    try:
        _run(cfg, comm, log=lambda line: None)
        return "none"
    except Exception as e:  # noqa: BLE001 - what is asserted
        return type(e).__name__
    finally:
        comm.Free()


def test_a_used_run_dir_a_held_lock_and_another_rank_count_are_refused_on_every_rank(shared_tmp):
    from mpi4py import MPI

    from mpisage.data import write_fashion_mnist_fixture
    from mpisage.runtime.checkpoint import list_checkpoints
    from mpisage.runtime.metrics import read_rounds
    rank = MPI.COMM_WORLD.Get_rank()
    data = os.path.join(shared_tmp, "fmnist")
    write_on_root(write_fashion_mnist_fixture, data, 200, 40)
    run_dir = os.path.join(shared_tmp, "run")
    common = [f"dataset.root={data}", "num_clients=2", "batch_size=32", "runtime.deterministic=true", "checkpoint.interval=1",
              "algorithm=fed_avg", f"run_dir={run_dir}"]
    run_job(common + ["rounds=3"])

    def files():
        rounds = read_rounds(os.path.join(run_dir, "metrics.h5"))["round"]
        names = [int(os.path.basename(p)[16:22]) for p in list_checkpoints(run_dir)]
        return [len(rounds), *names]

    before = on_root(files)
    assert list(before) == [3, 1, 2]
    # 1. a new run (another seed, fewer rounds) in the used directory
    assert refused(common + ["rounds=2", "seed=7"]) == ("RunDirError" if rank == 0 else OTHERS)
    assert list(on_root(files)) == list(before), "the refused run touched the earlier run's files"
    # 3. the run resumed with 3 ranks instead of 4 (rank 3 sits this one out)
    assert refused(common + ["rounds=4", "resume=auto"], ranks=3) == {0: "CheckpointError", 3: ""}.get(rank, OTHERS)
    assert list(on_root(files)) == list(before), "the refused resume touched the run's files"
    # 2. another job holds the directory (a fresh lock of a job on another node)
    def lock():
        import json
        import time
        with open(os.path.join(run_dir, "mpisage.lock"), "w") as f:
            json.dump({"host": "node-elsewhere", "pid": 1, "started": time.time(), "started_utc": "now"}, f)
    write_on_root(lock)
    assert refused(common + ["rounds=4", "resume=auto"]) == "RunDirError"      # decided before any other step
    write_on_root(os.remove, os.path.join(run_dir, "mpisage.lock"))
    # and the rightful resume continues the run
    run_job(common + ["rounds=4", "resume=auto", "runtime.heartbeat_timeout_s=60"])     # timeouts may change on resume
    assert list(on_root(files)) == [4, 2, 3]
    assert not os.path.exists(os.path.join(run_dir, "mpisage.lock"))
