"""The run's metrics file, written by rank 0 only: `<run_dir>/metrics.h5`, one entry per completed round in
resizable datasets under the group `rounds`, flushed every round so it can be read while the run goes. The
resolved config and the environment are attributes of the file.

Also here, once each: the row's columns (`ROW`, the framework's metrics; an algorithm adds its own through its
report fields), the byte units, and the stop rule every run and every tool applies (`run_finished`)."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass

import h5py
import numpy as np

from mpisage.runtime.rundir import DiskFull, raise_if_disk_full

MIB = 1024 ** 2     # the unit of `comm_threshold_mb`

GIB = 1024 ** 3     # the unit every byte figure is shown in
# Free space every write of the metrics file needs before it starts. HDF5 cannot survive running out of space in the
# middle of a metadata write (its flush and its switch to SWMR mode): the file is left half-flushed and h5py then
# segfaults when it closes it, at the latest at exit. Refusing to write with less than this left keeps HDF5 from
# ever meeting ENOSPC there, so the file closes cleanly with every row already written. (A row is a few KB.)
HEADROOM_BYTES = 4 * 1024 ** 2


def run_finished(rounds_done: int, comm_bytes: float, rounds: int, comm_threshold_mb: float) -> bool:
    """The stop rule: all `rounds` done, or the paper-figure communication load reached `comm_threshold_mb` (MiB).
    The F-servers stop on it (or on a preemption signal); the comparison tools tell a finished run by it."""
    return rounds_done >= rounds or comm_bytes >= comm_threshold_mb * MIB


# ------------------------------------------------------------------------------------------- the row's columns
@dataclass(frozen=True)
class Column:
    name: str
    runs: str       # "all", "sync" (rounds) or "async" (global updates): which F-server records it
    doc: str


class RowSchema:
    """The framework's metrics, one dataset per column, declared once: each F-server's row must have exactly the
    columns of its kind (plus the algorithm's own report fields), so a column cannot go missing on one side."""

    def __init__(self, *columns: Column):
        self.columns = {c.name: c for c in columns}

    def names(self, runs: str) -> list[str]:
        return [c.name for c in self.columns.values() if c.runs in ("all", runs)]

    def check(self, row: dict, runs: str, algorithm_fields=()) -> dict:
        """`row` itself, once it has every column of `runs` and nothing undeclared."""
        expected = set(self.names(runs)) | set(algorithm_fields)
        if set(row) != expected:
            raise KeyError(f"metrics row ({runs}): missing columns {sorted(expected - set(row))}, undeclared "
                           f"columns {sorted(set(row) - expected)}; declare a column in mpisage/runtime/metrics.py ROW")
        return row

    def markdown(self) -> str:
        """The columns as a Markdown table (for the docs)."""
        return "\n".join(["| column | recorded by | meaning |", "|---|---|---|"] +
                          [f"| `{c.name}` | {c.runs} | {c.doc} |" for c in self.columns.values()])


ROW = RowSchema(
    Column("round", "all", "the round (asynchronous: the global update) the row records, from 0"),
    Column("test_acc", "all", "accuracy of the round's global model on the test set"),
    Column("test_loss", "all", "its mean test loss"),
    Column("eval_seconds", "all", "seconds the S-server spent evaluating it"),
    Column("eval_lag_seconds", "sync", "seconds from the global model's existence to its row"),
    Column("comm_bytes", "all", "cumulative paper-figure bytes (what the paper counts), every rank"),
    Column("wire_bytes", "all", "cumulative bytes on the wire, every rank"),
    Column("paper_bytes_by_kind", "all", "cumulative paper bytes per message kind"),
    Column("wire_bytes_by_kind", "all", "cumulative wire bytes per message kind"),
    Column("messages_by_kind", "all", "cumulative messages per message kind"),
    Column("wire_bytes_by_link", "sync", "cumulative wire bytes [source role, destination role]"),
    Column("wall_time", "all", "seconds since the start when the round's global model was ready"),
    Column("round_seconds", "all", "wall seconds of the round (asynchronous: since the previous update)"),
    Column("simulated_time", "async", "the straggler clock's seconds at the update"),
    Column("participations_by_client", "async", "returned models per client, as of the update"),
    Column("client_local_loss", "sync", "per client: mean loss of the losses it computed itself"),
    Column("client_local_acc", "sync", "per client: accuracy of those"),
    Column("client_train_seconds", "all", "per client: seconds of local training (asynchronous: cumulative)"),
    Column("server_train_loss", "sync", "per client: mean loss of the S-server's steps on its uploads"),
    Column("server_train_acc", "sync", "per client: accuracy of those"),
    Column("resident_bytes_by_rank", "all", "per rank: resident memory (asynchronous: each rank's latest report)"),
    Column("sserver_busy_seconds", "all", "seconds the S-server computed (asynchronous: cumulative)"),
    Column("sserver_round_seconds", "sync", "seconds of the S-server's round"),
    Column("wait_seconds_by_rank", "sync", "per rank: seconds waiting for messages in the round"),
    Column("client_idle_seconds_by_rank", "sync", "per client rank: seconds with nothing to do in the round"),
    Column("checkpoint_bytes_by_rank", "all", "per rank: bytes of its state in the checkpoint after this row"),
    Column("checkpoint_seconds", "all", "seconds to gather and write that checkpoint (0: none)"),
)


class MetricsFile:
    def __init__(self, path: str, attrs: dict, history: dict[str, np.ndarray] | None = None):
        """A new file; when resuming, `history` (the rounds saved in the checkpoint) is written first, so the
        resumed run appends without gaps or duplicates whatever became of the old file."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.file = None
        with self._writing():
            self.file = h5py.File(path, "w", libver="latest")
            for k, v in attrs.items():
                self.file.attrs[k] = v if isinstance(v, (str, int, float, np.ndarray)) else json.dumps(v)
            self.rounds = self.file.create_group("rounds")
            for name, values in (history or {}).items():
                self.rounds.create_dataset(name, data=values, maxshape=(None, *values.shape[1:]),
                                           chunks=(64, *values.shape[1:]))

    @contextmanager
    def _writing(self):
        """Every write: refused up front (DiskFull, the file closed intact) when the disk is nearly full; an
        ENOSPC HDF5 meets anyway (another process filled the disk meanwhile) is named too."""
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
        if free < HEADROOM_BYTES:
            self.close()
            raise DiskFull(self.path)
        try:
            yield
        except (OSError, RuntimeError) as e:
            raise_if_disk_full(e, self.path)
            raise

    def history(self) -> dict[str, np.ndarray]:
        """Every round recorded so far (for the checkpoint)."""
        return {name: d[()] for name, d in self.rounds.items()}

    def set(self, name: str, value) -> None:
        """A per-run dataset (e.g. the label histograms), written once, before the first round."""
        with self._writing():
            if name in self.file:
                del self.file[name]
            self.file.create_dataset(name, data=np.asarray(value))

    def append(self, values: dict) -> None:
        """Appends one round: each value is a scalar or an array of fixed shape."""
        with self._writing():
            self._append(values)

    def _append(self, values: dict) -> None:
        for name, value in values.items():
            arr = np.asarray(value)
            if name not in self.rounds:
                self.rounds.create_dataset(name, shape=(0, *arr.shape), maxshape=(None, *arr.shape),
                                           dtype=arr.dtype if arr.dtype != np.float32 else np.float64,
                                           chunks=(64, *arr.shape))
            d = self.rounds[name]
            d.resize(d.shape[0] + 1, axis=0)
            d[-1] = arr
        if not self.file.swmr_mode:
            # From here on readers may open the file while the run writes it (no dataset may be added after).
            self.file.swmr_mode = True
        self.file.flush()

    def update_last(self, values: dict) -> None:
        """Overwrites figures of the last round appended (known only after it was recorded, e.g. the cost of the
        checkpoint that saves it)."""
        with self._writing():
            for name, value in values.items():
                self.rounds[name][-1] = np.asarray(value)
            self.file.flush()

    def close(self) -> None:
        if self.file is not None and self.file.id.valid:
            self.file.close()


def read_rounds(path: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", swmr=True) as f:
        return {k: f["rounds"][k][()] for k in f["rounds"]}


def read_attrs(path: str) -> dict:
    with h5py.File(path, "r", swmr=True) as f:
        return dict(f.attrs)


def read_dataset(path: str, name: str, default=None):
    """A per-run dataset written with `MetricsFile.set` (e.g. "test_samples"); `default` when the file predates it."""
    with h5py.File(path, "r", swmr=True) as f:
        return f[name][()] if name in f else default
