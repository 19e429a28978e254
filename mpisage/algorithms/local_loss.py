"""Local-loss split learning: the client trains its model together with an auxiliary head on its own loss every
batch, so no gradient ever comes back; it uploads the smashed batch every h-th batch and the single server model
takes one step on it. Client and auxiliary models are both averaged by the F-server each round (as in the
FSL-SAGE paper's CSE-FSL baseline).

- cse_fsl (Mu & Shen 2023): h = fsl.server_update_interval (default 5).
- local_loss (Han et al. 2021): the same with an upload on every batch (h = 1).
"""
from __future__ import annotations

from mpisage.algorithms.base import Algorithm, ClientState
from mpisage.algorithms.training import make_optimizer
from mpisage.runtime.protocol import ClientLink


class CseFsl(Algorithm):
    name = "cse_fsl"
    shared_parts = ("client", "aux")

    @property
    def upload_interval(self) -> int:
        return self.cfg.fsl.server_update_interval

    def make_client(self, cid: int) -> ClientState:
        split = self.world.build_model(("client", "aux"))
        params = list(split.client.parameters()) + list(split.aux.parameters())
        return self.new_client(cid, split.client, make_optimizer(params, self.cfg), aux=split.aux)

    def client_step(self, c: ClientState, link: ClientLink, k: int, x, y):
        c.model.train()
        c.aux.train()
        z = c.model(x)
        if k % self.upload_interval == 0:
            link.upload(z, y, seq=k // self.upload_interval)
        return self.local_step(c, c.aux(z), y)

    def expected_uploads(self, cid: int) -> int:
        return -(-self.world.steps_per_round(cid) // self.upload_interval)

    def on_upload(self, s, round, cid, seq, z, y):
        self.server_step(s, cid, z, y)
        return []

    def describe(self) -> dict:
        return {**super().describe(), "h": self.upload_interval}


class LocalLoss(CseFsl):
    name = "local_loss"
    upload_interval = 1
