"""CA2FL (Wang et al., "Tackling the Data Heterogeneity in Asynchronous Federated Learning with Cached Update
Calibration", ICLR 2024), the GAS paper's cache-aided asynchronous baseline: FedBuff's clients and schedule (C of the
K clients train the whole model for E local iterations from the newest global model; every M = Q_c returned models
make one global update), with the CA2FL server step. The server caches every client's latest update
h_i = x_i - x_start (the model it returned minus the global model it started from; 0 before its first return) and
calibrates each global update with the cache:

    v_t     = h_t + (1/M) sum_{i in S_t} (Delta_i - h_t^i)      Delta_i: client i's returned update
    x_{t+1} = x_t + eta v_t                                      eta: ca2fl.global_lr
    h_{t+1}^i = Delta_i for i in S_t, h_{t+1}^i = h_t^i else;    h_{t+1} = (1/N) sum_i h_{t+1}^i

so a stale update counts only by how much it changes its client's cached one, and clients absent from the buffer
still count through their cached updates. The returned models are taken in the schedule's order; a client whose
model comes back twice in one buffer is calibrated against its first return the second time (the cache is updated
at each return), so sum_{S_t} (Delta_i - h^i) = N (h_{t+1} - h_t) always holds. The rule acts on the floating
entries of the state (weights, BN running statistics); integer buffers (BN's batch counters) are FedBuff's average.

The cache is one float32 update per client that has returned a model, kept in a `ClientStore` on the F-server
(packed host bytes, or a file with client_store.backend=disk), never on an accelerator; the running sum of the cache
is float64. Both are the F-server's state of this method (`fserver_state`), checkpointed and resumed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mpisage.algorithms.base import PART_KINDS
from mpisage.algorithms.fed_buff import FedBuff
from mpisage.runtime.client_store import ClientStore
from mpisage.runtime.state import pack_state, unpack_state
from mpisage.runtime.stateful import Stateful
from mpisage.runtime.transport import Kind

PART_OF_KIND = {kind: part for part, kind in PART_KINDS.items()}


@dataclass
class CachedUpdate(Stateful):
    """h_i: client i's latest update of each shared part, the floating entries of the state as one float32 vector
    (None until its first return: zero)."""
    client: torch.Tensor = None
    server: torch.Tensor = None


class Ca2fl(FedBuff):
    name = "ca2fl"

    def __init__(self, world):
        super().__init__(world)
        self.global_lr = self.cfg.ca2fl.global_lr
        self._cache: ClientStore | None = None            # made on first use: only the F-server holds a cache
        self.cache_sum: dict[str, torch.Tensor] = {}      # part -> sum_i h_i (float64)

    @property
    def cache(self) -> ClientStore:
        if self._cache is None:
            self._cache = self.store(range(self.world.num_clients), lambda cid: CachedUpdate(), in_use=1,
                                     device="cpu", key=lambda cid: f"client{cid}")
        return self._cache

    # ------------------------------------------------------------------ F-server
    def global_update(self, kind: Kind, current: torch.Tensor, returned: list[torch.Tensor],
                      started: list[torch.Tensor] | None, cids: list[int], template: nn.Module) -> torch.Tensor:
        part, state = PART_OF_KIND[kind], template.state_dict()
        x = floats_of(current, state)
        h_sum = self.cache_sum.setdefault(part, torch.zeros_like(x))
        v = h_sum / self.world.num_clients                  # h_t
        calibration = torch.zeros_like(x)
        for packed, start, cid in zip(returned, started, cids):
            delta = (floats_of(packed, state) - floats_of(start, state)).float()
            entry = self.cache[cid]
            cached = getattr(entry, part)
            change = delta.double() - (cached.double() if cached is not None else 0.0)
            calibration += change
            h_sum += change
            setattr(entry, part, delta)
        v += calibration / len(returned)
        new = unpack_state(self.average_models(returned, cids, template), state)    # integer buffers: FedBuff's
        return pack_state(with_floats(new, x + self.global_lr * v))

    def fserver_state(self) -> dict:
        # (the running sum changes in place; the cache's entries are replaced, never changed in place)
        return {"cache": self.cache.state_dict(), "cache_sum": {p: t.clone() for p, t in self.cache_sum.items()}}

    def load_fserver_state(self, flat: dict[str, torch.Tensor], prefix: str) -> None:
        self.cache.load_state_dict(flat, f"{prefix}/cache")
        head = f"{prefix}/cache_sum/"
        self.cache_sum = {name[len(head):]: t.clone() for name, t in flat.items() if name.startswith(head)}

    def describe(self) -> dict:
        return {**super().describe(), "global_lr": self.global_lr}


def floats_of(packed: torch.Tensor, template: dict[str, torch.Tensor]) -> torch.Tensor:
    """The floating entries of a packed state, in state_dict order, as one float64 vector."""
    state = unpack_state(packed, template)
    return torch.cat([t.reshape(-1).double() for t in state.values() if t.is_floating_point()])


def with_floats(state: dict[str, torch.Tensor], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """`state` with its floating entries taken from `flat` (the layout of `floats_of`), in their own dtypes."""
    out, offset = {}, 0
    for name, t in state.items():
        if t.is_floating_point():
            out[name] = flat[offset:offset + t.numel()].view(t.shape).to(t.dtype)
            offset += t.numel()
        else:
            out[name] = t
    return out
