"""FSL-SAGE (Nair et al., ICML 2025): clients step on the gradient of an auxiliary model that stands in for the
server; every Q-th step they upload the smashed batch and the S-server takes one step on it; at round 0 and every
l rounds the S-server aligns each client's auxiliary model to its own true cut-layer gradients and sends it back.

`fsl.align_mode=blocking` is the paper's order: a client's first step of an alignment round waits for its aligned aux.
`fsl.align_mode=overlap` keeps the client stepping on its previous aux while the S-server aligns, and switches at the
first step boundary after the aligned one has arrived (at the latest after its last step of the round); the step
is reported per client and round (`aux_switch_step` in the metrics), so what each client did can be read back.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn

from mpisage.algorithms.alignment import align_clients, align_one, true_gradients
from mpisage.algorithms.base import Algorithm, ClientState, Reply, ServerState
from mpisage.algorithms.training import count_correct, count_scored, make_optimizer, optimizer_step
from mpisage.runtime.client_store import ClientStore, FieldView
from mpisage.runtime.protocol import ClientLink
from mpisage.runtime.state import load_packed, pack_state, state_nbytes
from mpisage.runtime.stateful import Stateful, transient
from mpisage.runtime.transport import Kind


@contextlib.contextmanager
def threads(n: int):
    """torch's intra-op threads set to n for the block (the S-server may use cores the waiting clients leave idle)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class AuxClient(Stateful):
    """What the S-server keeps per client: an auxiliary copy with its own Adam (state persists across alignments)
    and a ring of the last `fsl.align_buffer_size` uploaded samples (kept as uploaded: they go stale, as in the
    paper). The ring grows to its size as samples come, so a client that uploaded little holds little."""
    aux: nn.Module = None
    aux_optimizer: torch.optim.Optimizer = None
    buffer_z: torch.Tensor | None = None       # created at the client's first upload
    buffer_y: torch.Tensor | None = None
    buffer_fill: torch.Tensor | None = None    # [samples held, next write position]


@dataclass
class FslSageClient(ClientState):
    aux_switch_step: float = transient(default=math.nan)   # the step of this round at which it took its aligned aux


@dataclass
class FslSageServer(ServerState):
    """Every client's AuxClient, idle ones packed in a ClientStore (config client_store); `aux`, `aux_optimizer`,
    `buffer_z`, `buffer_y`, `buffer_fill` read them as per-client mappings. A reference from them is valid until
    another client is read: code working on several clients at once pins them with `aux_of`."""
    clients: ClientStore = None
    align_loss: dict[int, tuple[float, float]] = transient(default_factory=dict)   # this round's (first, last)
    align_seconds: float = transient(default=0.0)                                   # this round's, reported
    # (buffered z, y, true cut-layer gradients) kept from a client's first upload of an alignment round until its
    # aux steps run
    align_targets: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = transient(default_factory=dict)

    def __getattr__(self, name):          # the per-client views (only called for names not found otherwise)
        if name in AUX_CLIENT_FIELDS and self.__dict__.get("clients") is not None:
            return FieldView(self.clients, name)
        raise AttributeError(name)


AUX_CLIENT_FIELDS = tuple(f.name for f in fields(AuxClient))


def one_client_server(model: nn.Module | None, aux: nn.Module | None = None,
                      aux_optimizer: torch.optim.Optimizer | None = None) -> FslSageServer:
    """An S-server state with one client (id 0) holding `aux` (for unit tests and the alignment benchmark)."""
    return FslSageServer(model, None, None, clients=ClientStore([0], lambda cid: AuxClient(aux, aux_optimizer)))


