"""Split learning with gradients returned on every batch (baselines.md):

- sl_single_server (SplitFed v2, Thapa et al. 2022): clients in parallel, ONE server model stepped by every
  client's batches in the order they are served (arrival order; canonical client order when deterministic).
- sl_multi_server (SplitFed v1): one server copy per client, each with its own optimiser; the copies are averaged
  on the S-server after the round (co-located, so not counted as communication).
- sl_vanilla (Vepakomma et al. 2018): one client at a time, round-robin; the client model is handed on to the
  next client through the F-server (counted).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from mpisage.algorithms.base import Algorithm, ClientState, ServerState
from mpisage.algorithms.training import make_optimizer
from mpisage.runtime.protocol import ClientLink
from mpisage.runtime.state import fedavg, load_packed, pack_state
from mpisage.runtime.transport import Kind


class SplitFedV2(Algorithm):
    name = "sl_single_server"

    def client_step(self, c: ClientState, link: ClientLink, k: int, x, y):
        self.returned_gradient_step(c, link, k, x, y)
        return None

    def expected_uploads(self, cid: int) -> int:
        return self.world.steps_per_round(cid)

    def on_upload(self, s, round, cid, seq, z, y):
        return [(Kind.GRADIENT, self.server_step(s, cid, z, y, return_grad=True))]


@dataclass
class SplitFedV1Server(ServerState):
    copies: dict[int, nn.Module] = field(default_factory=dict)                     # client id -> its server copy
    copy_optimizers: dict[int, torch.optim.Optimizer] = field(default_factory=dict)


class SplitFedV1(SplitFedV2):
    name = "sl_multi_server"

    def make_server(self) -> SplitFedV1Server:
        s = self.server_state(SplitFedV1Server)
        s.copies = {cid: copy.deepcopy(s.model) for cid in range(self.world.num_clients)}
        s.copy_optimizers = {cid: make_optimizer(m.parameters(), self.cfg) for cid, m in s.copies.items()}
        return s

    def on_upload(self, s, round, cid, seq, z, y):
        grad = self.server_step(s, cid, z, y, model=s.copies[cid], optimizer=s.copy_optimizers[cid], return_grad=True)
        return [(Kind.GRADIENT, grad)]

    def end_server_round(self, s: SplitFedV1Server, round: int) -> None:
        """Average the server copies (weights n_i / n, whole state_dict) and give every copy the average;
        optimiser states stay per copy, as the client optimisers do."""
        copies = [s.copies[cid] for cid in range(self.world.num_clients)]
        weights = [self.world.num_samples(cid) for cid in range(self.world.num_clients)]
        averaged = fedavg([pack_state(m.state_dict()) for m in copies], weights, s.model.state_dict())
        for module in [s.model, *copies]:
            load_packed(module, averaged)


class VanillaSL(SplitFedV2):
    name = "sl_vanilla"
    schedule = "sequential"
