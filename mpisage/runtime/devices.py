"""Which device each rank computes on, and how payloads cross MPI. One start-up call does both: `configure_devices`.

The device map (`device_for`, a pure function of the rank and what its node has):
  - the F-server (rank 0) always on the CPU: it only averages models;
  - the S-server (rank 1) on a GPU when device.sserver is cuda or cuda:N, or auto and its node has one;
  - clients on GPUs when device.clients is cuda, or auto and their node has one; otherwise on the CPU.
A rank on a GPU takes GPU `node-local rank % GPUs on its node` (round-robin; several ranks may share one GPU) unless
cuda:N names one. Asking for cuda where a rank sees no GPU is an error naming the key and the fix.

The payload path (`decide_payload_path`, pure too): "host" when no rank has a GPU; otherwise "direct" when the MPI
library is CUDA-aware and a GPU tensor sent rank to rank at start-up arrives intact, else "staged" (through pinned
host buffers). CUDA-awareness comes from MPISAGE_CUDA_AWARE=0/1 if set, else device.cuda_aware (yes | no | auto:
ask the library, `MPIX_Query_cuda_support`). The decision is collective, so the whole job uses one path.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from mpi4py import MPI

from mpisage.config import Config, ConfigError, DeviceConfig
from mpisage.runtime.transport import F_SERVER, S_SERVER, Transport, query_mpi_cuda_support

CUDA_AWARE_ENV = "MPISAGE_CUDA_AWARE"
CUDA_AWARE_SETTINGS = ("auto", "yes", "no")
CPU = torch.device("cpu")


def device_for(rank: int, local_rank: int, num_gpus: int, devices: DeviceConfig) -> torch.device:
    """The device of `rank`, which is `local_rank` on its node and sees `num_gpus` GPUs there."""
    if rank == F_SERVER:
        return CPU
    key, want = ("device.sserver", devices.sserver) if rank == S_SERVER else ("device.clients", devices.clients)
    if want == "cpu" or (want == "auto" and num_gpus == 0):
        return CPU
    who = f"rank {rank} ({'the S-server' if rank == S_SERVER else 'a client rank'})"
    if num_gpus == 0:
        raise ConfigError(f"{key}={want} but {who} sees no CUDA GPU (none on its node, hidden by "
                          f"CUDA_VISIBLE_DEVICES, or a CPU-only PyTorch); use {key}=auto (a GPU when there is one, "
                          f"else the CPU) or {key}=cpu, or run on GPU nodes with a CUDA build of PyTorch")
    if want.startswith("cuda:"):
        index = int(want[len("cuda:"):])
        if index >= num_gpus:
            raise ConfigError(f"{key}={want} but {who} sees only {num_gpus} GPU(s), cuda:0..cuda:{num_gpus - 1}; "
                              f"use {key}=cuda (round-robin by node-local rank) or an index below {num_gpus}")
        return torch.device("cuda", index)
    return torch.device("cuda", local_rank % num_gpus)


def device_map(cfg: Config, comm: MPI.Comm, num_gpus: int | None = None) -> list[torch.device]:
    """Every rank's device, the same list on every rank. Collective: every rank of `comm` must call it. Each rank
    contributes its node-local rank and GPU count (`num_gpus`, default: what torch sees; tests pass fake counts),
    and every rank evaluates the whole map, so a bad request raises the same ConfigError on every rank."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = node.Get_rank()
    node.Free()
    mine = np.array([local_rank, torch.cuda.device_count() if num_gpus is None else num_gpus], dtype=np.int64)
    every = np.empty((comm.Get_size(), 2), dtype=np.int64)
    comm.Allgather(mine, every)
    return [device_for(rank, int(local), int(gpus), cfg.device) for rank, (local, gpus) in enumerate(every)]


def select_device(cfg: Config, comm: MPI.Comm) -> torch.device:
    """This rank's device (made the current CUDA device when it is a GPU). Collective, like `device_map`."""
    return _make_current(device_map(cfg, comm)[comm.Get_rank()])


def _make_current(device: torch.device) -> torch.device:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@dataclass(frozen=True)
class CudaAwareness:
    """What the job decided about MPI and GPU memory, and why; stored with the run's environment."""
    aware: bool                # GPU memory is treated as something MPI can take
    how: str                   # one sentence: what decided it
    setting: str               # auto | yes | no, after the environment override
    source: str                # where the setting came from: "MPISAGE_CUDA_AWARE=1" or "device.cuda_aware=auto"
    library: int | None        # MPIX_Query_cuda_support(), the lowest over the ranks; None: some library lacks it
    self_check: bool | None    # the start-up GPU round trip; None: not run

    def as_dict(self) -> dict:
        return asdict(self)


def cuda_aware_setting(devices: DeviceConfig, environ=os.environ) -> tuple[str, str]:
    """(auto | yes | no, where it came from): MPISAGE_CUDA_AWARE=0/1 wins over device.cuda_aware."""
    value = environ.get(CUDA_AWARE_ENV)
    if value is None:
        return devices.cuda_aware, f"device.cuda_aware={devices.cuda_aware}"
    if value.strip() not in ("0", "1"):
        raise ConfigError(f"{CUDA_AWARE_ENV}={value!r} is not allowed: 1 (the MPI library takes GPU memory) or 0 "
                          f"(stage GPU payloads through host memory); unset it to use device.cuda_aware")
    return ("yes" if value.strip() == "1" else "no"), f"{CUDA_AWARE_ENV}={value.strip()}"


