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

from mpisage.algorithms.base import Algorithm, ClientLink, ClientState, ServerState, make_optimizer
from mpisage.runtime.checkpoint import restore_module, restore_optimizer
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


class SplitFedV1(SplitFedV2):
    name = "sl_multi_server"

    def make_server(self) -> ServerState:
        s = super().make_server()
        s.extra["copies"] = {cid: copy.deepcopy(s.model) for cid in range(self.world.num_clients)}
        s.extra["copy_optimizers"] = {cid: make_optimizer(m.parameters(), self.cfg)
                                     for cid, m in s.extra["copies"].items()}
        return s

    def on_upload(self, s, round, cid, seq, z, y):
        grad = self.server_step(s, cid, z, y, model=s.extra["copies"][cid],
                                optimizer=s.extra["copy_optimizers"][cid], return_grad=True)
        return [(Kind.GRADIENT, grad)]

    def end_server_round(self, s: ServerState, round: int) -> None:
        """Average the server copies (weights n_i / n, whole state_dict) and give every copy the average;
        optimiser states stay per copy, as the client optimisers do."""
        copies = [s.extra["copies"][cid] for cid in range(self.world.num_clients)]
        weights = [self.world.num_samples(cid) for cid in range(self.world.num_clients)]
        averaged = fedavg([pack_state(m.state_dict()) for m in copies], weights, s.model.state_dict())
        for module in [s.model, *copies]:
            load_packed(module, averaged)

    def server_checkpoint(self, s: ServerState) -> dict:
        return {**super().server_checkpoint(s),
                "copies": {cid: m.state_dict() for cid, m in s.extra["copies"].items()},
                "copy_optimizers": {cid: o.state_dict() for cid, o in s.extra["copy_optimizers"].items()}}


    def restore_server(self, s: ServerState, flat, prefix: str) -> None:
        super().restore_server(s, flat, prefix)
        for cid in range(self.world.num_clients):
            restore_module(s.extra["copies"][cid], flat, f"{prefix}/copies/{cid}")
            restore_optimizer(s.extra["copy_optimizers"][cid], flat, f"{prefix}/copy_optimizers/{cid}")


class VanillaSL(SplitFedV2):
    name = "sl_vanilla"
    sequential = True
