"""What the roles say to each other, by name.

Tensors (activations, gradients, labels, models) travel as themselves, described by the transport's header. The
small figures a rank reports (its byte counters, its seconds, per-client training statistics, an evaluation
result) travel as one float64 vector laid out by a `Schema`: an ordered list of named fields, each of a fixed
shape that both sides know from the config. A sender fills the fields by name and a receiver reads them by name;
nobody slices by position. Algorithms add fields of their own to the S-server's round report
(`Algorithm.server_report_fields`). Nothing is pickled: the layout is code, the payload is raw float64.
A report's header says which schema lays it out (`part` = the schema's tag), so a receiver that may get one of
several reports (`recv_any_report`) reads which one it is instead of guessing from the other header fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mpisage.runtime.transport import NUM_KINDS, S_SERVER, Kind, ProtocolError, Transport

COUNTERS_SHAPE = (3, NUM_KINDS, 3)     # wire bytes, paper bytes, messages per (kind, destination role)


@dataclass(frozen=True)
class Schema:
    """An ordered set of named float64 fields of fixed shapes (a scalar field has shape ())."""
    name: str
    fields: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, name: str, **fields) -> "Schema":
        return cls(name, tuple((k, tuple(v) if isinstance(v, (tuple, list)) else (() if v == 1 else (v,)))
                               for k, v in fields.items()))

    def extended(self, **fields) -> "Schema":
        return Schema(self.name, self.fields + Schema.of(self.name, **fields).fields)

    @property
    def tag(self) -> int:
        """Which report this is, in its message header (0: a schema outside REPORT_TAGS)."""
        return REPORT_TAGS.get(self.name, 0)

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.fields)

    @property
    def nbytes(self) -> int:
        return 8 * self.size

    def pack(self, values: dict) -> torch.Tensor:
        """The float64 payload of `values` (every field, no other key)."""
        unknown = set(values) - {name for name, _ in self.fields}
        missing = [name for name, _ in self.fields if name not in values]
        if unknown or missing:
            raise KeyError(f"{self.name} report: unknown fields {sorted(unknown)}, missing fields {missing}")
        parts = []
        for name, shape in self.fields:
            value = np.asarray(values[name], dtype=np.float64)
            if value.shape != shape:
                raise ValueError(f"{self.name} report: field {name} has shape {value.shape}, the schema {shape}")
            parts.append(value.ravel())
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0))

    def unpack(self, payload: torch.Tensor | np.ndarray) -> dict[str, np.ndarray | float]:
        """Fields by name: scalars as float, others as arrays (the counters as int64)."""
        flat = payload.numpy() if isinstance(payload, torch.Tensor) else np.asarray(payload)
        if flat.shape != (self.size,):
            raise ProtocolError(f"{self.name} report has {flat.size} values, the schema {self.size}")
        out, offset = {}, 0
        for name, shape in self.fields:
            n = math.prod(shape)
            part = flat[offset:offset + n]
            offset += n
            if name == "counters":
                out[name] = part.astype(np.int64).reshape(shape)
            else:
                out[name] = float(part[0]) if shape == () else part.reshape(shape).copy()
        return out


# ------------------------------------------------------------------------------------------- the schemas
# the header tag of each report (an extended schema keeps its base's name, and its tag)
REPORT_TAGS = {"evaluation": 1, "client round": 2, "rank": 3, "final client rank": 4, "S-server round": 5,
               "asynchronous S-server": 6}
EVAL_RESULT = Schema.of("evaluation", loss=1, accuracy=1, seconds=1)
CLIENT_ROUND = Schema.of("client round", loss_sum=1, correct=1, samples=1, seconds=1)


def client_round_report(algorithm_fields: dict) -> Schema:
    """A client's report of a synchronous round: CLIENT_ROUND and the algorithm's own per-client fields
    (`Algorithm.client_report_fields`)."""
    return CLIENT_ROUND.extended(**algorithm_fields)
RANK_REPORT = Schema.of("rank", counters=COUNTERS_SHAPE, wait_seconds=1, busy_seconds=1, resident_bytes=1)
# a client rank's report of a synchronous round adds its waiting seconds when the round began (after the previous
# round's averages), so the wait for those averages is counted in the round it belongs to
RANK_ROUND = RANK_REPORT.extended(round_start_wait_seconds=1)
FINAL_CLIENT_REPORT = Schema.of("final client rank", counters=COUNTERS_SHAPE, uploads=1, wait_seconds=1,
                                busy_seconds=1, resident_bytes=1)


def sserver_round_report(num_clients: int, algorithm_fields: dict) -> Schema:
    """The S-server's report of a synchronous round: its counters and seconds, per-client training statistics of
    its server steps (loss sum, correct, samples), the algorithm's own fields, its memory."""
    return Schema.of("S-server round", counters=COUNTERS_SHAPE, wait_seconds=1, busy_seconds=1, round_seconds=1,
                     train_stats=(num_clients, 3), **algorithm_fields, resident_bytes=1)


