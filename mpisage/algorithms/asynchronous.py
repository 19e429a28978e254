"""The base of asynchronous methods (GAS, FedBuff, CA2FL): no rounds, C of the K clients active at a
time, each running E local iterations from the newest global client model and sending its model back; every Q_c
returned models make one global update. The role loops are mpisage/roles/asynchronous.py; an asynchronous method
fills in the hooks below.

The straggler clock of the GAS paper (and of its authors' code, eejiarong/GAS) lives here too: every client has a
compute speed and an uplink rate, which give
the simulated seconds of an iteration and of a participation (the time axis of the GAS paper's figures).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from mpisage.algorithms.base import Algorithm, ClientState, ServerState
from mpisage.runtime import wire
from mpisage.runtime.protocol import ClientLink
from mpisage.runtime.state import fedavg, state_nbytes
from mpisage.runtime.transport import Kind
from mpisage.runtime.world import derive_seed


@dataclass
class ClientProfile:
    """The straggler model of the GAS paper: compute speed c (FLOP/s) and uplink rate R (bit/s) of one client."""
    flops: float
    uplink: float

    def pass_seconds(self, client_macs: float) -> float:
        """One forward (or backward) pass of ONE sample: the paper's and the authors' compute term has no batch
        factor (the authors comment it out)."""
        return client_macs / self.flops

    def iteration_seconds(self, client_macs: float, activation_bits: float) -> float:
        """Forward + backward of a sample, plus the upload of the activation batch."""
        return 2 * self.pass_seconds(client_macs) + activation_bits / self.uplink

    def model_seconds(self, model_bits: float) -> float:
        return model_bits / self.uplink


def client_profiles(num_clients: int, seed: int) -> list[ClientProfile]:
    """c ~ U(1e9, 1e10) FLOP/s; r ~ U(0.1, 1) km; R = W log2(1 + P h / (W N0)), W = 10 MHz, P = 0.2 W,
    N0 = -174 dBm/Hz, h = 10^(-PL/10), PL = 128.1 + 37.6 log10(r) dB."""
    rng = np.random.default_rng(seed)
    W, P = 10e6, 0.2
    n0 = 10 ** (-174 / 10) / 1000         # W/Hz
    out = []
    for _ in range(num_clients):
        flops, r = rng.uniform(1e9, 1e10), rng.uniform(0.1, 1.0)
        h = 10 ** (-(128.1 + 37.6 * math.log10(r)) / 10)
        out.append(ClientProfile(flops, W * math.log2(1 + P * h / (W * n0))))
    return out


@dataclass(frozen=True)
class Step:
    """One local iteration of the simulated schedule."""
    time: float       # when its activation reaches the S-server (the authors' clock of the client at that moment)
    client: int
    version: int      # the global model its participation started from
    seq: int          # 0 .. E-1; at 0 the client first takes its start model
    returned: float   # last iteration: when its model is back at the F-server (backward + model upload); else nan
    update: int       # the global version this step's returned model completes (the Q_c-th model), else -1
    replacement: int  # last iteration: the client that starts when this model is back (-1: none, the run ends)


class ClientPool:
    """The scheduler's draw-and-replace, used by both schedules (simulated and arrival): the inactive clients and
    the uniform draws among them from the F-server's random stream."""

    def __init__(self, num_clients: int, generator: torch.Generator):
        self.inactive, self.generator = list(range(num_clients)), generator

    def draw(self) -> int:
        return self.inactive.pop(int(torch.randint(len(self.inactive), (1,), generator=self.generator)))

    def replace(self, finished: int) -> int:
        """The client that starts when `finished` returns its model: one drawn from the inactive ones, after which
        `finished` may be drawn again later; with every client active (C = K) the finished client goes again."""
        replacement = self.draw() if self.inactive else finished
        if replacement != finished:
            self.inactive.append(finished)
        return replacement


