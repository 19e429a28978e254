"""SGLR (Pal et al., 2021): parallel split learning whose client models are never averaged. Each iteration the
S-server concatenates every client's smashed batch (C x B samples), takes ONE step of the single server model and
returns each client the cut-layer gradient of its slice, except that:

- SplitAvg: a fraction phi of the clients, sampled each iteration, receives the element-wise mean of all slices
  (one broadcast gradient; this transport sends it point-to-point, so it is counted once per receiving client);
  `split_avg=phased` is the authors' code instead: everyone gets the mean during the first fraction f of training;
- SplitLr: the server's learning rate is the clients' x C^alpha.

Evaluation: each client's own model under the shared server, accuracies and losses averaged over clients.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mpisage.algorithms.base import Algorithm, ClientState, ServerState
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

    def __init__(self, world):
        super().__init__(world)
        if world.is_token_task:
            raise ConfigError(f"sglr is defined for image classification; {world.data.name} is a language-modelling "
                              f"dataset (use fsl_sage or a baseline)")
        if len({tuple(world.batch_sizes(cid)) for cid in range(world.num_clients)}) > 1:
            raise ConfigError("sglr concatenates the k-th batch of every client, so every client needs the same "
                              "number of samples: use dataset.samples_per_client=N with dataset.distribution=iid "
                              "(the paper: 1000)")
        self.server_lr = self.cfg.lr * world.num_clients ** self.cfg.split_lr_alpha

    # ------------------------------------------------------------------ client
    def client_send(self, c: ClientState, link: ClientLink, k: int, x, y):
        apply_schedule(c.optimizer, self.cfg, self.cfg.lr, link.round)
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
        m = self.world.num_clients
        if self.cfg.split_avg == "phased":
            return set(range(m)) if round < self.cfg.split_avg_fraction * self.cfg.rounds else set()
        if self.cfg.split_avg == "sampled":
            count = int(self.cfg.split_avg_fraction * m + 0.5)
            return set(torch.randperm(m, generator=s.generator)[:count].tolist())
        return set()

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
        losses = F.cross_entropy(logits, y_all, reduction="none")
        losses.mean().backward()
        optimizer_step(s.optimizer, self.cfg)
        slices = z_all.grad.split(sizes)
        # per-client loss sums and hits in one device-to-host copy (every client's batch has the same size)
        correct = (logits.argmax(1) == y_all).to(losses.dtype)
        per_client = torch.stack([losses.detach(), correct]).view(2, len(cids), -1).sum(2).T.cpu().numpy()
        s.train_stats[cids] += np.column_stack([per_client, sizes])
        receivers = self.mean_receivers(s, round)
        mean = torch.stack(slices).mean(0) if receivers else None
        return [(c, Kind.GRADIENT, mean if c in receivers else g) for c, g in zip(cids, slices)]

    def evaluation(self, s, modules):
        server = copy.deepcopy(s.model)
        return MeanEvaluation([self.make_evaluation(server, modules[(Kind.CLIENT_MODEL, cid)])
                               for cid in range(self.world.num_clients)])

    def describe(self) -> dict:
        return {**super().describe(), "server_lr": self.server_lr, "split_avg": self.cfg.split_avg,
                "split_avg_fraction": self.cfg.split_avg_fraction,
                "gradient_broadcast": "point-to-point, counted once per receiving client"}
