"""The run's metrics file, written by rank 0 only: `<run_dir>/metrics.h5`, one entry per completed round in
resizable datasets under the group `rounds`, flushed every round so it can be read while the run goes. The
resolved config and the environment are attributes of the file."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager

import h5py
import numpy as np

from mpisage.runtime.rundir import DiskFull, raise_if_disk_full

GIB = 1024 ** 3     # the unit every byte figure is shown in
# Free space every write of the metrics file needs before it starts. HDF5 cannot survive running out of space in the
# middle of a metadata write (its flush and its switch to SWMR mode): the file is left half-flushed and h5py then
# segfaults when it closes it, at the latest at exit. Refusing to write with less than this left keeps HDF5 from
# ever meeting ENOSPC there, so the file closes cleanly with every row already written. (A row is a few KB.)
HEADROOM_BYTES = 4 * 1024 ** 2


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
