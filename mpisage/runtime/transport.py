"""The only module that talks MPI point-to-point.

A message is a typed header (a fixed-size int64 vector: kind, round, client, seq, part, dtype, shape, payload
bytes)
followed by one contiguous payload, both sent with Isend. Each kind has its own pair of tags, so a receiver
asks for "the next ACTIVATION from anyone" or "the next CLIENT_MODEL from rank 3" and MPI's non-overtaking rule
keeps each stream in order. Activations and gradients may travel in a narrower wire format (`mpisage.runtime.wire`,
config wire.*): the header's dtype then names that format, and the receiver gets float32 back. Every header is
validated on receipt; a bad one raises `ProtocolError` naming the sender and the kind. Nothing is pickled: payloads are raw bytes described by the header.

Bytes are counted at the send, per kind and destination role: the wire figure (header + payload, every message)
and the paper figure (payload only, for the kinds the FSL-SAGE reference counts; labels, control, evaluation and
checkpoint traffic are wire-only).

Payloads take one of three paths, chosen once for the whole job (`mpisage.runtime.devices.configure_devices`):
"host" (no rank has a GPU: tensors are sent from and received into their own memory), "direct" (a CUDA-aware MPI:
GPU tensors are handed to MPI after their stream is synchronised) or "staged" (GPUs but an MPI that cannot read
device memory: GPU payloads are copied through reusable pinned host buffers, `StagingPool`). CPU tensors never
need staging; the bytes on the wire, and so the counters, are the same on every path.

Waiting polls `Test()` with a short, growing sleep: ranks outnumber cores, and a blocking MPI wait busy-spins.
"""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from mpisage.runtime import wire

F_SERVER, S_SERVER, FIRST_CLIENT_RANK = 0, 1, 2
ROLE_NAMES = ("fserver", "sserver", "client")


def role_of(rank: int) -> int:
    """0 = F-server, 1 = S-server, 2 = client (all ranks >= 2)."""
    return min(rank, FIRST_CLIENT_RANK)


class Kind(enum.IntEnum):
    ACTIVATION = 0
    GRADIENT = 1
    LABELS = 2
    CLIENT_MODEL = 3
    AUX_MODEL = 4
    SERVER_MODEL = 5
    CONTROL = 6
    EVAL = 7
    CHECKPOINT = 8


# What the FSL-SAGE reference counts as communication load (labels and bookkeeping are not counted).
PAPER_KINDS = frozenset({Kind.ACTIVATION, Kind.GRADIENT, Kind.CLIENT_MODEL, Kind.AUX_MODEL, Kind.SERVER_MODEL})
NUM_KINDS = len(Kind)

# dtype codes in the header; anything else is refused.
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.bool)
DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}
# A float32 activation or gradient sent in a wire format (mpisage.runtime.wire) carries WIRE_CODE_BASE + the format's code
# as its dtype: the header records the wire format, and the receiver hands back float32.
WIRE_CODE_BASE = 64
WIRE_FORMAT_OF_CODE = {WIRE_CODE_BASE + f.code: f for f in wire.WIRE_FORMATS.values()}

MAGIC = 0x6D706973616765   # "mpisage"
MAX_NDIM = 5
NO_PART = -1
# header: magic, kind, round, client, seq, part, dtype, ndim, shape[MAX_NDIM], nbytes. `seq` numbers a client's
# uploads within a round; `part` says which model part (a model Kind) an EVAL message carries.
HEADER_LEN = 8 + MAX_NDIM + 1
HEADER_BYTES = HEADER_LEN * 8
MAX_PAYLOAD_BYTES = 1 << 34
# A waiting rank polls with pauses that grow to SHORT_PAUSE_S (a reply is usually near); once its wait has lasted
# LONG_WAIT_S, to LONG_PAUSE_S: ten client ranks waiting minutes for an alignment then leave the S-server the
# cores instead of polling (benchmarks/idle_wait.py), at the price of waking up to LONG_PAUSE_S late.
SHORT_PAUSE_S, LONG_WAIT_S, LONG_PAUSE_S = 2e-3, 1.0, 2e-2