def needs_self_check(any_gpu: bool, setting: str, library: int | None) -> bool:
    """Whether to try the direct path at start-up. Only when the library or the user says MPI is CUDA-aware: handing
    device memory to an MPI that is not can crash it rather than fail."""
    return any_gpu and _claims_cuda_aware(setting, library)


def _claims_cuda_aware(setting: str, library: int | None) -> bool:
    """The user says so, or leaves it to a library that says so."""
    return setting == "yes" or (setting == "auto" and library == 1)


def decide_payload_path(any_gpu: bool, setting: str, source: str, library: int | None,
                        self_check: bool | None) -> tuple[str, CudaAwareness]:
    """The job's payload path and the record of why. Pure: the same inputs on every rank give the same answer."""
    query = ("the library has no MPIX_Query_cuda_support" if library is None
             else f"MPIX_Query_cuda_support() = {library}")

    def record(aware: bool, how: str) -> CudaAwareness:
        return CudaAwareness(aware, how, setting, source, library, self_check)

    if not any_gpu:
        return "host", record(_claims_cuda_aware(setting, library), f"no rank computes on a GPU: payloads stay in host memory ({query}; {source})")
    if setting == "no":
        return "staged", record(False, f"{source}: GPU payloads are staged through pinned host buffers")
    if setting == "yes":
        if not self_check:
            fix = f"unset {CUDA_AWARE_ENV} or set it to 0" if source.startswith(CUDA_AWARE_ENV) else \
                "use device.cuda_aware=auto or no"
            raise ConfigError(f"{source} says the MPI library is CUDA-aware, but the start-up self-check (a GPU tensor "
                              f"sent rank to rank) arrived wrong: this MPI cannot take GPU memory; {fix} to stage "
                              f"GPU payloads through host memory, or use a CUDA-aware MPI")
        return "direct", record(True, f"{source}; the start-up GPU round trip passed ({query})")
    if library != 1:
        hint = f"; set {CUDA_AWARE_ENV}=1 if it is CUDA-aware all the same" if library is None else ""
        return "staged", record(False, f"{query}: GPU payloads are staged through pinned host buffers{hint}")
    if not self_check:
        return "staged", record(False, f"{query}, but the start-up GPU round trip arrived wrong: GPU payloads are "
                                       f"staged through pinned host buffers")
    return "direct", record(True, f"{query} and the start-up GPU round trip passed: GPU tensors go to MPI directly")


def _agreed_setting(devices: DeviceConfig, comm: MPI.Comm) -> tuple[str, str]:
    """cuda_aware_setting, checked to be the same on every rank (each rank reads its own environment), so that a
    bad or differing MPISAGE_CUDA_AWARE stops every rank with the same error instead of splitting the job."""
    try:
        setting, source = cuda_aware_setting(devices)
        code = CUDA_AWARE_SETTINGS.index(setting) * 2 + source.startswith(CUDA_AWARE_ENV)
        error = None
    except ConfigError as e:
        setting, source, code, error = "", "", -1, e
    lowest_and_highest = np.zeros(2, dtype=np.int64)
    comm.Allreduce(np.array([code, -code], dtype=np.int64), lowest_and_highest, op=MPI.MIN)
    lowest, highest = int(lowest_and_highest[0]), -int(lowest_and_highest[1])
    if lowest < 0:
        raise error or ConfigError(f"{CUDA_AWARE_ENV} has a value other than 0 or 1 on some rank; set it to 0 or 1 "
                                   f"on every rank, or unset it to use device.cuda_aware")
    if lowest != highest:
        raise ConfigError(f"the ranks disagree about CUDA-aware MPI ({CUDA_AWARE_ENV} is set differently across "
                          f"ranks); export the same {CUDA_AWARE_ENV} to every rank, or unset it")
    return setting, source


def _lowest_library_answer(comm: MPI.Comm) -> int | None:
    answer = query_mpi_cuda_support()
    lowest = np.zeros(1, dtype=np.int64)
    comm.Allreduce(np.array([-1 if answer is None else answer], dtype=np.int64), lowest, op=MPI.MIN)
    return None if lowest[0] < 0 else int(lowest[0])


def configure_devices(cfg: Config, transport: Transport) -> torch.device:
    """The start-up call (every rank, once the Transport exists, before models are built): selects this rank's
    device, decides the job's payload path and sets it on the transport (`transport.payload_path`,
    `transport.cuda_awareness`, `transport.devices`). Returns this rank's device. Collective."""
    comm = transport.comm
    devices = device_map(cfg, comm)
    device = _make_current(devices[comm.Get_rank()])
    setting, source = _agreed_setting(cfg.device, comm)
    library = _lowest_library_answer(comm)
    any_gpu = any(d.type == "cuda" for d in devices)
    self_check = None
    if needs_self_check(any_gpu, setting, library):
        self_check = transport.check_payload_path(device, path="direct")
    path, awareness = decide_payload_path(any_gpu, setting, source, library, self_check)
    transport.payload_path = path
    transport.cuda_awareness = awareness
    transport.devices = [str(d) for d in devices]
    return device
