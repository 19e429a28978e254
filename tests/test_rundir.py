"""A run directory belongs to one run and one job: its lock (held, stale, requeued), the refusal of a new run in a
used directory, checkpoint rotation that deletes only the writing run's files, a full disk named (never a crash),
and the small start-up messages."""
import gzip
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from mpisage.runtime import rundir
from mpisage.runtime.rundir import LOCK_NAME, RunDirError, RunDirLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_lock(d, **holder):
    path = os.path.join(d, LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                   "started_utc": "2026-01-01 00:00:00 UTC", "slurm_job_id": "", **holder}, f)
    return path


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_live_lock_refuses_the_second_job_naming_the_first(tmp_path):
    first = RunDirLock(str(tmp_path))
    first.acquire()
    try:
        with pytest.raises(RunDirError, match=rf"in use by another job \(host {socket.gethostname()}, pid "
                                              rf"{os.getpid()}, started \d{{4}}-"):
            RunDirLock(str(tmp_path)).acquire()
    finally:
        first.release()
    assert not os.path.exists(tmp_path / LOCK_NAME), "the lock outlived its job"
    again = RunDirLock(str(tmp_path))      # released: the next job takes it
    again.acquire()
    again.release()


def test_a_live_lock_on_another_host_is_respected_until_it_goes_stale(tmp_path):
    path = _write_lock(tmp_path, host="node-elsewhere", pid=12345)
    with pytest.raises(RunDirError, match="node-elsewhere, pid 12345"):
        RunDirLock(str(tmp_path)).acquire()
    old = time.time() - rundir.STALE_S - 5       # its owner stopped refreshing it: node gone
    os.utime(path, (old, old))
    lock = RunDirLock(str(tmp_path))
    lock.acquire()
    assert rundir.read_lock(path)["pid"] == os.getpid()
    lock.release()


@pytest.mark.parametrize("how", ["dead pid on this host", "same Slurm job requeued"])
def test_a_lock_left_by_a_dead_job_is_taken_over_with_a_line(tmp_path, caplog, monkeypatch, how):
    if how == "dead pid on this host":
        _write_lock(tmp_path, pid=_dead_pid())
    else:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        _write_lock(tmp_path, host="node-elsewhere", pid=1, slurm_job_id="4242")
    caplog.set_level(logging.WARNING, logger="mpisage")
    lock = RunDirLock(str(tmp_path))
    lock.acquire()
    lock.release()
    assert "taking over the lock" in caplog.text
    assert ("is gone" if how.startswith("dead") else "requeued") in caplog.text


def _cfg(tmp_path, **kw):
    from mpisage.config import load_config
    return load_config(None, [f"run_dir={tmp_path}"] + [f"{k}={v}" for k, v in kw.items()])


def test_a_new_run_in_a_used_directory_is_refused_or_moves_the_old_files_aside(tmp_path):
    for name in ("metrics.h5", "checkpoint_round000004.h5", "checkpoint_round000005.h5"):
        (tmp_path / name).write_bytes(b"old run")
    with pytest.raises(RunDirError, match=rf"run_dir {tmp_path} already holds another run .*resume=auto.*"
                                          r"another run_dir=.*overwrite=true"):
        rundir.prepare_fresh_run(_cfg(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_round000004.h5", "checkpoint_round000005.h5", "metrics.h5"]
    rundir.prepare_fresh_run(_cfg(tmp_path, overwrite="true"))
    aside = [d for d in os.listdir(tmp_path) if d.startswith("replaced-")]
    assert len(aside) == 1 and sorted(os.listdir(tmp_path / aside[0])) == [
        "checkpoint_round000004.h5", "checkpoint_round000005.h5", "metrics.h5"]
    assert (tmp_path / aside[0] / "metrics.h5").read_bytes() == b"old run"     # moved, not rewritten


def _ckpt(run_dir, round, keep=2):
    from mpisage.runtime.checkpoint import write_checkpoint
    return write_checkpoint(str(run_dir), round, {"rank1": ({"w": torch.ones(3)}, {})}, {"config": ""}, keep)


def test_rotation_deletes_only_the_writing_runs_checkpoints(tmp_path):
    from mpisage.runtime.checkpoint import list_checkpoints
    rundir.adopt_run_id(str(tmp_path), None)              # an earlier run, to round 5
    for r in range(6):
        _ckpt(tmp_path, r)
    earlier = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert earlier == ["checkpoint_round000004.h5", "checkpoint_round000005.h5"]
    rundir.adopt_run_id(str(tmp_path), None)              # another run writes rounds 0..2 in the same directory
    for r in range(3):
        written = _ckpt(tmp_path, r)
        assert os.path.exists(written), f"the checkpoint of round {r} was deleted right after it was written"
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert names == ["checkpoint_round000001.h5", "checkpoint_round000002.h5"] + earlier


def test_resumable_changes_include_the_heartbeat(tmp_path):
    from mpisage.config import to_yaml
    from mpisage.runtime.checkpoint import config_differences
    stored = to_yaml(_cfg(tmp_path))
    assert config_differences(stored, _cfg(tmp_path, **{"runtime.heartbeat_s": 2, "runtime.heartbeat_timeout_s": 20, "rounds": 40})) == []
    assert config_differences(stored, _cfg(tmp_path, seed=7)) != []


def test_resume_auto_without_a_checkpoint_says_it_starts_afresh(tmp_path, caplog):
    from mpisage.runtime.checkpoint import choose_checkpoint
    caplog.set_level(logging.WARNING, logger="mpisage")
    assert choose_checkpoint(_cfg(tmp_path, resume="auto"), 4) is None
    assert f"no checkpoint in {tmp_path}; starting afresh" in caplog.text


def test_a_corrupt_gz_is_named(tmp_path):
    from mpisage.data import DataError
    from mpisage.data.datasets import read_idx
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.compress(bytes((0, 0, 8, 1, 0, 0, 0, 100)) + bytes(100)))
    raw[12:20] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"cannot read {path}"):
        read_idx(str(path), 1)


