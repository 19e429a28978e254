"""Entry point: `mpirun -n 11 python -m mpisage.run [-c configs/X.yaml] [key=value ...]`.
`python -m mpisage.run --print-config [-c FILE] [key=value ...]` validates the same arguments and prints the resolved
config as YAML, without MPI or data (exit 0; a bad value: the one-line config error, exit 2).

Rank 0 is the F-server, rank 1 the S-server, ranks 2.. the clients. Any exception on any rank aborts the whole
job (MPI_Abort) after printing the rank, its role and the reason, so nothing hangs."""
from __future__ import annotations

import logging
import os
import sys
import traceback

from mpisage.runtime.process import prepare_rank_environment

prepare_rank_environment()      # before MPI starts
logger = logging.getLogger("mpisage")


def _fail(rank: int, role: str, exc: BaseException) -> None:
    from mpisage.runtime.rundir import DiskFull
    from mpisage.runtime.transport import abort_job
    if isinstance(exc, DiskFull):     # a plain fact, not a bug: no traceback
        abort_job(f"[mpisage] rank {rank}: {exc}; free space (the checkpoints and metrics already written are "
                  f"intact) and run again with resume=auto\n[mpisage] aborting all ranks\n")
        return
    detail = "".join(traceback.format_exception(exc)) if os.environ.get("MPISAGE_TRACEBACK", "1") != "0" else ""
    abort_job(f"{detail}[mpisage] rank {rank} ({role}) failed: {type(exc).__name__}: {exc}\n"
              f"[mpisage] aborting all ranks\n")


def run_job(cfg, comm, log=None) -> dict:
    """Runs one job on `comm` (every rank calls it); returns the last round's metrics on rank 0, {} elsewhere."""
    from mpisage.runtime.rundir import claim
    lock = claim(cfg, comm)       # first: a run_dir held by another job is refused before any work
    try:
        return _run_job(cfg, comm, log)
    finally:
        if lock is not None:
            lock.release()


def _run_job(cfg, comm, log) -> dict:
    import torch
    from mpi4py import MPI

    from mpisage.runtime import preemption
    from mpisage.runtime.checkpoint import agree_on_checkpoint
    from mpisage.runtime.devices import configure_devices
    from mpisage.runtime.heartbeat import Heartbeat
    from mpisage.runtime.transport import Transport
    from mpisage.runtime.world import make_world

    preemption.install()
    torch.set_num_threads(cfg.runtime.torch_threads)
    if cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True)
    transport = Transport(comm, timeout_s=cfg.runtime.comm_timeout_s)
    transport.set_wire_formats(cfg.wire.activations, cfg.wire.gradients)
    world = make_world(cfg, transport)
    world.device = configure_devices(cfg, transport)   # collective: every rank, before any model is built
    world.resume_from = agree_on_checkpoint(world.transport, cfg)
    heartbeat = None
    if cfg.runtime.heartbeat_timeout_s > 0 and MPI.Query_thread() == MPI.THREAD_MULTIPLE:
        heartbeat = Heartbeat(world.transport, cfg.runtime.heartbeat_s, cfg.runtime.heartbeat_timeout_s).start()
    try:
        return _run_role(cfg, world, comm, log)
    finally:
        if heartbeat is not None:
            heartbeat.stop()


def _run_role(cfg, world, comm, log) -> dict:
    from mpisage.algorithms import make_algorithm
    from mpisage.runtime.transport import F_SERVER, S_SERVER
    algo = make_algorithm(world)
    rank = comm.Get_rank()
    log = log or logger.info
    asynchronous = algo.schedule == "async"
    if asynchronous:
        from mpisage.roles.asynchronous import run_async_client as run_client
        from mpisage.roles.async_fserver import run_async_fserver as run_fserver
        from mpisage.roles.asynchronous import run_async_sserver as run_sserver
        if world.start_round >= cfg.rounds:      # resumed after its last update: nothing left to do on any rank
            if rank == F_SERVER:
                log(f"[mpisage] {cfg.run_dir} already holds {world.start_round} updates; raise rounds= to continue it")
            return {}
    else:
        from mpisage.roles.client import run_client
        from mpisage.roles.fserver import run_fserver
        from mpisage.roles.sserver import run_sserver
    if rank != S_SERVER:     # the F-server and client ranks copy only the client part, the aux and the shared parts
        world.release_parts({"client", "aux", *algo.shared_parts})
    if rank == F_SERVER:
        log(f"[mpisage] {cfg.algorithm} | {cfg.model} on {cfg.dataset.name} ({cfg.dataset.distribution}) | "
            f"{world.num_clients} clients on {world.num_client_ranks} client ranks | up to {cfg.rounds} "
            f"{'global updates' if asynchronous else 'rounds'} | run_dir {cfg.run_dir}")
        return run_fserver(algo, log=log)
    run_sserver(algo) if rank == S_SERVER else run_client(algo)
    return {}


def configure_logging(rank: int) -> None:
    """One rank speaks: rank 0 logs progress lines to stdout, one write per line (MPICH interleaves ranks' output
    mid-line otherwise); the other ranks log warnings and errors only."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def print_config(argv: list[str]) -> int:
    """--print-config: the config a run with these arguments would use, checked as a run checks it (no MPI)."""
    from mpisage.config import ConfigError, load_config, parse_args, to_yaml
    try:
        sys.stdout.write(to_yaml(load_config(*parse_args(argv))))
    except ConfigError as e:
        sys.stderr.write(f"[mpisage] config error: {e}\n")
        return 2
    except SystemExit as e:   # --help
        print(e.code)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--print-config" in argv:
        return print_config([a for a in argv if a != "--print-config"])
    from mpi4py import MPI

    from mpisage.config import ConfigError, load_config, parse_args

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    role = {0: "F-server", 1: "S-server"}.get(rank, "client")
    configure_logging(rank)
    try:
        # Every rank parses the same arguments identically, so a bad config stops every rank the same way.
        cfg = load_config(*parse_args(argv))
    except ConfigError as e:
        if rank == 0:
            sys.stderr.write(f"[mpisage] config error: {e}\n")
        return 2
    except SystemExit as e:   # --help
        if rank == 0:
            print(e.code)
        return 0
    from mpisage.runtime.checkpoint import CheckpointError
    from mpisage.runtime.rundir import RunDirError
    from mpisage.data import DataError
    from mpisage.runtime.metrics import GIB

    try:
        summary = run_job(cfg, comm)
        if rank == 0 and summary:
            logger.info(f"[mpisage] done: test acc {summary['test_acc']:.4f} after {summary['round'] + 1} rounds, "
                        f"{summary['comm_bytes'] / GIB:.3f} GiB, metrics in {cfg.run_dir}/metrics.h5")
    except (ConfigError, DataError, CheckpointError) as e:
        # Start-up checks that need MPI or data (rank counts, partitions, files) fail identically on every rank.
        if rank == 0:
            what = {DataError: "data", CheckpointError: "checkpoint", RunDirError: "run_dir"}.get(type(e), "config")
            sys.stderr.write(f"[mpisage] {what} error: {e}\n")
        return 2
    except BaseException as e:  # noqa: BLE001 - any failure must take the whole job down, not hang it
        _fail(rank, role, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
