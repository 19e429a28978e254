"""FedBuff (Nguyen et al., AISTATS 2022), the GAS paper's asynchronous FedAvg baseline: C of the K clients train
the whole model (client part + server part) on their own for E local iterations from the newest global model; the
F-server averages every Q_c returned models into the next global model. Same scheduler and straggler clock as GAS,
with no activation upload: a client's iteration costs the whole model's compute, and a participation ends with the
upload of the whole model. The S-server only evaluates."""
from __future__ import annotations

from mpisage.algorithms.asynchronous import AsyncAlgorithm
from mpisage.algorithms.base import ClientState
from mpisage.algorithms.training import make_optimizer


class FedBuff(AsyncAlgorithm):
    name = "fed_buff"
    shared_parts = ("client", "server")
    uses_sserver = False

    def make_client(self, cid: int) -> ClientState:
        split = self.world.build_model()
        return self.new_client(cid, split.client, make_optimizer(split.whole().parameters(), self.cfg),
                               server=split.server)

    def client_iteration(self, c, link, k, x, y) -> None:
        c.model.train()
        c.server.train()
        self.local_step(c, c.server(c.model(x)), y)