class FslSage(Algorithm):
    name = "fsl_sage"
    client_state = FslSageClient

    def is_align_round(self, round: int) -> bool:
        return round % self.cfg.fsl.align_interval == 0

    # ------------------------------------------------------------------ client
    def client_step(self, c: ClientState, link: ClientLink, k: int, x, y):
        # c.aux is replaced by the aligned model at round 0 and never trained on the client
        Q = self.cfg.fsl.server_update_interval
        c.model.train()
        z = c.model(x)
        if k % Q == 0:
            link.upload(z, y, seq=k // Q)
        aligning = self.is_align_round(link.round)
        if aligning:
            self._take_aligned_aux(c, link, k, wait=k == 0 and self.cfg.fsl.align_mode == "blocking")
        # The estimate of dL/dz: the auxiliary model's input gradient with the true labels, mean over the batch.
        z_leaf = z.detach().requires_grad_(True)
        c.aux.train()
        logits = c.aux(z_leaf)
        loss = self.train_loss(logits, y)
        (g_hat,) = torch.autograd.grad(loss, z_leaf)
        c.optimizer.zero_grad(set_to_none=True)
        z.backward(g_hat)
        optimizer_step(c.optimizer, self.cfg)
        if aligning and k + 1 == self.world.steps_per_round(c.cid):     # overlap: it must come before the round ends
            self._take_aligned_aux(c, link, k + 1, wait=True)
        return loss.item() * count_scored(y), count_correct(logits, y)

    def _take_aligned_aux(self, c: ClientState, link: ClientLink, k: int, wait: bool) -> None:
        """Loads this alignment round's aligned aux if it has arrived (with `wait`: once it arrives) and the client
        has not taken it yet; remembers the step k from which the client steps on it."""
        if not math.isnan(c.aux_switch_step) or not (wait or link.ready(Kind.AUX_MODEL)):
            return
        load_packed(c.aux, link.receive(Kind.AUX_MODEL, seq=0, nbytes=state_nbytes(c.aux.state_dict())))
        c.aux_switch_step = k

    def client_report_fields(self) -> dict:
        return {"aux_switch_step": 1}

    def client_report(self, c: ClientState, round: int) -> dict:
        """The step at which the client took its aligned aux this round (0 when blocking; NaN: no alignment)."""
        switched, c.aux_switch_step = c.aux_switch_step, math.nan
        return {"aux_switch_step": switched}

    # ------------------------------------------------------------------ S-server
    def make_server(self) -> FslSageServer:
        return self.server_state(FslSageServer, clients=self.server_store(self._aux_client))

    def _aux_client(self, cid: int) -> AuxClient:
        aux = self.world.initial_part("aux")
        return AuxClient(aux, make_optimizer(aux.parameters(), self.cfg, lr=self.cfg.fsl.align_lr, weight_decay=0.0))

    @contextmanager
    def aux_of(self, s: FslSageServer, cids):
        """Pins the AuxClients of `cids` live for the block and yields them (in the order of `cids`)."""
        with s.clients.use(cids) as held:
            yield held

    def expected_uploads(self, cid: int) -> int:
        steps = self.world.steps_per_round(cid)
        return -(-steps // self.cfg.fsl.server_update_interval)

    def gathers_first_uploads(self, round: int) -> bool:
        """Alignment rounds with one client per client rank whose aux models all fit in the S-server's live slots
        (the default job): all aux models are aligned at once. Otherwise each client is aligned at its own first
        upload: a rank runs its clients one after another, so its second client's first upload comes only after its
        first client has had its aux, and gathering them would wait forever."""
        return (self.is_align_round(round) and self.world.num_clients <= self.world.num_client_ranks
                and self.server_slots() >= self.world.num_clients)

    def on_upload(self, s, round, cid, seq, z, y):
        """A server step on every upload. In an alignment round a client's first upload is also its alignment:
        gathered (its target fixed now, every aux aligned at once when the last client's first upload is in) or,
        when the clients' state does not all fit in memory, at once for this client alone."""
        self.server_step(s, cid, z, y)
        with self.aux_of(s, [cid]):
            self._buffer(s, cid, z, y)
            if seq == 0 and self.is_align_round(round):
                if not self.gathers_first_uploads(round):
                    self.align(s, cid)
                    return [Reply(None, Kind.AUX_MODEL, pack_state(s.aux[cid].state_dict()))]
                self.keep_align_target(s, cid)
        if seq == 0 and len(s.align_targets) == self.world.num_clients:
            cids = sorted(s.align_targets)
            self.align_many(s, cids)
            with self.aux_of(s, cids):
                return [Reply(c, Kind.AUX_MODEL, pack_state(s.aux[c].state_dict())) for c in cids]
        return []

    def _buffer(self, s: FslSageServer, cid: int, z: torch.Tensor, y: torch.Tensor) -> None:
        """Keeps the last `fsl.align_buffer_size` samples in a ring (alignment uses the whole buffer as one batch, so
        the order inside it does not matter; a ring avoids re-copying the buffer on every upload)."""
        n = self.cfg.fsl.align_buffer_size
        z, y = z[-n:], y[-n:]
        if cid not in s.buffer_z:
            s.buffer_z[cid] = z[:0].detach().clone()
            s.buffer_y[cid] = y[:0].clone()                 # token targets are [n, T]
            s.buffer_fill[cid] = torch.zeros(2, dtype=torch.int64)
        bz, by, fill = s.buffer_z[cid], s.buffer_y[cid], s.buffer_fill[cid]
        if len(bz) < n:       # still filling: appended in arrival order, so rows [0, held) are the samples held
            grow = min(len(y), n - len(bz))
            bz = s.buffer_z[cid] = torch.cat([bz, z[:grow].detach()])
            by = s.buffer_y[cid] = torch.cat([by, y[:grow]])
            z, y = z[grow:], y[grow:]
            fill[0], fill[1] = len(bz), len(bz) % n
            if not len(y):
                return
        pos = int(fill[1])
        first = min(len(y), n - pos)
        bz[pos:pos + first], by[pos:pos + first] = z[:first], y[:first]
        bz[:len(y) - first], by[:len(y) - first] = z[first:], y[first:]
        fill[0] = min(n, int(fill[0]) + len(y))
        fill[1] = (pos + len(y)) % n

    def buffered(self, s: FslSageServer, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        held = int(s.buffer_fill[cid][0])
        return s.buffer_z[cid][:held], s.buffer_y[cid][:held]

    def align(self, s: FslSageServer, cid: int) -> float:
        """Lazy alignment: the true cut-layer gradients of the current server model on the whole buffer
        (server in train mode: BN statistics update, weights do not), then `fsl.align_steps` Adam steps of the
        client's auxiliary copy on sum((g_aux(z) - G)^2), g_aux by double back-propagation (align batch = the
        whole buffer, so estimate and target share the 1/N scale). Returns the last loss."""
        return self.align_many(s, [cid], batched=False)[cid]

    def align_threads(self) -> int:
        """The S-server's torch threads while it aligns: `fsl.align_threads`, or for 0 every core this process may use
        when the clients wait for their aux (blocking; measured 1.55-1.85x faster alignment with both cores of a
        2-core machine, docs/results.md) and one when they compute meanwhile (overlap)."""
        if self.cfg.fsl.align_threads:
            return self.cfg.fsl.align_threads
        if self.cfg.fsl.align_mode == "overlap":
            return 1
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def keep_align_target(self, s: FslSageServer, cid: int) -> None:
        """The first half of an alignment, kept until `align_many` runs the second: client `cid`'s true cut-layer
        gradients on the current server model (train mode; scale 1/N). Called at the client's first upload of an
        alignment round, it gives `align_many` exactly the targets of a per-client `align` at that moment, however
        long the aux steps are deferred: the buffer is kept with the target (copied with `fsl.align_mode=overlap`,
        where the client's later uploads change the buffer before its aux steps run; blocking, it cannot change)."""
        z, y = self.buffered(s, cid)
        if self.cfg.fsl.align_mode == "overlap":      # the client's later uploads may change its buffer meanwhile
            z, y = z.clone(), y.clone()
        start = time.perf_counter()
        with threads(self.align_threads()):     # as align_many would compute it: the same sums, bit for bit
            s.align_targets[cid] = (z, y, true_gradients(s.model, z, y, self.train_loss))
        s.align_seconds += time.perf_counter() - start

    def align_many(self, s: FslSageServer, cids, batched: bool = False) -> dict[int, float]:
        """`align` for several clients: the targets `keep_align_target` kept for them (or, for clients without one,
        computed now, one after another on the current server model: exactly as that many `align` calls with no
        upload between them), then their auxiliary steps: by default the per-client loop, or with batched=True as
        one batched computation (mpisage.algorithms.alignment). The loop is the faster path on both kinds of device
        measured (benchmarks/batched_alignment.py, 10 clients x 448-sample buffers, ResNet-18 aux, seconds per step):
        CPU 7.17 loop against 13.40 batched, an H200 0.106 against 0.300 (docs/results.md, "First contact with a
        GPU"). Returns each client's last loss."""
        cids, start = list(cids), time.perf_counter()
        with threads(self.align_threads()), self.aux_of(s, cids):     # every aligned client live together
            losses = self._align_many(s, cids, batched)
        s.align_seconds += time.perf_counter() - start
        return losses

    def _align_many(self, s: FslSageServer, cids: list[int], batched: bool) -> dict[int, float]:
        kept = s.align_targets
        for cid in cids:
            if cid not in kept:
                z, y = self.buffered(s, cid)
                kept[cid] = (z, y, true_gradients(s.model, z, y, self.train_loss))
        held = [kept.pop(cid) for cid in cids]
        buffers, targets = [(z, y) for z, y, _ in held], [g for _, _, g in held]
        auxes = [s.aux[cid] for cid in cids]
        optimizers = [s.aux_optimizer[cid] for cid in cids]
        if batched:
            losses = align_clients(auxes, optimizers, [z for z, _ in buffers], [y for _, y in buffers], targets,
                                   self.cfg.fsl.align_steps, self.train_loss)
        else:
            losses = [align_one(aux, opt, z, y, g, self.cfg.fsl.align_steps, self.train_loss)
                      for aux, opt, (z, y), g in zip(auxes, optimizers, buffers, targets)]
        last = {}
        for cid, row in zip(cids, losses):
            if row:   # first and last alignment loss of this client's latest alignment, for the metrics
                s.align_loss[cid] = (row[0], row[-1])
            last[cid] = row[-1] if row else float("nan")
        return last

    def server_report_fields(self) -> dict:
        return {"align_loss": (self.world.num_clients, 2), "align_seconds": 1}

    def server_report(self, s: FslSageServer) -> dict:
        """First and last alignment loss of each client aligned this round (NaN for the others), and the seconds
        the S-server spent aligning."""
        report = {"align_loss": np.array([s.align_loss.get(cid, (np.nan, np.nan))
                                          for cid in range(self.world.num_clients)]),
                  "align_seconds": s.align_seconds}
        s.align_loss.clear()
        s.align_seconds = 0.0
        return report

    def describe(self) -> dict:
        return {**super().describe(), "Q": self.cfg.fsl.server_update_interval, "l": self.cfg.fsl.align_interval,
                "align_buffer_size": self.cfg.fsl.align_buffer_size, "align_steps": self.cfg.fsl.align_steps}
