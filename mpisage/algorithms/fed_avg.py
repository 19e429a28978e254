"""FedAvg (McMahan et al. 2017): every client trains its own full copy of the whole model (client part + server
part) for the round; the F-server averages both parts. Nothing goes to the S-server during the round; it only
evaluates the averaged model. (The FSL-SAGE authors' code shares one server-part object between clients, so its
average is a no-op; here each client owns its copy, as baselines.md asks.)"""
from __future__ import annotations

import torch.nn.functional as F

from mpisage.algorithms.base import Algorithm, ClientLink, ClientState, adam
from mpisage.transport import Kind


class FedAvg(Algorithm):
    name = "fed_avg"

    def make_client(self, cid: int) -> ClientState:
        split = self.world.build_model()
        return self.new_client(cid, split.client, adam(split.whole().parameters(), self.cfg), server=split.server)

    def client_step(self, c: ClientState, link: ClientLink, k: int, x, y):
        c.model.train()
        c.server.train()
        logits = c.server(c.model(x))
        loss = F.cross_entropy(logits, y)
        c.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        c.optimizer.step()
        return loss.item() * len(y), (logits.argmax(1) == y).sum().item()

    def shared_modules(self, c: ClientState):
        return {Kind.CLIENT_MODEL: c.model, Kind.SERVER_MODEL: c.server}

    def shared_templates(self):
        split = self.world.build_model()
        return {Kind.CLIENT_MODEL: split.client, Kind.SERVER_MODEL: split.server}

    def eval_models(self, s, shared):
        return shared[Kind.SERVER_MODEL], shared[Kind.CLIENT_MODEL]