FILL = r"""
import os, sys, numpy as np
from mpisage.runtime.metrics import MetricsFile, read_rounds
from mpisage.runtime.checkpoint import write_checkpoint
import torch
d = sys.argv[1]
m = MetricsFile(os.path.join(d, "metrics.h5"), {"config": "x"})
m.append({"round": 0, "a": np.zeros(10)})
try:
    # checkpoints until the disk is full: the failing one must leave no partial file
    for r in range(100):
        write_checkpoint(d, r, {"rank1": ({"w": torch.rand(256 * 1024)}, {})}, {"config": ""}, 100)
except OSError as e:
    print("checkpoint:", e, "| tmp left:", [p for p in os.listdir(d) if p.endswith(".tmp")], flush=True)
# fill what is left, so the metrics file runs out next
with open(os.path.join(d, "filler"), "wb", buffering=0) as f:
    try:
        while True:
            f.write(b"\0" * 4096)
    except OSError:
        pass
for r in range(1, 1000):
    try:
        m.append({"round": r, "a": np.zeros(10)})
    except OSError as e:
        print("metrics:", e, flush=True)
        break
m.close()
print("rows readable:", len(read_rounds(os.path.join(d, "metrics.h5"))["round"]), flush=True)
"""


def test_a_full_disk_is_named_and_never_a_crash(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = subprocess.run([sys.executable, "-c", FILL, str(mnt)], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": ROOT})
    finally:
        subprocess.run(["umount", str(mnt)])
    assert out.returncode == 0, f"exit {out.returncode} (a segfault is -11):\n{out.stdout}\n{out.stderr[-2000:]}"
    assert f"checkpoint: no space left on device writing {mnt}/checkpoint_round" in out.stdout
    assert "tmp left: []" in out.stdout
    assert f"metrics: no space left on device writing {mnt}/metrics.h5" in out.stdout
    rows = int(out.stdout.split("rows readable:")[1])
    assert rows >= 1


def test_resume_auto_before_any_checkpoint_restarts_the_same_run_but_refuses_another(tmp_path):
    from mpisage.config import to_yaml
    from mpisage.runtime.metrics import MetricsFile
    MetricsFile(str(tmp_path / "metrics.h5"), {"config": to_yaml(_cfg(tmp_path))}).close()
    with pytest.raises(RunDirError, match="already holds another run"):
        rundir.prepare_fresh_run(_cfg(tmp_path, resume="auto", seed=7))
    rundir.prepare_fresh_run(_cfg(tmp_path, resume="auto"))        # its own start: moved aside, started again
    assert not (tmp_path / "metrics.h5").exists()
    assert [os.listdir(tmp_path / d) for d in os.listdir(tmp_path)] == [["metrics.h5"]]


def test_a_missing_dataset_root_and_the_files_used_are_said(tmp_path, caplog, monkeypatch):
    from mpisage.data import datasets, write_fashion_mnist_fixture
    standard = tmp_path / "standard"
    write_fashion_mnist_fixture(str(standard), 20, 10)
    monkeypatch.setattr(datasets, "FASHION_DEBIAN_DIR", str(standard))
    caplog.set_level(logging.INFO, logger="mpisage")
    datasets.load_dataset("fashion_mnist", str(tmp_path / "nowhere"))
    assert f"dataset.root={tmp_path / 'nowhere'} does not exist" in caplog.text
    assert f"reading the idx files in {standard}" in caplog.text


def test_a_non_finite_loss_suggests_the_learning_rate():
    from types import SimpleNamespace

    from mpisage.roles.client import _tally, new_round_stats
    with pytest.raises(FloatingPointError, match="client 4 in round 2, local step 7: .*learning rate"):
        _tally(new_round_stats(), (float("nan"), 0), SimpleNamespace(cid=4), 2, 7, 8)
