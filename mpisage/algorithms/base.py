"""The hooks an algorithm fills in. The role loops (mpisage/roles/) call them and own all communication; an
algorithm file holds only what makes the method different.

A synchronous method's hooks, by role (all have defaults except the client's step):
  client    make_client, client_step (lockstep methods: client_send + client_finish), client_report_fields +
            client_report
  S-server  make_server, expected_uploads, on_upload (returns `Reply`s), gathers_first_uploads (True: the round's
            first uploads are answered together; the S-server then serves every first upload before any second one
            and reports the previous round's evaluation before the last of them), end_server_round, evaluation,
            server_report_fields + server_report
  F-server  aggregate (overriding it makes `aggregate_streams` False: every client's modules arrive at once),
            fserver_state + load_fserver_state (state of the method's own on the F-server, checkpointed)
Class attributes say how the loops run it: `schedule` (parallel | sequential | lockstep), `shared_parts` (what the
F-server averages), `averages_shared` (False: the shared parts are never averaged, only evaluated).
Asynchronous methods (GAS, FedBuff) implement `AsyncAlgorithm` instead (mpisage/algorithms/asynchronous.py); their
S-server's figures go through the same server_report_fields + server_report.
A new method is registered in mpisage/algorithms/__init__.py; CONTRIBUTING.md has the whole checklist.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from mpisage.algorithms.evaluation import Evaluation
from mpisage.algorithms.training import count_correct, count_scored, make_optimizer, optimizer_step, task_loss
from mpisage.config import ConfigError
from mpisage.runtime.client_store import ClientStore
from mpisage.runtime.protocol import ClientLink
from mpisage.runtime.state import fedavg
from mpisage.runtime.stateful import Stateful, transient
from mpisage.runtime.transport import Kind
from mpisage.runtime.world import World

# how the role loops run a method (mpisage/algorithms/asynchronous.py has the simulated schedule of asynchronous ones)
LoopSchedule = Literal["parallel", "sequential", "lockstep", "async"]
# The parts of a split model, by the message kind that carries them.
PART_KINDS = {"client": Kind.CLIENT_MODEL, "server": Kind.SERVER_MODEL, "aux": Kind.AUX_MODEL}


class Reply(NamedTuple):
    """One message the S-server sends in answer to an upload (`on_upload`), with the upload's seq."""
    client: int | None          # the receiving client; None: the uploader
    kind: Kind
    tensor: torch.Tensor
    paper: bool = True          # False for the further copies of one broadcast payload (the wire figure counts them)


@dataclass
class ClientState(Stateful):
    """One virtual client: its data, its models and optimisers, its random stream (batch order, augmentation)."""
    cid: int = transient()
    x: torch.Tensor = transient()                 # uint8 [n, C, H, W] (token ids [n, T])
    y: torch.Tensor = transient()                 # int64 [n] ([n, T])
    model: nn.Module = None
    optimizer: torch.optim.Optimizer = None
    generator: torch.Generator = None
    aux: nn.Module | None = None
    aux_optimizer: torch.optim.Optimizer | None = None
    server: nn.Module | None = None          # a client-held copy of the server part (FedAvg trains the whole model)


@dataclass
class ServerState(Stateful):
    """What the S-server holds; algorithms subclass it with fields of their own (all checkpointed unless marked
    transient)."""
    model: nn.Module = None
    optimizer: torch.optim.Optimizer = None
    # [num_clients, 3]: loss sum, correct, samples of this round's server steps (reported, then reset)
    train_stats: np.ndarray = transient(default=None)


