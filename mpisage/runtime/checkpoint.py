"""Checkpoints: every rank sends its state to rank 0 (a JSON manifest + one raw payload, never pickled), and
rank 0 writes one HDF5 file per checkpoint, atomically (temp file, fsync, rename), with a CRC32 per tensor, and
keeps the last `checkpoint.keep`."""
from __future__ import annotations

import glob
import logging
import json
import os
import zlib

import h5py
import numpy as np
import torch

from mpisage.runtime import rundir
from mpisage.runtime.state import flatten_state, named_manifest, numpy_of, pack_state, state_nbytes, unpack_named
from mpisage.runtime.stateful import CheckpointError
from mpisage.runtime.transport import F_SERVER, Kind, Transport

FORMAT_VERSION = 1


def checkpoint_due(cfg, round: int, stop: bool) -> bool:
    """Every rank decides alike, from the config and the F-server's stop flag. checkpoint.interval=0: none, except
    when the run stops before its last round (SIGTERM/SIGUSR1, or the communication budget), so a pre-empted run
    can still be resumed; the ranks cannot tell those two causes apart from the flag."""
    if cfg.checkpoint.interval == 0:
        return stop and round < cfg.rounds - 1
    return stop or round == cfg.rounds - 1 or (round + 1) % cfg.checkpoint.interval == 0


def midrun_checkpoint_due(cfg, round: int) -> bool:
    """An asynchronous run's checkpoint after global update `round` while it goes on (its last update's checkpoint
    is the stop's)."""
    return cfg.checkpoint.interval > 0 and (round + 1) % cfg.checkpoint.interval == 0 and round < cfg.rounds - 1


def recv_checkpoint(t: Transport, source: int, round: int,
                    drop_others: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """A rank's state for the checkpoint of `round`. `drop_others`: states the rank made for other checkpoints
    (an asynchronous rank's mid-run cuts, sent ahead of a stop that came first) are received and dropped."""
    while True:
        manifest = t.recv(Kind.CHECKPOINT, source, round=None if drop_others else round, seq=0, dtype=torch.uint8,
                          max_nbytes=1 << 28)
        payload = t.recv(Kind.CHECKPOINT, source, round=manifest.round, seq=1, dtype=torch.uint8)
        if manifest.round == round:
            break
    try:
        return unpack_named(manifest.tensor, payload.tensor)
    except (ValueError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise RuntimeError(f"checkpoint state from rank {source} is malformed: {e}") from None


def write_checkpoint(run_dir: str, round: int, ranks: dict[str, tuple[dict[str, torch.Tensor], dict]],
                     attrs: dict, keep: int) -> str:
    """ranks: group name -> (flat tensors, plain values). Returns the path written."""
    final = os.path.join(run_dir, f"checkpoint_round{round:06d}.h5")
    tmp = final + ".tmp"
    run = rundir.run_id(run_dir)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["round"] = round
            f.attrs["run_id"] = run
            for k, v in attrs.items():
                f.attrs[k] = v
            for group, (tensors, plain) in ranks.items():
                g = f.create_group(group)
                g.attrs["plain"] = json.dumps(plain, default=str)
                for name, t in tensors.items():
                    arr = numpy_of(t)
                    d = g.create_dataset(name, data=arr)
                    d.attrs["dtype"] = str(t.dtype).removeprefix("torch.")
                    d.attrs["crc32"] = zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).tobytes()) if arr.size else 0
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException as e:
        # a partial file would keep the disk full and the next write failing: it goes, the older checkpoints stay
        if os.path.exists(tmp):
            os.remove(tmp)
        rundir.raise_if_disk_full(e, final)
        raise
    os.replace(tmp, final)
    dir_fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in own_checkpoints(run_dir, run, round)[:-keep]:
        os.remove(old)
    return final