@dataclass
class SimulatedSchedule:
    """Every local iteration of a run in simulated-time order, and the time of every global update."""
    steps: list[Step] = field(default_factory=list)
    update_times: list[float] = field(default_factory=list)
    first_clients: list[int] = field(default_factory=list)     # the C clients that start the run

    def participations(self, num_clients: int) -> np.ndarray:
        """Completed participations per client (the returned models)."""
        return np.bincount([s.client for s in self.steps if not math.isnan(s.returned)], minlength=num_clients)


def simulate_schedule(pass_s, activation_s, model_s, active: int, model_buffer: int, local_iters: int, updates: int,
                      generator: torch.Generator, start_time: float = 0.0) -> SimulatedSchedule:
    """The straggler schedule of the GAS paper (and of the authors' code): the active client whose clock is earliest
    acts next, one iteration at a time. A client's clock is the moment its activation reaches the S-server: forward
    (pass_s[k]) + upload (activation_s[k]) after it starts, then backward + forward + upload per further iteration;
    after its last one, backward + model upload (model_s[k]) bring its model to the F-server, and the client drawn
    uniformly from the inactive ones to replace it starts at that moment (the finished client's clock). Every
    Q_c returned models make a global update, at the latest return time so far. The schedule depends only on the
    clients' speeds and the draws, never on training, so every rank computes the same one; it ends with the
    update number `updates`."""
    num_clients = len(pass_s)
    pool = ClientPool(num_clients, generator)
    heap: list[tuple[float, int, int, int, int]] = []     # (time, insertion order, client, version, seq)
    order = 0

    def begin(cid: int, at: float, version: int) -> None:
        nonlocal order
        heapq.heappush(heap, (at + pass_s[cid] + activation_s[cid], order, cid, version, 0))
        order += 1

    out = SimulatedSchedule()
    for _ in range(min(active, num_clients)):
        out.first_clients.append(pool.draw())
        begin(out.first_clients[-1], start_time, 0)
    version, buffered, latest = 0, 0, start_time
    while version < updates:
        at, _, cid, started, seq = heapq.heappop(heap)
        if seq + 1 < local_iters:
            out.steps.append(Step(at, cid, started, seq, math.nan, -1, -1))
            heapq.heappush(heap, (at + 2 * pass_s[cid] + activation_s[cid], order, cid, started, seq + 1))
            order += 1
            continue
        back = at + pass_s[cid] + model_s[cid]
        latest = max(latest, back)
        buffered += 1
        update = -1
        if buffered == model_buffer:
            update, buffered = version, 0
            out.update_times.append(latest)
            version += 1
        if version == updates:
            out.steps.append(Step(at, cid, started, seq, back, update, -1))
            break
        replacement = pool.replace(cid)        # it starts from the newest global model
        out.steps.append(Step(at, cid, started, seq, back, update, replacement))
        begin(replacement, back, version)
    return out


def upload_bits(shape: tuple[int, ...], wire_format: str) -> float:
    """Bits of one activation upload of `shape` as it travels in `wire_format` (wire.activations): the clock charges
    what is sent, so a narrower format uploads sooner (the paper's clock has float32 activations)."""
    fmt = wire.parse("wire.activations", wire_format)
    return 8.0 * (fmt.payload_nbytes(shape) if fmt else 4 * math.prod(shape))


def count_macs(module: nn.Module, example: torch.Tensor) -> float:
    """Multiply-accumulates per sample of the convolutions and linear layers of one forward pass."""
    total = [0.0]

    def hook(m, inputs, output):
        if isinstance(m, nn.Conv2d):
            total[0] += output.numel() / output.shape[0] * m.in_channels // m.groups * math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            total[0] += output.numel() / output.shape[0] * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    return total[0]