def async_sserver_report(algorithm_fields: dict) -> Schema:
    """The asynchronous S-server's report with each evaluation result (and at the stop): its counters and seconds,
    the algorithm's own fields (`Algorithm.server_report_fields`, as of the evaluated update), its memory."""
    return Schema.of("asynchronous S-server", counters=COUNTERS_SHAPE, wait_seconds=1, busy_seconds=1,
                     elapsed_seconds=1, **algorithm_fields, resident_bytes=1)


# ------------------------------------------------------------------------------------------- sending reports
def send_report(t: Transport, dest: int, schema: Schema, values: dict, *, round: int, client: int = -1,
                kind: Kind = Kind.CONTROL) -> None:
    """Sends `values` laid out by `schema`. When the schema has `counters`, they are this rank's counters taken
    after counting this very message, so the figure it carries is exact."""
    if any(name == "counters" for name, _ in schema.fields):
        t.count(kind, dest, schema.nbytes)
        payload = schema.pack({**values, "counters": t.counters().astype(np.float64)})
        t.send(dest, kind, payload, round=round, client=client, part=schema.tag, count=False)
    else:
        t.send(dest, kind, schema.pack(values), round=round, client=client, part=schema.tag)


def recv_report(t: Transport, source: int, schema: Schema, *, round: int | None = None,
                client: int | None = None, kind: Kind = Kind.CONTROL, idle=None) -> dict:
    msg = t.recv(kind, source, round=round, client=client, part=schema.tag, dtype=torch.float64,
                 shape=(schema.size,), idle=idle)
    return schema.unpack(msg.tensor)


def recv_any_report(t: Transport, source: int, schemas, *, kind: Kind = Kind.CONTROL):
    """The next report from `source`, whichever of `schemas` its header says it is: (schema, values, message)."""
    by_tag = {schema.tag: schema for schema in schemas}
    if len(by_tag) != len(schemas) or 0 in by_tag:
        raise ValueError(f"recv_any_report needs schemas with distinct tags: {[s.name for s in schemas]}")
    msg = t.recv(kind, source, dtype=torch.float64)
    if msg.part not in by_tag:
        raise ProtocolError(f"{kind.name} message from rank {source}: a report of tag {msg.part}, expected one of "
                            f"{sorted((s.tag, s.name) for s in schemas)}")
    return by_tag[msg.part], by_tag[msg.part].unpack(msg.tensor), msg


# ------------------------------------------------------------------------------------------- a client's link
class ClientLink:
    """A client's view of its S-server for one round (or, asynchronously, one participation): uploads, and the
    replies addressed to it."""

    def __init__(self, transport: Transport, cid: int, round: int):
        self.transport, self.cid, self.round = transport, cid, round

    def upload(self, z: torch.Tensor, y: torch.Tensor, seq: int) -> None:
        self.transport.send(S_SERVER, Kind.ACTIVATION, z, round=self.round, client=self.cid, seq=seq)
        self.transport.send(S_SERVER, Kind.LABELS, y, round=self.round, client=self.cid, seq=seq)

    def ready(self, kind: Kind) -> bool:
        """Whether a message of `kind` from the S-server has arrived for this rank (a rank trains one client at a
        time, so a reply that is waiting is this client's; `receive` checks it)."""
        return self.transport.probe([kind], S_SERVER) is not None

    def receive(self, kind: Kind, seq: int | None = None, **expect) -> torch.Tensor:
        return self.transport.recv(kind, S_SERVER, round=self.round, client=self.cid, seq=seq, **expect).tensor
