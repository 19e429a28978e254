"""Split learning with gradients returned on every batch (SplitFed, Thapa et al., AAAI 2022):

- sl_single_server (SplitFed v2, Thapa et al. 2022): clients in parallel, ONE server model stepped by every
  client's batches in the order they are served (arrival order; canonical client order when deterministic).
- sl_multi_server (SplitFed v1): one server copy per client, each with its own optimiser; the copies are averaged
  on the S-server after the round (co-located, so not counted as communication).
- sl_vanilla (Vepakomma et al. 2018): one client at a time, round-robin; the client model is handed on to the
  next client through the F-server (counted).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mpisage.algorithms.base import Algorithm, ClientState, Reply, ServerState
from mpisage.algorithms.training import make_optimizer
from mpisage.runtime.client_store import ClientStore
from mpisage.runtime.protocol import ClientLink
from mpisage.runtime.state import fedavg_states, load_packed
from mpisage.runtime.stateful import Stateful
from mpisage.runtime.transport import Kind


class SplitFedV2(Algorithm):
    name = "sl_single_server"

    def client_step(self, c: ClientState, link: ClientLink, k: int, x, y):
        self.returned_gradient_step(c, link, k, x, y)
        return None

    def expected_uploads(self, cid: int) -> int:
        return self.world.steps_per_round(cid)

    def on_upload(self, s, round, cid, seq, z, y):
        return [Reply(None, Kind.GRADIENT, self.server_step(s, cid, z, y, return_grad=True))]


@dataclass
class ServerCopy(Stateful):
    model: nn.Module = None
    optimizer: torch.optim.Optimizer = None


@dataclass
class SplitFedV1Server(ServerState):
    copies: ClientStore = None      # client id -> its server copy and optimiser, idle ones packed (client_store)


class SplitFedV1(SplitFedV2):
    name = "sl_multi_server"

    def make_server(self) -> SplitFedV1Server:
        return self.server_state(SplitFedV1Server, copies=self.server_store(self._copy))

    def _copy(self, cid: int) -> ServerCopy:
        model = self.world.initial_part("server")        # the weights the S-server's own model starts from
        return ServerCopy(model, make_optimizer(model.parameters(), self.cfg))

    def on_upload(self, s, round, cid, seq, z, y):
        c = s.copies[cid]
        grad = self.server_step(s, cid, z, y, model=c.model, optimizer=c.optimizer, return_grad=True)
        return [Reply(None, Kind.GRADIENT, grad)]

    def end_server_round(self, s: SplitFedV1Server, round: int) -> None:
        """Average the server copies (weights n_i / n, whole state_dict) and give every copy the average;
        optimiser states stay per copy, as the client optimisers do."""
        cids = range(self.world.num_clients)
        weights = [self.world.num_samples(cid) for cid in cids]
        # one copy at a time: the copies never need to be live together
        averaged = fedavg_states((s.copies[cid].model.state_dict() for cid in cids), weights, s.model.state_dict())
        load_packed(s.model, averaged)
        for cid in cids:
            load_packed(s.copies[cid].model, averaged)


class VanillaSL(SplitFedV2):
    name = "sl_vanilla"
    schedule = "sequential"
