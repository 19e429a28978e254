"""A run directory belongs to one run, and to one job at a time.

The lock: `<run_dir>/mpisage.lock`, created with O_CREAT|O_EXCL (atomic on local disks, NFSv3+, Lustre and GPFS),
holding the owner's host, pid, start time and Slurm job id as JSON. Rank 0 refreshes its mtime every REFRESH_S
seconds while the job runs and removes it at the end. HDF5's own file locking plays no part (many cluster sites
switch it off with HDF5_USE_FILE_LOCKING=FALSE). A lock is stale, and taken over with a line saying so, when
  - its owner ran on this host and that pid is gone (kill -9, a crash), or
  - it names this job's own Slurm job id (a requeued job), or
  - its mtime is more than STALE_S seconds old (its owner's node died or lost the file system).
Rank 0 decides and every rank learns the outcome (one broadcast of a raw integer), so a refused job ends on every
rank instead of hanging.

Ownership: a new run (no checkpoint to resume) in a directory that holds another run's metrics or checkpoints is
refused, unless `overwrite=true`, which moves those files into `<run_dir>/replaced-<time>/` (never deletes them).
Each run has an id (kept in every checkpoint it writes, inherited on resume); checkpoint rotation deletes only
files with the writing run's id."""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import socket
import threading
import time
import uuid

import numpy as np

from mpisage.runtime.stateful import CheckpointError

LOCK_NAME = "mpisage.lock"
REFRESH_S = 15.0      # how often the holder touches its lock
STALE_S = 120.0       # a lock untouched this long belongs to a job that is gone (clock skew between nodes < this)
RUN_FILES = ("metrics.h5", "checkpoint_round*.h5", "checkpoint_round*.h5.tmp")
logger = logging.getLogger("mpisage")

_run_ids: dict[str, str] = {}      # absolute run_dir -> id of the run writing there (rank 0 of this process)


class RunDirError(CheckpointError):
    """A run directory this job may not use (held by another job, or holding another run)."""


def run_id(run_dir: str) -> str:
    """The id of the run writing in `run_dir` from this process ("" if none was claimed: an old-style run)."""
    return _run_ids.get(os.path.abspath(run_dir), "")


def adopt_run_id(run_dir: str, checkpoint: str | None) -> str:
    """The run's id: a resumed run continues its checkpoint's run (its id, or "" for a checkpoint from before ids),
    a new run gets a fresh one."""
    if checkpoint is None:
        rid = uuid.uuid4().hex
    else:
        import h5py
        with h5py.File(checkpoint, "r") as f:
            rid = str(f.attrs.get("run_id", ""))
    _run_ids[os.path.abspath(run_dir)] = rid
    return rid


def run_files(run_dir: str) -> list[str]:
    return sorted(p for pattern in RUN_FILES for p in glob.glob(os.path.join(run_dir, pattern)))


def prepare_fresh_run(cfg) -> None:
    """Rank 0, for a run that starts afresh: refuses a directory holding another run's files, or with
    overwrite=true moves them aside."""
    found = run_files(cfg.run_dir)
    if not found:
        return
    names = ", ".join(os.path.basename(p) for p in found[:4]) + (" ..." if len(found) > 4 else "")
    if cfg.resume == "auto" and not cfg.overwrite and _same_run_without_checkpoint(cfg, found):
        _move_aside(cfg.run_dir, found, "the metrics of this run's start, which ended before its first checkpoint")
        return
    if not cfg.overwrite:
        raise RunDirError(
            f"run_dir {cfg.run_dir} already holds another run ({names}); a new run would overwrite it. Use "
            f"resume=auto to continue that run, another run_dir=, or overwrite=true to move its files aside into "
            f"{cfg.run_dir}/replaced-<time>/")
    _move_aside(cfg.run_dir, found, "overwrite=true: the previous run's files")


def _same_run_without_checkpoint(cfg, found: list[str]) -> bool:
    """resume=auto finding only a metrics file written with this very config: this run, stopped before its first
    checkpoint (its rounds are done again), not another run."""
    if [os.path.basename(p) for p in found] != ["metrics.h5"]:
        return False
    from mpisage.runtime.checkpoint import config_differences
    from mpisage.runtime.metrics import read_attrs
    try:
        return not config_differences(str(read_attrs(found[0])["config"]), cfg)
    except (OSError, KeyError, ValueError):
        return False