class Algorithm:
    name = "base"
    schedule: LoopSchedule = "parallel"
    # The parts of the split each client sends the F-server after a round and gets back averaged.
    shared_parts: tuple[str, ...] = ("client",)
    # False: the shared parts are never averaged; they go to the F-server (as EVAL traffic, outside the paper
    # figure) only so the S-server can evaluate them (SGLR).
    averages_shared = True
    # True: `aggregate` is the default sample-weighted FedAvg, so the F-server may fold each client's modules into a
    # running average as they come (memory flat in the number of clients). A method that overrides `aggregate`
    # sets it False (it then gets every client's modules at once).
    aggregate_streams = True
    # True: defined for image classification only (a language-modelling dataset is refused at start-up)
    images_only = False
    # the class of a client's state (a ClientState subclass when the method keeps per-client fields of its own)
    client_state: type[ClientState] = ClientState

    def __init__(self, world: World):
        if self.images_only and world.is_token_task:
            raise ConfigError(f"{self.name} is defined for image classification; {world.data.name} is a "
                              f"language-modelling dataset (use fsl_sage or a baseline)")
        self.world = world
        self.cfg = world.cfg
        client = world.initial_part("client").eval()
        with torch.no_grad():
            self.activation_shape = tuple(client(world.example_input(2)).shape[1:])
        # language models train on label-smoothed token cross-entropy (the paper: 0.1); images on plain CE
        self.label_smoothing = self.cfg.lm.label_smoothing if world.is_token_task else 0.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "aggregate" in cls.__dict__ and "aggregate_streams" not in cls.__dict__:
            cls.aggregate_streams = False      # its own aggregate needs every client's modules

    # ================================================================== hooks: client side
    def make_client(self, cid: int) -> ClientState:
        split = self.world.build_model(("client", "aux"))
        return self.new_client(cid, split.client, make_optimizer(split.client.parameters(), self.cfg), aux=split.aux)

    def client_step(self, c: ClientState, link: ClientLink, k: int, x: torch.Tensor,
                    y: torch.Tensor) -> tuple[float, int] | None:
        """One local iteration on batch (x, y); returns (summed loss, correct predictions) of the loss the client
        itself computed, or None when only the server sees the loss (split learning with returned gradients)."""
        raise NotImplementedError(f"{self.name}: a {self.schedule} method implements client_step")

    def client_send(self, c: ClientState, link: ClientLink, k: int, x: torch.Tensor, y: torch.Tensor):
        """Lockstep methods: the first half of a local iteration (forward, upload); returns what client_finish
        needs."""
        raise NotImplementedError(f"{self.name}: a lockstep method implements client_send and client_finish")

    def client_finish(self, c: ClientState, link: ClientLink, k: int, sent) -> tuple[float, int] | None:
        """Lockstep methods: the second half (the reply, backward, step); returns as client_step does."""
        raise NotImplementedError(f"{self.name}: a lockstep method implements client_send and client_finish")

    def client_report_fields(self) -> dict[str, tuple[int, ...]]:
        """Named figures of the algorithm's own that each client reports every round (name -> shape); each becomes
        a metrics dataset of that name, one row per client."""
        return {}

    def client_report(self, c: ClientState, round: int) -> dict[str, np.ndarray | float]:
        """Client `c`'s values of `client_report_fields` for `round`, sent with its round figures."""
        return {}

    # ================================================================== hooks: S-server side
    def make_server(self) -> ServerState:
        return self.server_state(ServerState)

    def expected_uploads(self, cid: int) -> int:
        """How many smashed batches client `cid` sends the S-server in one round."""
        return 0

    def on_upload(self, s: ServerState, round: int, cid: int, seq: int, z: torch.Tensor,
                  y: torch.Tensor) -> list[Reply]:
        """Handles one uploaded smashed batch; returns the replies (`Reply`: to the uploader or to any client)."""
        return []

    def end_server_round(self, s: ServerState, round: int) -> None:
        pass

    def gathers_first_uploads(self, round: int) -> bool:
        """True when this round's first uploads are answered together, once every client's has arrived (each client
        waits for that answer before it uploads again: FSL-SAGE's alignment rounds). The S-server then serves every
        client's first upload before any second one (deterministic order), and finishes the previous round's
        evaluation before the last of them, whose handling is long."""
        return False

    def server_report_fields(self) -> dict[str, tuple[int, ...]]:
        """Named figures of the algorithm's own that the S-server reports every round (name -> shape); each becomes
        a metrics dataset of that name."""
        return {}

    def server_report(self, s: ServerState) -> dict[str, np.ndarray]:
        """This round's values of `server_report_fields`."""
        return {}

    def evaluation(self, s: ServerState, modules: dict[tuple[Kind, int], nn.Module]):
        """The evaluation of this round's global model. `modules`: (kind, client id) -> the averaged shared modules
        (client id -1), or every client's own when they are not averaged. The server part is a snapshot: evaluation
        runs while the S-server already trains on the next round's uploads."""
        return self.make_evaluation(copy.deepcopy(s.model), modules[(Kind.CLIENT_MODEL, -1)])

    # ================================================================== hooks: F-server side
    def aggregate(self, kind: Kind, packed: list[torch.Tensor], template: nn.Module) -> torch.Tensor:
        """FedAvg weighted by n_i / n over the whole state_dict, clients in id order."""
        weights = [self.world.num_samples(cid) for cid in range(self.world.num_clients)]
        return fedavg(packed, weights, template.state_dict())

    def fserver_state(self) -> dict:
        """What the method itself keeps on the F-server (nested dicts of tensors), saved in the F-server's part of
        every checkpoint under `algorithm/` (default: nothing)."""
        return {}

    def load_fserver_state(self, flat: dict[str, torch.Tensor], prefix: str) -> None:
        """Restores `fserver_state` on resume from the checkpoint's flat `prefix/...` tensors."""

    def describe(self) -> dict:
        """Facts about this run's algorithm for the metrics file."""
        return {"algorithm": self.name, "schedule": self.schedule,
                "server_order": "canonical" if self.cfg.runtime.deterministic else "arrival"}

    # ================================================================== building blocks (not hooks)
    def train_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss every training step minimises (mean over scored targets)."""
        return task_loss(logits, y, label_smoothing=self.label_smoothing)

    def new_client(self, cid: int, model: nn.Module, optimizer: torch.optim.Optimizer, **parts) -> ClientState:
        """A client with its shard of this rank's data and its own random stream."""
        rows = torch.from_numpy(self.world.local_index[cid])
        return self.client_state(cid, self.world.data.train_x[rows], self.world.data.train_y[rows], model, optimizer,
                                 self.world.generator("client", cid), **parts)

    def store(self, ids, make, *, in_use: int = 2, **kwargs) -> ClientStore:
        """A store of per-client state (mpisage/runtime/client_store.py) laid out by the config's client_store;
        `in_use`: how many clients are typically used at once (the slots when the config does not say)."""
        cs = self.cfg.client_store
        kwargs.setdefault("device", self.world.device)
        return ClientStore(ids, make, slots=cs.slots or max(2, in_use), backend=cs.backend, directory=cs.directory,
                           **kwargs)

    def server_slots(self) -> int:
        """Live per-client states on the S-server: client_store.slots, else one per client rank (each client rank
        trains one client at a time, so about that many are in use at once), at least 2."""
        return self.cfg.client_store.slots or max(2, self.world.num_client_ranks)

    def server_store(self, make) -> ClientStore:
        """The S-server's per-client state, `server_slots()` of them live."""
        return self.store(range(self.world.num_clients), make, in_use=self.server_slots())

    def client_store(self, cids) -> ClientStore:
        """This rank's hosted clients, idle ones packed: they differ at the start only in their data and random
        stream; checkpoint keys `client<id>`."""
        return self.store(cids, self.make_client, key=lambda cid: f"client{cid}",
                          fresh=lambda cid: {"generator": self.world.generator("client", cid).get_state()},
                          bind=self._bind_client)

    def _bind_client(self, c: ClientState, cid: int) -> None:
        rows = torch.from_numpy(self.world.local_index[cid])
        c.cid, c.x, c.y = cid, self.world.data.train_x[rows], self.world.data.train_y[rows]

    def server_state(self, cls: type[ServerState], **fields) -> ServerState:
        """A fresh S-server state of class `cls`: the initial server part, its optimiser, and `fields`."""
        server = self.world.initial_part("server")
        return cls(model=server, optimizer=make_optimizer(server.parameters(), self.cfg),
                   train_stats=np.zeros((self.world.num_clients, 3)), **fields)

    def returned_gradient_step(self, c: ClientState, link: ClientLink, k: int, x: torch.Tensor,
                               y: torch.Tensor) -> None:
        """Split learning's local iteration: forward, upload (z, y), step on the cut-layer gradient that comes
        back (the loss is measured on the S-server)."""
        c.model.train()
        z = c.model(x)
        link.upload(z, y, seq=k)
        grad = link.receive(Kind.GRADIENT, seq=k, shape=tuple(z.shape), dtype=z.dtype)
        c.optimizer.zero_grad(set_to_none=True)
        z.backward(grad)
        optimizer_step(c.optimizer, self.cfg)

    def local_step(self, c: ClientState, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """One step of the client's optimiser on the mean cross-entropy of logits it computed itself."""
        loss = self.train_loss(logits, y)
        c.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(c.optimizer, self.cfg)
        return loss.item() * count_scored(y), count_correct(logits, y)

    def server_step(self, s: ServerState, cid: int, z: torch.Tensor, y: torch.Tensor, *, model: nn.Module = None,
                    optimizer: torch.optim.Optimizer = None, return_grad: bool = False) -> torch.Tensor | None:
        """One optimiser step of the server model (default: the S-server's) on (z, y); with return_grad, the
        gradient of the mean loss with respect to z, for the client to back-propagate."""
        model, optimizer = model or s.model, optimizer or s.optimizer
        model.train()
        optimizer.zero_grad(set_to_none=True)
        if return_grad:
            z = z.detach().requires_grad_(True)
        logits = model(z)
        loss = self.train_loss(logits, y)
        loss.backward()
        optimizer_step(optimizer, self.cfg)
        s.train_stats[cid] += (loss.item() * count_scored(y), count_correct(logits, y), count_scored(y))
        return z.grad if return_grad else None

    def make_evaluation(self, server: nn.Module, client: nn.Module) -> Evaluation:
        return Evaluation(server, client, self.world.data, self.cfg.eval.batch_size, self.world.device,
                          self.cfg.eval.samples)
