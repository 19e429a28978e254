"""SGLR (Pal et al., 2021): parallel split learning whose client models are never averaged. Each iteration the
S-server concatenates every client's smashed batch (C x B samples), takes ONE step of the single server model and
returns each client the cut-layer gradient of its slice, except that:

- SplitAvg (`sglr.avg=sampled`, the paper's eq. 15 and Algorithm 1 lines 18-19): a fraction phi of the clients, the
  active set C_a sampled afresh each iteration, receives ONE broadcast gradient, the element-wise mean of the active
  clients' slices only; the others receive their own slice. (phi = 1 is the paper's "Full" variant.)
  `sglr.avg=phased` is the authors' code: every client gets the mean of all C slices during the first fraction f of
  training, its own slice after; `sglr.avg=phased_final` the same during the final fraction f (the two phasings of
  the paper's Table 3).
- SplitLr: the server's learning rate is the clients' x C^alpha.

The broadcast gradient is one payload: the paper figure counts it once per iteration. On the wire it goes
point-to-point to each receiver (every copy is in the wire figure): the receivers change every iteration, so a
collective would need a new communicator (or every client listening) per iteration.

`sglr.loss=softmax_bce`: the authors' loss, binary cross-entropy between the softmax of the logits and the one-hot
labels (mean over samples and classes); `sglr.loss=ce`: cross-entropy. Only SGLR reads the sglr section.

Evaluation: each client's own model under the shared server, accuracies and losses averaged over clients.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mpisage.algorithms.base import Algorithm, ClientState, Reply, ServerState
from mpisage.algorithms.evaluation import MeanEvaluation
from mpisage.algorithms.training import apply_schedule, make_optimizer, optimizer_step
from mpisage.config import ConfigError
from mpisage.runtime.protocol import ClientLink
from mpisage.runtime.stateful import transient
from mpisage.runtime.transport import Kind


@dataclass
class SglrServer(ServerState):
    generator: torch.Generator = None                                   # who gets the mean gradient
    pending: dict[int, tuple] = transient(default_factory=dict)        # client id -> (z, y) of this iteration


class Sglr(Algorithm):
    name = "sglr"
    schedule = "lockstep"
    averages_shared = False
    images_only = True

    def __init__(self, world):
        super().__init__(world)
        if len({tuple(world.batch_sizes(cid)) for cid in range(world.num_clients)}) > 1:
            raise ConfigError("sglr concatenates the k-th batch of every client, so every client needs the same "
                              "number of samples: use dataset.samples_per_client=N with dataset.distribution=iid "
                              "(the paper: 1000)")
        self.server_lr = self.cfg.optim.lr * world.num_clients ** self.cfg.sglr.lr_alpha

    # ------------------------------------------------------------------ client
    def client_send(self, c: ClientState, link: ClientLink, k: int, x, y):
        apply_schedule(c.optimizer, self.cfg, self.cfg.optim.lr, link.round)
        c.model.train()
        z = c.model(x)
        link.upload(z, y, seq=k)
        return z

    def client_finish(self, c: ClientState, link: ClientLink, k: int, z):
        grad = link.receive(Kind.GRADIENT, seq=k, shape=tuple(z.shape), dtype=z.dtype)
        c.optimizer.zero_grad(set_to_none=True)
        z.backward(grad)
        optimizer_step(c.optimizer, self.cfg)
        return None

    # ------------------------------------------------------------------ S-server
    def make_server(self) -> SglrServer:
        s = self.server_state(SglrServer, generator=self.world.generator("server"))
        s.optimizer = make_optimizer(s.model.parameters(), self.cfg, lr=self.server_lr)
        return s

    def expected_uploads(self, cid: int) -> int:
        return self.world.steps_per_round(cid)

    def mean_receivers(self, s: SglrServer, round: int) -> set[int]:
        """The clients that get the mean gradient this iteration; the mean is over exactly their slices."""
        m, f, rounds = self.world.num_clients, self.cfg.sglr.avg_fraction, self.cfg.rounds
        if self.cfg.sglr.avg == "phased":          # the first fraction f of the rounds
            return set(range(m)) if round < f * rounds else set()
        if self.cfg.sglr.avg == "phased_final":    # the final fraction f of the rounds
            return set(range(m)) if round >= (1 - f) * rounds else set()
        if self.cfg.sglr.avg == "sampled":
            count = int(f * m + 0.5)
            return set(torch.randperm(m, generator=s.generator)[:count].tolist())
        return set()

    def losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses whose mean is the loss the server steps on."""
        if self.cfg.sglr.loss == "softmax_bce":
            # BCE on probabilities, as the authors' nn.BCELoss after a softmax; its mean over samples and classes
            # is the mean over samples of these per-sample class means
            target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
            return F.binary_cross_entropy(logits.softmax(1), target, reduction="none").mean(1)
        return F.cross_entropy(logits, y, reduction="none")

    def on_upload(self, s, round, cid, seq, z, y):
        pending = s.pending
        pending[cid] = (z, y)
        if len(pending) < self.world.num_clients:
            return []
        cids = sorted(pending)          # concatenated in client order, whatever the arrival order
        z_all = torch.cat([pending[c][0] for c in cids]).requires_grad_(True)
        y_all = torch.cat([pending[c][1] for c in cids])
        sizes = [len(pending[c][1]) for c in cids]
        pending.clear()
        apply_schedule(s.optimizer, self.cfg, self.server_lr, round)
        s.model.train()
        s.optimizer.zero_grad(set_to_none=True)
        logits = s.model(z_all)
        losses = self.losses(logits, y_all)
        losses.mean().backward()
        optimizer_step(s.optimizer, self.cfg)
        slices = z_all.grad.split(sizes)
        # per-client loss sums and hits in one device-to-host copy (every client's batch has the same size)
        correct = (logits.argmax(1) == y_all).to(losses.dtype)
        per_client = torch.stack([losses.detach(), correct]).view(2, len(cids), -1).sum(2).T.cpu().numpy()
        s.train_stats[cids] += np.column_stack([per_client, sizes])
        receivers = self.mean_receivers(s, round)
        mean = torch.stack([g for c, g in zip(cids, slices) if c in receivers]).mean(0) if receivers else None
        first = min(receivers, default=None)
        # the mean is one broadcast payload, in the paper figure once (with its first receiver); every copy sent is
        # in the wire figure
        return [Reply(c, Kind.GRADIENT, mean, c == first) if c in receivers else Reply(c, Kind.GRADIENT, g)
                for c, g in zip(cids, slices)]

    def evaluation(self, s, modules):
        server = copy.deepcopy(s.model)
        return MeanEvaluation([self.make_evaluation(server, modules[(Kind.CLIENT_MODEL, cid)])
                               for cid in range(self.world.num_clients)])

    def describe(self) -> dict:
        return {**super().describe(), "server_lr": self.server_lr, "split_avg": self.cfg.sglr.avg,
                "split_avg_fraction": self.cfg.sglr.avg_fraction,
                "loss": self.cfg.sglr.loss,
                "gradient_broadcast": "point-to-point on the wire; the paper figure counts the mean once"}