def own_checkpoints(run_dir: str, run: str, upto: int) -> list[str]:
    """Checkpoints in run_dir written by run `run` up to round `upto`, oldest first: the only ones its rotation may
    delete (never another run's, never a later round of a branch this run was resumed from)."""
    own = []
    for path in list_checkpoints(run_dir):
        try:
            with h5py.File(path, "r") as f:
                if str(f.attrs.get("run_id", "")) == run and int(f.attrs["round"]) <= upto:
                    own.append(path)
        except (OSError, KeyError, ValueError):
            continue     # unreadable: not known to be ours, so kept (resume=auto skips it)
    return own


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint files in run_dir, oldest first."""
    return sorted(glob.glob(os.path.join(run_dir, "checkpoint_round*.h5")))


def read_checkpoint(path: str, groups: list[str] | None = None) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(file attributes, group -> flat tensors) for `groups` (default all), every tensor verified against its
    CRC32. A truncated, corrupted or foreign file is a CheckpointError naming it."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            if "format_version" not in attrs or "round" not in attrs:
                raise CheckpointError(f"{path} is not an mpisage checkpoint (no format_version/round attributes)")
            out: dict[str, dict[str, torch.Tensor]] = {}
            for group in (groups if groups is not None else list(f)):
                if group not in f:
                    raise CheckpointError(f"checkpoint {path} has no state for {group} (written by a job with "
                                          f"another rank layout?)")
                tensors = {}

                def visit(name, obj):
                    if isinstance(obj, h5py.Dataset):
                        arr = obj[()]
                        arr = np.asarray(arr)
                        crc = zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).tobytes()) if arr.size else 0
                        if crc != obj.attrs["crc32"]:
                            raise CheckpointError(f"checkpoint {path}: tensor {group}/{name} fails its checksum")
                        t = torch.from_numpy(arr.copy())
                        if obj.attrs["dtype"] == "bfloat16":
                            t = t.view(torch.bfloat16)
                        tensors[name] = t
                f[group].visititems(visit)
                out[group] = tensors
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({e}); "
                              f"delete it or resume from an earlier one") from None
    return attrs, out


# Keys that may change between a checkpoint and its resumption without changing the computation (thread counts
# only reorder float sums).
RESUMABLE_CHANGES = {"rounds", "resume", "run_dir", "overwrite", "runtime.log_interval", "runtime.comm_timeout_s",
                     "runtime.heartbeat_s", "runtime.heartbeat_timeout_s",
                     "checkpoint.interval", "checkpoint.keep", "runtime.torch_threads", "fsl.align_threads",
                     "comm_threshold_mb", "eval.batch_size",
                     "client_store.backend", "client_store.slots", "client_store.directory"}   # layout, not values


def config_differences(stored_yaml: str, cfg) -> list[str]:
    """Keys whose values differ between the checkpoint's config and this run's (beyond RESUMABLE_CHANGES). A key
    the checkpoint's config does not have (added to mpisage since it was written) counts as its default: a new
    setting keeps the old behaviour at its default, so it does not stop an older run from resuming. A config of the
    flat layout (before the sections) is read in today's layout."""
    from omegaconf import OmegaConf

    from mpisage.config import Config, read_stored_config
    stored = read_stored_config(stored_yaml)
    now = OmegaConf.to_container(OmegaConf.structured(cfg))
    defaults = OmegaConf.to_container(OmegaConf.structured(Config))

    def walk(a, b, default, prefix=""):
        for k in sorted(set(a) | set(b)):
            name = prefix + k
            old = a.get(k, default.get(k) if isinstance(default, dict) else None)
            if isinstance(old, dict) and isinstance(b.get(k), dict):
                yield from walk(old, b[k], default.get(k, {}) if isinstance(default, dict) else {}, name + ".")
            elif old != b.get(k) and name not in RESUMABLE_CHANGES:
                yield f"{name}: checkpoint {old!r}, now {b.get(k)!r}"
    return list(walk(stored, now, defaults))