class AsyncAlgorithm(Algorithm):
    """Hooks: client_iteration (client), on_activation (S-server), average_models or global_update (F-server),
    fserver_state / load_fserver_state (what the method keeps on the F-server). `shared_parts` are the parts a
    participation starts from and sends back; `uses_sserver` = False: clients train on their own (no activation
    goes up; the S-server only evaluates)."""
    schedule = "async"
    uses_sserver = True
    images_only = True
    # True: `global_update` is given, with each returned model, the global model it started from (the F-server then
    # keeps every global model an active client started from). Set by overriding `global_update`.
    updates_from_start_models = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "global_update" in cls.__dict__ and "updates_from_start_models" not in cls.__dict__:
            cls.updates_from_start_models = True

    def __init__(self, world):
        super().__init__(world)
        cfg, m = self.cfg, world.num_clients
        self.active = min(cfg.asynchronous.active_clients or m, m)           # C
        self.model_buffer = cfg.asynchronous.model_buffer or self.active     # Q_c
        # the simulated clock: what a client computes per sample, what it uploads per iteration and per participation
        client = world.initial_part("client")
        self.client_macs = count_macs(client, world.example_input(1))
        if not self.uses_sserver:     # the whole model on the client, nothing up during a participation
            with torch.no_grad():
                cut = client.eval()(world.example_input(1))
            self.client_macs += count_macs(world.initial_part("server"), cut)
        self.activation_bits = (upload_bits((cfg.batch_size, *self.activation_shape), cfg.wire.activations)
                                if self.uses_sserver else 0.0)
        self.model_bits = 8.0 * sum(state_nbytes(world.initial_part(part).state_dict()) for part in self.shared_parts)
        self.profiles = client_profiles(m, derive_seed(cfg.seed, "init", 2))
        per_iter = [p.iteration_seconds(self.client_macs, self.activation_bits) for p in self.profiles]
        self.iteration_seconds = per_iter
        self.slowness = [s / max(per_iter) for s in per_iter]     # 1 = the slowest client

    def participation_seconds(self, cid: int) -> float:
        """Simulated time of one participation: E iterations plus the model upload."""
        return (self.cfg.asynchronous.local_iters * self.iteration_seconds[cid]
                + self.profiles[cid].model_seconds(self.model_bits))

    def simulated_schedule(self, updates: int, start_round: int = 0) -> SimulatedSchedule:
        """The simulated schedule of `updates` global updates from update `start_round` on (a resumed run starts
        every client afresh, with draws of its own). Every rank computes the same one."""
        return simulate_schedule([p.pass_seconds(self.client_macs) for p in self.profiles],
                                 [p.model_seconds(self.activation_bits) for p in self.profiles],
                                 [p.model_seconds(self.model_bits) for p in self.profiles], self.active,
                                 self.model_buffer, self.cfg.asynchronous.local_iters, updates,
                                 self.world.generator("fserver", start_round))   # the schedule is the F-server's

    # ================================================================== hooks
    def client_iteration(self, c: ClientState, link: ClientLink, k: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """One local iteration of an active client (default: a step on the gradient the S-server returns)."""
        self.returned_gradient_step(c, link, k, x, y)

    def on_activation(self, s: ServerState, cid: int, progress: int, z: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
        """The S-server's answer to one activation: the cut-layer gradient for the client. `progress` = n = tE + e,
        the client's local iterations so far."""
        raise NotImplementedError(f"{self.name}: an asynchronous split method implements on_activation")

    def average_models(self, packed: list[torch.Tensor], cids: list[int], template: nn.Module) -> torch.Tensor:
        """The new global client model from the Q_c returned ones (paper: weighted by |D_k|;
        `asynchronous.model_weighting=equal`: the authors' code)."""
        by_samples = self.cfg.asynchronous.model_weighting == "samples"
        weights = [self.world.num_samples(c) if by_samples else 1.0 for c in cids]
        return fedavg(packed, weights, template.state_dict())

    def global_update(self, kind: Kind, current: torch.Tensor, returned: list[torch.Tensor],
                      started: list[torch.Tensor] | None, cids: list[int], template: nn.Module) -> torch.Tensor:
        """The new global part `kind` (packed) from the current one and the Q_c returned ones, in the order they were
        taken; `started[j]`: the global part returned model j started from (None unless the method overrides this
        hook). Default: `average_models` of the returned ones."""
        return self.average_models(returned, cids, template)

    def describe(self) -> dict:
        return {**super().describe(), "active_clients": self.active, "model_buffer": self.model_buffer,
                "client_macs_per_sample": self.client_macs}
