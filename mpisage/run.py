"""Entry point: `mpirun -n 11 python -m mpisage.run [-c configs/X.yaml] [key=value ...]`.

Rank 0 is the F-server, rank 1 the S-server, ranks 2.. the clients. Any exception on any rank aborts the whole
job (MPI_Abort) after printing the rank, its role and the reason, so nothing hangs."""
from __future__ import annotations

import os
import sys
import traceback

# Ranks outnumber cores: keep each rank to its threads and make MPICH waits yield (set before MPI starts).
os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _fail(rank: int, role: str, exc: BaseException) -> None:
    from mpisage.transport import abort_job
    detail = "".join(traceback.format_exception(exc)) if os.environ.get("MPISAGE_TRACEBACK", "1") != "0" else ""
    abort_job(f"{detail}[mpisage] rank {rank} ({role}) failed: {type(exc).__name__}: {exc}\n"
              f"[mpisage] aborting all ranks\n")


def run_job(cfg, comm, log=None) -> dict:
    """Runs one job on `comm` (every rank calls it); returns the last round's metrics on rank 0, {} elsewhere."""
    import torch
    from mpi4py import MPI

    from mpisage import preemption
    from mpisage.checkpoint import agree_on_checkpoint
    from mpisage.devices import configure_devices
    from mpisage.transport import Heartbeat, Transport
    from mpisage.world import make_world

    preemption.install()
    torch.set_num_threads(cfg.torch_threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    transport = Transport(comm, timeout_s=cfg.comm_timeout_s)
    transport.set_wire_formats(cfg.wire.activations, cfg.wire.gradients)
    world = make_world(cfg, transport)
    world.device = configure_devices(cfg, transport)   # collective: every rank, before any model is built
    world.resume_from = agree_on_checkpoint(world.transport, cfg)
    heartbeat = None
    if cfg.heartbeat_timeout_s > 0 and MPI.Query_thread() == MPI.THREAD_MULTIPLE:
        heartbeat = Heartbeat(world.transport, cfg.heartbeat_s, cfg.heartbeat_timeout_s).start()
    try:
        return _run_role(cfg, world, comm, log)
    finally:
        if heartbeat is not None:
            heartbeat.stop()


def _run_role(cfg, world, comm, log) -> dict:
    from mpisage.algorithms import make_algorithm
    algo = make_algorithm(world)
    rank = comm.Get_rank()
    if algo.asynchronous:
        from mpisage.asynchronous import run_async_client, run_async_fserver, run_async_sserver
        if world.start_round >= cfg.rounds:      # resumed after its last update: nothing left to do on any rank
            if rank == 0:
                (log or _print)(f"[mpisage] {cfg.run_dir} already holds {world.start_round} updates; raise rounds= "
                                f"to continue it")
            return {}
        if rank == 0:
            _announce(cfg, world, comm, log, updates=True)
            return run_async_fserver(algo, log=log or _print)
        run_async_sserver(algo) if rank == 1 else run_async_client(algo)
        return {}
    if rank == 0:
        from mpisage.fserver import run_fserver
        _announce(cfg, world, comm, log)
        return run_fserver(algo, log=log or _print)
    if rank == 1:
        from mpisage.sserver import run_sserver
        run_sserver(algo)
    else:
        from mpisage.client import run_client
        run_client(algo)
    return {}


def _print(line: str) -> None:
    print(line, flush=True)


def _announce(cfg, world, comm, log, updates: bool = False) -> None:
    """The job's first line; an asynchronous method counts global updates, not rounds."""
    (log or _print)(f"[mpisage] {cfg.algorithm} | {cfg.model} on {cfg.dataset.name} ({cfg.dataset.distribution}) | "
                    f"{world.num_clients} clients on {comm.Get_size() - 2} client ranks | up to {cfg.rounds} "
                    f"{'global updates' if updates else 'rounds'} | run_dir {cfg.run_dir}")


def main(argv: list[str] | None = None) -> int:
    from mpi4py import MPI

    from mpisage.config import ConfigError, load_config, parse_args

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    role = {0: "F-server", 1: "S-server"}.get(rank, "client")
    try:
        # Every rank parses the same arguments identically, so a bad config stops every rank the same way.
        cfg = load_config(*parse_args(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        if rank == 0:
            sys.stderr.write(f"[mpisage] config error: {e}\n")
        return 2
    except SystemExit as e:   # --help
        if rank == 0:
            print(e.code)
        return 0
    from mpisage.checkpoint import CheckpointError
    from mpisage.data import DataError

    try:
        summary = run_job(cfg, comm)
        if rank == 0 and summary:
            print(f"[mpisage] done: test acc {summary['test_acc']:.4f} after {summary['round'] + 1} rounds, "
                  f"{summary['comm_bytes'] / 1024 ** 3:.3f} GiB, metrics in {cfg.run_dir}/metrics.h5", flush=True)
    except (ConfigError, DataError, CheckpointError) as e:
        # Start-up checks that need MPI or data (rank counts, partitions, files) fail identically on every rank.
        if rank == 0:
            what = {DataError: "data", CheckpointError: "checkpoint"}.get(type(e), "config")
            sys.stderr.write(f"[mpisage] {what} error: {e}\n")
        return 2
    except BaseException as e:  # noqa: BLE001 - any failure must take the whole job down, not hang it
        _fail(rank, role, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