class ProtocolError(RuntimeError):
    """A message that should not have come: malformed header, wrong kind, round, client or size."""


class CommTimeout(RuntimeError):
    """A peer did not answer within runtime.comm_timeout_s."""


@dataclass
class Message:
    kind: Kind
    source: int
    round: int
    client: int
    seq: int
    part: int
    tensor: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


PAYLOAD_PATHS = ("host", "staged", "direct")


def _as_buffer(t: torch.Tensor):
    """A writable/readable MPI buffer over the tensor's bytes, without a copy. Every dtype (bf16 included) goes as
    raw bytes: MPI never needs to know the element type, and the header carries it."""
    flat = t.view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)   # no bytes: any memory
    if flat.is_cuda:   # only on the direct path: a CUDA-aware MPI reads device memory through DLPack
        return [flat, MPI.BYTE]
    return flat.numpy()


class StagingPool:
    """Reusable host buffers for payloads MPI cannot take where they live (GPU memory without a CUDA-aware MPI), one
    free list per (element count, dtype). Pinned (page-locked) when CUDA is available, so device<->host copies run
    at full speed; ordinary memory otherwise (CPU-only torch cannot pin). A buffer is out of the pool from `acquire`
    to `release`; the transport releases a send buffer only when its send has completed, so MPI never reads a
    buffer that is being refilled. Buffers are kept for the whole job: message sizes repeat every round."""

    def __init__(self, pinned: bool | None = None):
        self.pinned = torch.cuda.is_available() if pinned is None else pinned
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._in_use: dict[int, tuple[int, torch.dtype]] = {}   # id(buffer) -> its free-list key
        self.allocated = 0          # buffers ever created: grows only while every buffer of a size is in use
        self.allocated_bytes = 0

    def acquire(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-d host buffer of `numel` elements of `dtype`, not in use by anyone else until released."""
        key = (numel, dtype)
        free = self._free.get(key)
        if free:
            buf = free.pop()
        else:
            buf = torch.empty(numel, dtype=dtype, pin_memory=self.pinned)
            self.allocated += 1
            self.allocated_bytes += numel * buf.element_size()
        self._in_use[id(buf)] = key
        return buf

    def release(self, buf: torch.Tensor) -> None:
        key = self._in_use.pop(id(buf), None)
        if key is None:   # a second release would let two messages share one buffer
            raise ValueError("releasing a staging buffer that this pool did not hand out, or released twice")
        self._free.setdefault(key, []).append(buf)

    @property
    def in_use(self) -> int:
        return len(self._in_use)


def query_mpi_cuda_support() -> int | None:
    """What the MPI library under mpi4py says about itself: `MPIX_Query_cuda_support()` (Open MPI >= 4, MPICH >= 4)
    is 1 when it accepts CUDA device buffers, 0 when not; None when the library has no such function. mpi4py 4 does
    not expose it, so it is looked up with ctypes in mpi4py's MPI extension, whose symbol lookup also searches the
    libmpi it links (whichever MPI mpi4py was built against), then in the global namespace (a preloaded MPI)."""
    import ctypes
    for library in (MPI.__file__, None):
        try:
            query = ctypes.CDLL(library).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype, query.argtypes = ctypes.c_int, []
        return int(query())
    return None


class Transport:
    def __init__(self, comm: MPI.Comm, timeout_s: float = 1800.0, *, stage_host_tensors: bool = False):
        """`stage_host_tensors`: route CPU tensors through the staging pool too, so the staged path can be tested
        on machines without a GPU (it only costs copies)."""
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout_s = timeout_s
        # [kind, destination role]
        self.wire_bytes = np.zeros((NUM_KINDS, 3), dtype=np.int64)
        self.paper_bytes = np.zeros((NUM_KINDS, 3), dtype=np.int64)
        self.messages = np.zeros((NUM_KINDS, 3), dtype=np.int64)
        self.wait_seconds = 0.0        # time spent blocked on peers (idle time)
        # in-flight sends, the buffers they read, and whether that buffer goes back to the staging pool after
        self._pending: list[tuple[MPI.Request, object, bool]] = []
        self._count_lock = threading.Lock()                        # the heartbeat thread counts too
        self._payload_path = "host"
        self.stage_host_tensors = stage_host_tensors
        self.staging = StagingPool()
        # set by mpisage.runtime.devices.configure_devices: what it detected about CUDA-aware MPI and why, every rank's device
        self.cuda_awareness = None
        self.devices: list[str] | None = None
        # kind -> its wire format (mpisage.runtime.wire), the same on every rank; kinds not here go as they are
        self.wire_formats: dict[Kind, wire.WireFormat] = {}

    def set_wire_formats(self, activations: str = "float32", gradients: str = "float32") -> None:
        """The job's wire formats (config wire.activations / wire.gradients); every rank sets the same."""
        formats = {Kind.ACTIVATION: wire.parse("wire.activations", activations),
                   Kind.GRADIENT: wire.parse("wire.gradients", gradients)}
        self.wire_formats = {k: f for k, f in formats.items() if f is not None}

    @property
    def payload_path(self) -> str:
        """How payloads move in this job, the same on every rank: "host", "staged" or "direct"."""
        return self._payload_path

    @payload_path.setter
    def payload_path(self, path: str) -> None:
        if path not in PAYLOAD_PATHS:
            raise ValueError(f"payload path {path!r} is not one of {', '.join(PAYLOAD_PATHS)}")
        self._payload_path = path

    def _staged(self, t: torch.Tensor) -> bool:
        """Whether a payload in `t`'s memory goes through a staging buffer. GPU memory is handed to MPI only on the
        direct path: on any other path the MPI library may not be able to read it."""
        return self._payload_path != "direct" if t.is_cuda else self.stage_host_tensors

    # ------------------------------------------------------------------ sending
    def send(self, dest: int, kind: Kind, tensor: torch.Tensor, *, round: int, client: int = -1, seq: int = 0,
             part: int = NO_PART, count: bool = True, paper: bool = True) -> None:
        """Nonblocking send of header + payload. The tensor must not be modified until `flush()`;
        the transport keeps a reference so it stays alive. `paper=False`: counted on the wire but not in the paper
        figure (a further copy of one broadcast payload)."""
        if tensor.dtype not in DTYPE_CODE:
            raise TypeError(f"cannot send dtype {tensor.dtype} (supported: {DTYPES})")
        if tensor.dim() > MAX_NDIM:
            raise ValueError(f"cannot send a {tensor.dim()}-d tensor (at most {MAX_NDIM} dims)")
        fmt = self.wire_formats.get(kind) if tensor.dtype == torch.float32 else None
        if fmt is None:
            payload = tensor.detach().contiguous()
            code = DTYPE_CODE[payload.dtype]
        else:   # checked before encoding: int8 would turn a NaN into a number
            wire.check_finite(tensor, fmt, f"the {kind.name} of client {client} in round {round} (rank {self.rank})")
            payload, code = wire.encode(tensor, fmt), WIRE_CODE_BASE + fmt.code
        nbytes = payload.numel() * payload.element_size()
        header = np.zeros(HEADER_LEN, dtype=np.int64)
        header[:8] = (MAGIC, int(kind), round, client, seq, int(part), code, tensor.dim())
        header[8:8 + tensor.dim()] = tensor.shape
        header[-1] = nbytes
        tag = 2 * int(kind)
        self._pending.append((self.comm.Isend(header, dest=dest, tag=tag), header, False))
        if self._staged(payload):
            staged = self.staging.acquire(payload.numel(), payload.dtype)
            staged.copy_(payload.view(-1))    # from a GPU a blocking copy: it also waits for the producing stream
            self._pending.append((self.comm.Isend(_as_buffer(staged), dest=dest, tag=tag + 1), staged, True))
        else:
            if payload.is_cuda:
                torch.cuda.current_stream(payload.device).synchronize()   # MPI reads memory, not the stream
            self._pending.append((self.comm.Isend(_as_buffer(payload), dest=dest, tag=tag + 1), payload, False))
        if count:
            self.count(kind, dest, nbytes, paper=paper)
        self._reap()

    def count(self, kind: Kind, dest: int, nbytes: int, header: bool = True, paper: bool = True) -> None:
        """Adds one message of `nbytes` payload (plus a header, unless it has none) to the counters. Done by
        `send`; exposed for the counter snapshot that reports itself and for the heartbeat thread."""
        role = role_of(dest)
        with self._count_lock:
            self.wire_bytes[kind, role] += (HEADER_BYTES if header else 0) + nbytes
            self.messages[kind, role] += 1
            if paper and kind in PAPER_KINDS:
                self.paper_bytes[kind, role] += nbytes

    def _reap(self) -> None:
        still = []
        for req, buf, staged in self._pending:
            if not req.Test():
                still.append((req, buf, staged))
            elif staged:
                self.staging.release(buf)
        self._pending = still

    def flush(self) -> None:
        """Waits until every send of this rank has completed (buffers may be reused after)."""
        for req, buf, staged in self._pending:
            self._wait(req, what="a send to complete", peer=None, kind=None)
            if staged:
                self.staging.release(buf)
        self._pending.clear()

    # ------------------------------------------------------------------ receiving
    def recv(self, kind: Kind, source: int = MPI.ANY_SOURCE, *, round: int | None = None,
             client: int | None = None, seq: int | None = None, part: int | None = None, clients_of=None, dtype=None,
             shape: tuple[int, ...] | None = None, trailing_shape: tuple[int, ...] | None = None,
             nbytes: int | None = None, max_nbytes: int = MAX_PAYLOAD_BYTES, device=None, idle=None) -> Message:
        """Receives the next message of `kind` (from `source`, or anyone) and validates its header against
        every expectation given. `clients_of(rank)` -> the client ids that rank may speak for. While nothing has
        arrived, `idle()` (if given) is called to do a small piece of background work; it returns False when
        it has none left."""
        tag = 2 * int(kind)
        header = np.empty(HEADER_LEN, dtype=np.int64)
        status = MPI.Status()
        req = self.comm.Irecv(header, source=source, tag=tag)
        self._wait(req, what=f"a {kind.name} header", peer=source, kind=kind, status=status, idle=idle)
        src = status.Get_source()
        where = f"{kind.name} message from rank {src} ({ROLE_NAMES[role_of(src)]})"

        def bad(why: str):
            return ProtocolError(f"malformed or unexpected {where}: {why}")

        if status.Get_count(MPI.BYTE) != HEADER_BYTES or header[0] != MAGIC:
            raise bad("not an mpisage header (wrong size or magic)")
        _, h_kind, h_round, h_client, h_seq, h_part, h_dtype, h_ndim = (int(v) for v in header[:8])
        h_nbytes = int(header[-1])
        if h_kind != int(kind):
            raise bad(f"header says kind {h_kind}")
        fmt = WIRE_FORMAT_OF_CODE.get(h_dtype)
        if (fmt is None and not 0 <= h_dtype < len(DTYPES)) or not 0 <= h_ndim <= MAX_NDIM:
            raise bad(f"dtype code {h_dtype} / ndim {h_ndim} out of range")
        h_shape = tuple(int(s) for s in header[8:8 + h_ndim])
        t_dtype = torch.float32 if fmt is not None else DTYPES[h_dtype]
        job_fmt = self.wire_formats.get(kind)
        if fmt is not job_fmt and (fmt is not None or t_dtype == torch.float32):
            raise bad(f"sent in wire format {fmt.name if fmt else 'float32'}, this job uses "
                      f"{job_fmt.name if job_fmt else 'float32'} for {kind.name} (every rank must share the wire.* keys)")
        if any(s < 0 for s in h_shape) or h_nbytes != (
                int(np.prod(h_shape, dtype=np.int64)) * _elsize(t_dtype) if fmt is None
                else fmt.payload_nbytes(h_shape)):
            raise bad(f"shape {h_shape} x {fmt.name if fmt else t_dtype} does not match {h_nbytes} payload bytes")
        checks = [("round", round, h_round), ("client", client, h_client), ("seq", seq, h_seq), ("part", part, h_part),
                  ("dtype", dtype, t_dtype), ("shape", shape, h_shape), ("payload bytes", nbytes, h_nbytes)]
        for name, want, got in checks:
            if want is not None and want != got:
                raise bad(f"{name} is {got}, expected {want}")
        if trailing_shape is not None and h_shape[1:] != tuple(trailing_shape):
            raise bad(f"shape {h_shape}, expected (*, {', '.join(map(str, trailing_shape))})")
        if h_nbytes > max_nbytes:
            raise bad(f"{h_nbytes} payload bytes exceed the limit {max_nbytes}")
        if clients_of is not None and h_client not in clients_of(src):
            raise bad(f"rank {src} does not host client {h_client}")
        tensor = (torch.empty(h_shape, dtype=t_dtype, device=device or "cpu") if fmt is None else
                  torch.empty(fmt.payload_numel(h_shape), dtype=fmt.element_dtype, device=device or "cpu"))
        staged = self.staging.acquire(tensor.numel(), tensor.dtype) if self._staged(tensor) else None
        req = self.comm.Irecv(_as_buffer(tensor if staged is None else staged), source=src, tag=tag + 1)
        status = MPI.Status()
        self._wait(req, what=f"the {kind.name} payload", peer=src, kind=kind, status=status)
        if staged is not None:
            tensor.view(-1).copy_(staged)     # blocking: the buffer is free again once it returns
            self.staging.release(staged)
        if status.Get_count(MPI.BYTE) != h_nbytes:
            raise bad(f"payload has {status.Get_count(MPI.BYTE)} bytes, header announced {h_nbytes}")
        if fmt is not None:
            tensor = wire.decode(tensor, fmt, h_shape)
        return Message(Kind(h_kind), src, h_round, h_client, h_seq, h_part, tensor)

    def probe(self, kinds, source: int = MPI.ANY_SOURCE) -> tuple[Kind, int] | None:
        """(kind, sender) of a message of one of `kinds` ready to be received now, or None."""
        status = MPI.Status()
        for kind in kinds:
            if self.comm.Iprobe(source=source, tag=2 * int(kind), status=status):
                return Kind(kind), status.Get_source()
        return None

    def wait_any(self, kinds, source: int = MPI.ANY_SOURCE, idle=None) -> tuple[Kind, int]:
        """Waits (without spinning) until a message of one of `kinds` is ready to be received from `source`;
        returns (its kind, its sender). Asynchronous roles use it to serve whichever stream speaks first."""
        def timed_out(waited: float) -> CommTimeout:
            names = "/".join(Kind(k).name for k in kinds)
            return CommTimeout(f"rank {self.rank} waited {waited:.0f} s for a {names} message; a peer is dead or "
                               f"stuck (raise runtime.comm_timeout_s if it is only slow)")

        return self._poll(lambda: self.probe(kinds, source), idle, timed_out)

    def wait_first(self, wanted, idle=None) -> tuple[Kind, int]:
        """Like wait_any, for (kind, sender) pairs: a rank that follows a fixed order waits for the one peer whose
        message comes next without taking what another peer sent early."""
        def ready():
            status = MPI.Status()
            for kind, source in wanted:
                if self.comm.Iprobe(source=source, tag=2 * int(kind), status=status):
                    return Kind(kind), status.Get_source()
            return None

        def timed_out(waited: float) -> CommTimeout:
            names = ", ".join(f"{Kind(k).name} from rank {r}" for k, r in wanted)
            return CommTimeout(f"rank {self.rank} waited {waited:.0f} s for one of: {names}; a peer is dead or "
                               f"stuck (raise runtime.comm_timeout_s if it is only slow)")

        return self._poll(ready, idle, timed_out)

    # ------------------------------------------------------------------ waiting
    def _wait(self, req: MPI.Request, *, what: str, peer, kind, status: MPI.Status | None = None,
              idle=None) -> None:
        """Polls without spinning: ranks outnumber cores and a blocking MPI wait burns a core. Only the sleeps
        count as idle time and towards the timeout; `idle()` background work does not."""
        def timed_out(waited: float) -> CommTimeout:
            req.Cancel()
            who = "any rank" if peer in (None, MPI.ANY_SOURCE) else f"rank {peer} ({ROLE_NAMES[role_of(peer)]})"
            return CommTimeout(f"rank {self.rank} waited {waited:.0f} s for {what} from {who}; "
                               f"the peer is dead or stuck (raise runtime.comm_timeout_s if it is only slow)")

        self._poll(lambda: req.Test(status), idle, timed_out)

    def _poll(self, ready, idle, timed_out):
        """Calls ready() until it returns something true, sleeping a short, growing pause between tries (ranks
        outnumber cores: never spin). idle() may do a piece of background work instead of a sleep."""
        pause, waited = 2e-5, 0.0
        while True:
            got = ready()
            if got:
                return got
            if idle is not None and idle():
                waited = 0.0
                continue
            slept = time.perf_counter()
            time.sleep(pause)
            slept = time.perf_counter() - slept
            waited += slept
            self.wait_seconds += slept
            pause = min(pause * 1.5, LONG_PAUSE_S if waited > LONG_WAIT_S else SHORT_PAUSE_S)
            if waited > self.timeout_s:
                raise timed_out(waited)

    def counters(self) -> np.ndarray:
        """[3, NUM_KINDS, 3] int64: wire bytes, paper bytes, messages per (kind, destination role)."""
        return np.stack([self.wire_bytes, self.paper_bytes, self.messages])

    def check_payload_path(self, device, path: str | None = None) -> bool:
        """Start-up self-check, collective: every rank sends a tiny tensor made in its `device`'s memory to the next
        rank (a ring) over `path` (default: the payload path set now), and compares what it gets from the previous rank with what that
        rank made. True on every rank when every rank got it bit-exact. On a private duplicate of the communicator,
        so nothing of the job can match it, and not counted. A direct-path check hands device memory to MPI: run
        it only when the library says it is CUDA-aware (or the user says so), a library that is not may crash."""
        comm = self.comm.Dup()
        try:
            probe = Transport(comm, timeout_s=min(self.timeout_s, 120.0), stage_host_tensors=self.stage_host_tensors)
            probe.payload_path = path or self.payload_path
            rank, size = comm.Get_rank(), comm.Get_size()

            def made_by(r: int) -> torch.Tensor:   # distinct per rank, and every byte matters
                return torch.arange(16, dtype=torch.float32) * (r + 1) + 0.25

            probe.send((rank + 1) % size, Kind.CONTROL, made_by(rank).to(device), round=-1, count=False)
            got = probe.recv(Kind.CONTROL, (rank - 1) % size, round=-1, dtype=torch.float32, shape=(16,),
                             device=device).tensor
            probe.flush()
            ok = np.array([int(got.device.type == torch.device(device).type
                               and torch.equal(got.cpu(), made_by((rank - 1) % size)))], dtype=np.int64)
            all_ok = np.zeros(1, dtype=np.int64)
            comm.Allreduce(ok, all_ok, op=MPI.MIN)
            return bool(all_ok[0])
        finally:
            comm.Free()


def abort_job(message: str) -> None:
    """Says why on stderr, then takes every rank down (MPI_Abort)."""
    import sys
    sys.stderr.write(message)
    sys.stderr.flush()
    # mpiexec forwards each rank's stderr asynchronously and Abort kills the forwarders at once: without this
    # pause a loaded machine loses the message that says why the job died.
    time.sleep(1.0)
    MPI.COMM_WORLD.Abort(1)


def _elsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()