def _move_aside(run_dir: str, found: list[str], what: str) -> None:
    aside = os.path.join(run_dir, time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime()))
    while os.path.exists(aside):
        aside += "+"
    os.makedirs(aside)
    for p in found:
        os.replace(p, os.path.join(aside, os.path.basename(p)))
    logger.warning(f"[mpisage] {what} ({len(found)} file(s)) moved from {run_dir} to {aside}")


class DiskFull(OSError):
    """Rank 0 ran out of space writing a file of the run: named, never a crash."""

    def __init__(self, path: str):
        super().__init__(errno.ENOSPC, f"no space left on device writing {path}")
        self.path = path

    def __str__(self) -> str:
        return f"no space left on device writing {self.path}"


def raise_if_disk_full(e: BaseException, path: str) -> None:
    """Turns HDF5's and the OS's many ways of saying ENOSPC (or EFBIG: a file-size limit) into DiskFull."""
    if isinstance(e, DiskFull):
        raise e
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG) or "errno = 28" in str(e) or "errno = 27" in str(e):
        raise DiskFull(path) from None


# ------------------------------------------------------------------------------------------------- the lock
def _me(started: float) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started,
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}


def read_lock(path: str) -> dict:
    """The holder recorded in a lock file ({} while its owner is still writing it, or if it is unreadable)."""
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    return True


def stale_reason(holder: dict, age_s: float) -> str | None:
    """Why the lock of `holder` (its mtime `age_s` seconds ago) is stale, or None while its job may be alive."""
    me = _me(time.time())
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return f"it is this Slurm job's own ({me['slurm_job_id']}, requeued)"
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
        return f"its process {holder['pid']} on this host is gone"
    if age_s > STALE_S:
        return f"it was last refreshed {age_s:.0f} s ago (more than {STALE_S:.0f} s)"
    return None


def describe(holder: dict) -> str:
    if not holder:
        return "a job that is still writing its lock"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started_utc')}{job}"


class RunDirLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.started = time.time()
        self.holder = _me(self.started)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one; RunDirError naming the holder if a live job has it."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.holder, f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._refresh, name="run_dir lock", daemon=True)
            self._thread.start()
            return
        raise RunDirError(f"could not take the lock {self.path} (another job took it meanwhile)")

    def _take_over_if_stale(self) -> None:
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return      # released meanwhile: try again
        holder = read_lock(self.path)
        reason = stale_reason(holder, age)
        if reason is None:
            raise RunDirError(
                f"run_dir {os.path.dirname(self.path)} is in use by another job ({describe(holder)}); wait for it to "
                f"end, or use another run_dir. If that job is dead, delete {self.path}")
        # Renamed, not deleted, so that of two jobs taking over at once only one moves it; the other finds no file,
        # or (if the winner already made a new lock) a fresh lock, and is refused.
        moved = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        if read_lock(moved) != holder:        # we moved a newer lock than the one judged stale: put it back
            os.rename(moved, self.path)
            raise RunDirError(f"run_dir {os.path.dirname(self.path)} was just taken by another job "
                              f"({describe(read_lock(self.path))}); use another run_dir")
        os.remove(moved)
        logger.warning(f"[mpisage] taking over the lock of {os.path.dirname(self.path)} left by {describe(holder)}: "
                       f"{reason}")

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass      # a file system hiccup: the next refresh tries again, STALE_S allows several misses

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if read_lock(self.path) == self.holder:     # still ours (never remove a lock a later job took over)
                os.remove(self.path)


def claim(cfg, comm) -> RunDirLock | None:
    """Every rank calls it: rank 0 takes the run_dir's lock and tells every rank whether it got it; a refusal is a
    RunDirError on every rank (rank 0's names the holder). Returns the lock on rank 0 (release it at the end)."""
    lock, error = None, None
    if comm.Get_rank() == 0:
        try:
            lock = RunDirLock(cfg.run_dir)
            lock.acquire()
        except (RunDirError, OSError) as e:
            lock, error = None, e if isinstance(e, RunDirError) else RunDirError(f"cannot lock run_dir {cfg.run_dir}: {e}")
    status = np.array([error is not None], dtype=np.int64)
    comm.Bcast(status, root=0)
    if error is not None:
        raise error
    if status[0]:
        raise RunDirError(f"rank 0 could not take run_dir {cfg.run_dir} (its message says why)")
    return lock
