"""Checkpoints: every rank sends its state to rank 0 (a JSON manifest + one raw payload, never pickled), and
rank 0 writes one HDF5 file per checkpoint, atomically (temp file, fsync, rename), with a CRC32 per tensor, and
keeps the last `keep_checkpoints`."""
from __future__ import annotations

import glob
import json
import os
import zlib

import h5py
import numpy as np
import torch

from mpisage.state import flatten_state, numpy_of, pack_named, unpack_named
from mpisage.transport import F_SERVER, Kind, Transport

FORMAT_VERSION = 1


def checkpoint_due(cfg, round: int, stop: bool) -> bool:
    return stop or round == cfg.rounds - 1 or (round + 1) % cfg.checkpoint_interval == 0


def send_checkpoint(t: Transport, state: dict, round: int) -> None:
    tensors, plain = flatten_state(state)
    manifest, payload = pack_named(tensors, plain)
    t.send(F_SERVER, Kind.CHECKPOINT, manifest, round=round, seq=0)
    t.send(F_SERVER, Kind.CHECKPOINT, payload, round=round, seq=1)


def recv_checkpoint(t: Transport, source: int, round: int) -> tuple[dict[str, torch.Tensor], dict]:
    manifest = t.recv(Kind.CHECKPOINT, source, round=round, seq=0, dtype=torch.uint8, max_nbytes=1 << 28)
    payload = t.recv(Kind.CHECKPOINT, source, round=round, seq=1, dtype=torch.uint8)
    try:
        return unpack_named(manifest.tensor, payload.tensor)
    except (ValueError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise RuntimeError(f"checkpoint state from rank {source} is malformed: {e}") from None


def write_checkpoint(run_dir: str, round: int, ranks: dict[str, tuple[dict[str, torch.Tensor], dict]],
                     attrs: dict, keep: int) -> str:
    """ranks: group name -> (flat tensors, plain values). Returns the path written."""
    final = os.path.join(run_dir, f"checkpoint_round{round:06d}.h5")
    tmp = final + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["round"] = round
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
    os.replace(tmp, final)
    dir_fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in sorted(glob.glob(os.path.join(run_dir, "checkpoint_round*.h5")))[:-keep]:
        os.remove(old)
    return final


class CheckpointError(RuntimeError):
    pass


def read_checkpoint(path: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(file attributes, group -> flat tensors), every tensor verified against its CRC32."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            out: dict[str, dict[str, torch.Tensor]] = {}
            for group in f:
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
    except (OSError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({e}); "
                              f"delete it or resume from an earlier one") from None
    return attrs, out
