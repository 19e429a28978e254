"""FSL-SAGE (Nair et al., ICML 2025): clients step on the gradient of an auxiliary model that stands in for the
server; every Q-th step they upload the smashed batch and the S-server takes one step on it; at round 0 and every
l rounds the S-server aligns each client's auxiliary model to its own true cut-layer gradients and sends it back.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn

from mpisage.algorithms.base import Algorithm, ClientState, ServerState
from mpisage.algorithms.training import count_correct, count_scored, make_optimizer, optimizer_step
from mpisage.runtime.client_store import ClientStore, FieldView
from mpisage.runtime.protocol import ClientLink
from mpisage.runtime.state import load_packed, pack_state, state_nbytes
from mpisage.runtime.stateful import Stateful, transient
from mpisage.runtime.transport import Kind


@dataclass
class AuxClient(Stateful):
    """What the S-server keeps per client: an auxiliary copy with its own Adam (state persists across alignments)
    and a ring of the last `align_buffer_size` uploaded samples (kept as uploaded: they go stale, as in the
    paper). The ring grows to its size as samples come, so a client that uploaded little holds little."""
    aux: nn.Module = None
    aux_optimizer: torch.optim.Optimizer = None
    buffer_z: torch.Tensor | None = None       # created at the client's first upload
    buffer_y: torch.Tensor | None = None
    buffer_fill: torch.Tensor | None = None    # [samples held, next write position]


@dataclass
class FslSageServer(ServerState):
    """Every client's AuxClient, idle ones packed in a ClientStore (config client_store); `aux`, `aux_optimizer`,
    `buffer_z`, `buffer_y`, `buffer_fill` read them as per-client mappings. A reference from them is valid until
    another client is read: code working on several clients at once pins them with `aux_of`."""
    clients: ClientStore = None
    align_loss: dict[int, tuple[float, float]] = transient(default_factory=dict)   # this round's (first, last)

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

    def is_align_round(self, round: int) -> bool:
        return round % self.cfg.align_interval == 0

    # ------------------------------------------------------------------ client
    def client_step(self, c: ClientState, link: ClientLink, k: int, x, y):
        # c.aux is replaced by the aligned model at round 0 and never trained on the client
        Q = self.cfg.server_update_interval
        c.model.train()
        z = c.model(x)
        if k % Q == 0:
            link.upload(z, y, seq=k // Q)
        if k == 0 and self.is_align_round(link.round):
            load_packed(c.aux, link.receive(Kind.AUX_MODEL, seq=0, nbytes=state_nbytes(c.aux.state_dict())))
        # The estimate of dL/dz: the auxiliary model's input gradient with the true labels, mean over the batch.
        z_leaf = z.detach().requires_grad_(True)
        c.aux.train()
        logits = c.aux(z_leaf)
        loss = self.train_loss(logits, y)
        (g_hat,) = torch.autograd.grad(loss, z_leaf)
        c.optimizer.zero_grad(set_to_none=True)
        z.backward(g_hat)
        optimizer_step(c.optimizer, self.cfg)
        return loss.item() * count_scored(y), count_correct(logits, y)

    # ------------------------------------------------------------------ S-server
    def make_server(self) -> FslSageServer:
        return self.server_state(FslSageServer, clients=self.server_store(self._aux_client))

    def _aux_client(self, cid: int) -> AuxClient:
        aux = self.world.initial_part("aux")
        return AuxClient(aux, make_optimizer(aux.parameters(), self.cfg, lr=self.cfg.align_lr, weight_decay=0.0))

    @contextmanager
    def aux_of(self, s: FslSageServer, cids):
        """Pins the AuxClients of `cids` live for the block and yields them (in the order of `cids`)."""
        with s.clients.use(cids) as held:
            yield held

    def expected_uploads(self, cid: int) -> int:
        steps = self.world.steps_per_round(cid)
        return -(-steps // self.cfg.server_update_interval)

    def on_upload(self, s, round, cid, seq, z, y):
        self.server_step(s, cid, z, y)
        with self.aux_of(s, [cid]):
            self._buffer(s, cid, z, y)
            if seq == 0 and self.is_align_round(round):
                self.align(s, cid)
                return [(Kind.AUX_MODEL, pack_state(s.aux[cid].state_dict()))]
        return []

    def _buffer(self, s: FslSageServer, cid: int, z: torch.Tensor, y: torch.Tensor) -> None:
        """Keeps the last `align_buffer_size` samples in a ring (alignment uses the whole buffer as one batch, so
        the order inside it does not matter; a ring avoids re-copying the buffer on every upload)."""
        n = self.cfg.align_buffer_size
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
        (server in train mode: BN statistics update, weights do not), then `align_steps` Adam steps of the
        client's auxiliary copy on sum((g_aux(z) - G)^2), g_aux by double back-propagation (align batch = the
        whole buffer, so estimate and target share the 1/N scale). Returns the last loss."""
        z, y = self.buffered(s, cid)
        aux, opt = s.aux[cid], s.aux_optimizer[cid]
        s.model.train()
        z_leaf = z.detach().clone().requires_grad_(True)
        (target,) = torch.autograd.grad(self.train_loss(s.model(z_leaf), y), z_leaf)   # scale 1/N
        aux.train()
        losses = []
        for _ in range(self.cfg.align_steps):
            z_leaf = z.detach().clone().requires_grad_(True)
            (g_aux,) = torch.autograd.grad(self.train_loss(aux(z_leaf), y), z_leaf, create_graph=True)
            loss = ((g_aux - target) ** 2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if losses:   # first and last alignment loss of this client's latest alignment, for the metrics
            s.align_loss[cid] = (losses[0], losses[-1])
        return losses[-1] if losses else float("nan")

    def server_report_fields(self) -> dict:
        return {"align_loss": (self.world.num_clients, 2)}

    def server_report(self, s: FslSageServer) -> dict:
        """First and last alignment loss of each client aligned this round (NaN for the others)."""
        report = {"align_loss": np.array([s.align_loss.get(cid, (np.nan, np.nan))
                                          for cid in range(self.world.num_clients)])}
        s.align_loss.clear()
        return report

    def describe(self) -> dict:
        return {**super().describe(), "Q": self.cfg.server_update_interval, "l": self.cfg.align_interval,
                "align_buffer_size": self.cfg.align_buffer_size, "align_steps": self.cfg.align_steps}
