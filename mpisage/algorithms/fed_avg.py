"""FedAvg (McMahan et al. 2017): every client trains its own full copy of the whole model (client part + server
part) for the round; the F-server averages both parts. Nothing goes to the S-server during the round; it only
evaluates the averaged model. (The FSL-SAGE authors' code shares one server-part object between clients, so its
average is a no-op; here each client owns its copy, as in the FSL-SAGE paper's FedAvg baseline.)"""
from __future__ import annotations

from mpisage.algorithms.base import Algorithm, ClientState
from mpisage.algorithms.training import make_optimizer
from mpisage.runtime.protocol import ClientLink
from mpisage.runtime.transport import Kind


class FedAvg(Algorithm):
    name = "fed_avg"
    shared_parts = ("client", "server")

    def make_client(self, cid: int) -> ClientState:
        split = self.world.build_model(("client", "server"))
        return self.new_client(cid, split.client, make_optimizer(split.whole().parameters(), self.cfg),
                               server=split.server)

    def client_step(self, c: ClientState, link: ClientLink, k: int, x, y):
        c.model.train()
        c.server.train()
        return self.local_step(c, c.server(c.model(x)), y)

    def evaluation(self, s, modules):
        return self.make_evaluation(modules[(Kind.SERVER_MODEL, -1)], modules[(Kind.CLIENT_MODEL, -1)])