def choose_checkpoint(cfg, size: int | None = None) -> tuple[str, int] | None:
    """The checkpoint to resume from (rank 0 decides): `resume=auto` takes the newest one in run_dir that
    verifies, falling back past corrupt ones; `resume=PATH` takes that file or fails. None: start afresh. A
    checkpoint of a job with another rank count than `size` is refused."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        candidates = list_checkpoints(cfg.run_dir)[::-1]
        if not candidates:
            logging.getLogger("mpisage").warning(f"[mpisage] resume=auto: no checkpoint in {cfg.run_dir}; "
                                                 f"starting afresh")
            return None
    else:
        if not os.path.isfile(cfg.resume):
            raise CheckpointError(f"resume={cfg.resume}: no such checkpoint file (use resume=auto to take the newest "
                                  f"one in run_dir)")
        candidates = [cfg.resume]
    for path in candidates:
        try:
            attrs, groups = read_checkpoint(path)
        except CheckpointError as e:
            if cfg.resume != "auto":
                raise
            logging.getLogger("mpisage").warning(f"[mpisage] skipping {path}: {e}")
            continue
        differences = config_differences(str(attrs.get("config", "")), cfg)
        if differences:
            from mpisage.config import ConfigError
            raise ConfigError(f"checkpoint {path} was written with another config; resuming it needs the same "
                              f"settings:\n  " + "\n  ".join(differences))
        check_rank_layout(path, groups, size)
        return path, int(attrs["round"])
    if cfg.resume == "auto":
        raise CheckpointError(f"no checkpoint in {cfg.run_dir} verifies (all are truncated or corrupt); "
                              f"start afresh without resume=auto or point resume= at a good file")
    return None


def check_rank_layout(path: str, groups: dict, size: int | None) -> None:
    """Refuses, before anything is opened for writing, a checkpoint of a job with another number of ranks: each
    client rank's state holds its own clients' optimisers, data order and random streams, dealt round-robin by the
    rank count; re-dealing them is not an exact re-mapping in general (a rank runs its clients in turn and keeps
    per-rank state), so it is refused rather than guessed."""
    written = 1 + sum(g.startswith("rank") for g in groups)      # the F-server's group plus one per other rank
    if size is not None and written != size:
        raise CheckpointError(f"checkpoint {path} was written by a job of {written} ranks ({written - 2} client "
                              f"ranks); this job has {size} ({size - 2} client ranks). Resume it with "
                              f"`mpirun -n {written}`, or start a new run in another run_dir")


def agree_on_checkpoint(t: Transport, cfg) -> tuple[str, int] | None:
    """Rank 0 chooses the checkpoint (or decides to start afresh, or rejects the resume) and tells every rank;
    a rejection makes every rank stop cleanly instead of waiting for a job that will not run."""
    from mpisage.config import ConfigError
    if t.rank == 0:
        error, chosen = None, None
        try:
            chosen = choose_checkpoint(cfg, t.size)
            if chosen is None:
                rundir.prepare_fresh_run(cfg)
            rundir.adopt_run_id(cfg.run_dir, chosen[0] if chosen else None)
        except (ConfigError, CheckpointError) as e:
            error = e
        status = 2 if error else int(chosen is not None)
        head = torch.tensor([status, chosen[1] if chosen else -1], dtype=torch.int64)
        path = torch.frombuffer(bytearray((chosen[0] if chosen else "-").encode()), dtype=torch.uint8)
        for r in range(1, t.size):
            t.send(r, Kind.CONTROL, head, round=-1, seq=0)
            t.send(r, Kind.CONTROL, path, round=-1, seq=1)
        t.flush()
        if error:
            raise error
        return chosen
    status, round = t.recv(Kind.CONTROL, 0, round=-1, seq=0, shape=(2,), dtype=torch.int64).tensor.tolist()
    path = bytes(t.recv(Kind.CONTROL, 0, round=-1, seq=1, dtype=torch.uint8, max_nbytes=4096).tensor.numpy()).decode()
    if status == 2:
        raise ConfigError("rank 0 rejected the resume (its message says why)")
    return (path, round) if status == 1 else None


def transport_state(t: Transport) -> dict:
    return {"wire": torch.from_numpy(t.wire_bytes.copy()), "paper": torch.from_numpy(t.paper_bytes.copy()),
            "messages": torch.from_numpy(t.messages.copy()), "wait": torch.tensor([t.wait_seconds])}


def restore_transport(t: Transport, flat: dict[str, torch.Tensor]) -> None:
    t.wire_bytes[:] = flat["transport/wire"].numpy()
    t.paper_bytes[:] = flat["transport/paper"].numpy()
    t.messages[:] = flat["transport/messages"].numpy()
    t.wait_seconds = float(flat["transport/wait"][0])


def send_rank_state(t: Transport, parts: dict, round: int) -> None:
    """A worker rank's checkpoint contribution: its algorithm state `parts`, its torch RNG and its counters. The
    counters it saves already include these two messages (their sizes do not depend on the counters' values), so
    a resumed rank counts exactly what an uninterrupted one would."""
    tensors, plain = flatten_state({**parts, "torch_rng": torch.get_rng_state(), "transport": transport_state(t)})
    manifest = named_manifest(tensors, plain)
    t.count(Kind.CHECKPOINT, F_SERVER, manifest.numel())
    t.count(Kind.CHECKPOINT, F_SERVER, state_nbytes(tensors))
    tensors.update(flatten_state({"transport": transport_state(t)})[0])    # same names and shapes, newer values
    t.send(F_SERVER, Kind.CHECKPOINT, manifest, round=round, seq=0, count=False)
    t.send(F_SERVER, Kind.CHECKPOINT, pack_state(tensors), round=round, seq=1, count=False)


def restore_rank_state(world, group: str) -> dict[str, torch.Tensor]:
    """The inverse on resume: restores the torch RNG and counters of this rank and returns its flat state."""
    flat = world.resume_state(group)
    torch.set_rng_state(flat["torch_rng"])
    restore_transport(world.transport, flat)
    return flat
