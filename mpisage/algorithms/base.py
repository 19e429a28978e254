"""The hooks an algorithm fills in. The role loops (client.py, sserver.py, fserver.py) call them; an algorithm
file holds only what makes the method different.

Client side   make_client, client_step (or client_send + client_finish for lockstep methods), shared_modules
              (what the F-server averages)
S-server side make_server, expected_uploads, on_upload (replies to the uploading client, or to any client),
              end_server_round, evaluation
F-server side aggregate (FedAvg of each shared module by default)
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpisage.runtime.checkpoint import restore_module, restore_optimizer
from mpisage.data import eval_transform
from mpisage.runtime.state import fedavg
from mpisage.runtime.transport import S_SERVER, Kind, Transport
from mpisage.runtime.world import World


IGNORE_INDEX = -100     # a target that is not scored (language models: prompt and padding positions)


def task_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean",
              label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over every scored target: images (logits [B, C], labels [B]) and tokens (logits [B, T, V],
    targets [B, T], IGNORE_INDEX where unscored) alike."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction,
                           label_smoothing=label_smoothing)


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    return ((logits.argmax(-1) == y) & (y != IGNORE_INDEX)).sum().item()


def count_scored(y: torch.Tensor) -> int:
    return (y != IGNORE_INDEX).sum().item()


@dataclass
class ClientState:
    """One virtual client: its data, its models and optimisers, its random stream."""
    cid: int
    x: torch.Tensor                 # uint8 [n, C, H, W]
    y: torch.Tensor                 # int64 [n]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator      # batch order and augmentation
    aux: nn.Module | None = None
    aux_optimizer: torch.optim.Optimizer | None = None
    server: nn.Module | None = None        # a client-held copy of the server part (FedAvg trains the whole model)


@dataclass
class ServerState:
    """Everything the S-server holds (algorithms add entries to `extra`)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_stats: np.ndarray          # [num_clients, 3] loss sum, correct, samples of this round's server steps
    extra: dict = field(default_factory=dict)


class Evaluation:
    """Global model = server(client(x)), BN in eval mode, on the whole test set, one batch per `step()` so the
    S-server can interleave it with uploads. `result()` -> (mean loss, accuracy, seconds spent), both per scored
    target (per image, or per completion token for language models; no label smoothing)."""

    def __init__(self, server: nn.Module, client: nn.Module, data, batch_size: int, device,
                 samples: int | None = None):
        self.server, self.client = server.eval(), client.eval()
        self.data, self.batch_size, self.device = data, batch_size, device
        self.samples = len(data.test_y) if samples is None else min(samples, len(data.test_y))
        self.transform = eval_transform(data)
        self.position, self.loss_sum, self.correct, self.scored, self.seconds = 0, 0.0, 0, 0, 0.0

    @property
    def done(self) -> bool:
        return self.position >= self.samples

    @torch.no_grad()
    def step(self) -> None:
        start = time.perf_counter()
        end = min(self.position + self.batch_size, self.samples)
        x = self.transform(self.data.test_x[self.position:end].to(self.device))
        y = self.data.test_y[self.position:end].to(self.device)
        logits = self.server(self.client(x))
        self.loss_sum += task_loss(logits, y, reduction="sum").item()
        self.correct += count_correct(logits, y)
        self.scored += count_scored(y)
        self.position = end
        self.seconds += time.perf_counter() - start

    def result(self) -> tuple[float, float, float]:
        while not self.done:
            self.step()
        return self.loss_sum / self.scored, self.correct / self.scored, self.seconds


class MeanEvaluation:
    """Several global models evaluated one after the other, reported as the mean loss and accuracy (SGLR: every
    client's own model with the shared server)."""

    def __init__(self, evaluations: list[Evaluation]):
        self.evaluations = evaluations

    @property
    def done(self) -> bool:
        return all(e.done for e in self.evaluations)

    def step(self) -> None:
        next(e for e in self.evaluations if not e.done).step()

    def result(self) -> tuple[float, float, float]:
        results = np.array([e.result() for e in self.evaluations])
        return float(results[:, 0].mean()), float(results[:, 1].mean()), float(results[:, 2].sum())


class ClientLink:
    """A client's view of its S-server for one round: uploads and the replies addressed to it."""

    def __init__(self, transport: Transport, cid: int, round: int):
        self.transport, self.cid, self.round = transport, cid, round

    def upload(self, z: torch.Tensor, y: torch.Tensor, seq: int) -> None:
        self.transport.send(S_SERVER, Kind.ACTIVATION, z, round=self.round, client=self.cid, seq=seq)
        self.transport.send(S_SERVER, Kind.LABELS, y, round=self.round, client=self.cid, seq=seq)

    def receive(self, kind: Kind, seq: int | None = None, **expect) -> torch.Tensor:
        return self.transport.recv(kind, S_SERVER, round=self.round, client=self.cid, seq=seq, **expect).tensor


def make_optimizer(params, cfg, lr: float | None = None, weight_decay: float | None = None) -> torch.optim.Optimizer:
    """The configured optimiser: Adam (betas 0.9/0.999, weight decay as L2; the FSL-SAGE paper), AdamW, or SGD
    with momentum (GAS)."""
    params = [p for p in params if p.requires_grad]     # frozen weights (GPT-2 under LoRA) never step
    lr = cfg.lr if lr is None else lr
    weight_decay = cfg.weight_decay if weight_decay is None else weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def optimizer_step(optimizer: torch.optim.Optimizer, cfg) -> None:
    """One step, after clipping the gradient norm of the optimiser's parameters when grad_clip > 0."""
    if cfg.grad_clip > 0:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()


# The parts of a split model, by the message kind that carries them.
PART_KINDS = {"client": Kind.CLIENT_MODEL, "server": Kind.SERVER_MODEL, "aux": Kind.AUX_MODEL}


class Algorithm:
    name = "base"
    # The parts of the split each client sends the F-server after a round and gets back averaged.
    shared_parts: tuple[str, ...] = ("client",)
    # Sequential methods (vanilla split learning) train one client at a time and hand the shared modules on
    # through the F-server instead of averaging them.
    sequential = False
    # False: the shared parts are never averaged; they go to the F-server (as EVAL traffic, outside the paper
    # figure) only so the S-server can evaluate them (SGLR).
    averaged = True
    # Lockstep methods need every client's k-th batch before the S-server answers any (SGLR): a client rank runs
    # its clients one iteration at a time, all together, with client_send + client_finish instead of client_step.
    lockstep = False
    # Asynchronous methods (GAS) run the loops of mpisage/roles/asynchronous.py: no rounds, clients at their own pace.
    asynchronous = False

    def __init__(self, world: World):
        self.world = world
        self.cfg = world.cfg
        client = world.initial_part("client").eval()
        with torch.no_grad():
            self.activation_shape = tuple(client(world.example_input(2)).shape[1:])
        # language models train on label-smoothed token cross-entropy (the paper: 0.1); images on plain CE
        self.label_smoothing = self.cfg.lm.label_smoothing if world.is_token_task else 0.0

    def train_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss every training step minimises (mean over scored targets)."""
        return task_loss(logits, y, label_smoothing=self.label_smoothing)

    # ------------------------------------------------------------------ client side
    def make_client(self, cid: int) -> ClientState:
        split = self.world.build_model()
        return self.new_client(cid, split.client, make_optimizer(split.client.parameters(), self.cfg), aux=split.aux)

    def new_client(self, cid: int, model: nn.Module, optimizer: torch.optim.Optimizer, **parts) -> ClientState:
        """A client with its shard of this rank's data and its own random stream."""
        rows = torch.from_numpy(self.world.local_index[cid])
        return ClientState(cid, self.world.data.train_x[rows], self.world.data.train_y[rows], model, optimizer,
                           self.world.generator("client", cid), **parts)

    def client_step(self, c: ClientState, link: ClientLink, k: int, x: torch.Tensor,
                    y: torch.Tensor) -> tuple[float, int] | None:
        """One local iteration on batch (x, y); returns (summed loss, correct predictions) of the loss the client
        itself computed, or None when only the server sees the loss (split learning with returned gradients)."""
        raise NotImplementedError

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

    def client_send(self, c: ClientState, link: ClientLink, k: int, x: torch.Tensor, y: torch.Tensor):
        """Lockstep methods: the first half of a local iteration (forward, upload); returns what client_finish
        needs."""
        raise NotImplementedError

    def client_finish(self, c: ClientState, link: ClientLink, k: int, sent) -> tuple[float, int] | None:
        """Lockstep methods: the second half (the reply, backward, step); returns as client_step does."""
        raise NotImplementedError

    def scheduled_lr(self, base_lr: float, round: int) -> float:
        """lr_decay_at: every rate x0.1 from that fraction of the rounds on (SGLR: 0.8)."""
        decay_at = self.cfg.lr_decay_at
        return base_lr * (0.1 if decay_at is not None and round >= decay_at * self.cfg.rounds else 1.0)

    def apply_schedule(self, optimizer: torch.optim.Optimizer, base_lr: float, round: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.scheduled_lr(base_lr, round)

    def client_checkpoint(self, c: ClientState) -> dict:
        """Everything a client must keep to continue exactly."""
        state = {"model": c.model.state_dict(), "optimizer": c.optimizer.state_dict(),
                 "generator": c.generator.get_state()}
        if c.aux is not None:
            state["aux"] = c.aux.state_dict()
        if c.aux_optimizer is not None:
            state["aux_optimizer"] = c.aux_optimizer.state_dict()
        if c.server is not None:
            state["server"] = c.server.state_dict()
        return state

    def restore_client(self, c: ClientState, flat: dict[str, torch.Tensor], prefix: str) -> None:
        """The inverse of client_checkpoint."""
        restore_module(c.model, flat, f"{prefix}/model")
        restore_optimizer(c.optimizer, flat, f"{prefix}/optimizer")
        c.generator.set_state(flat[f"{prefix}/generator"])
        for name in ("aux", "server"):
            if getattr(c, name) is not None:
                restore_module(getattr(c, name), flat, f"{prefix}/{name}")
        if c.aux_optimizer is not None:
            restore_optimizer(c.aux_optimizer, flat, f"{prefix}/aux_optimizer")

    def local_step(self, c: ClientState, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """One step of the client's optimiser on the mean cross-entropy of logits it computed itself."""
        loss = self.train_loss(logits, y)
        c.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(c.optimizer, self.cfg)
        return loss.item() * count_scored(y), count_correct(logits, y)

    def shared_modules(self, c: ClientState) -> dict[Kind, nn.Module]:
        """The client's modules that go to the F-server each round and come back averaged."""
        held = {"client": c.model, "server": c.server, "aux": c.aux}
        return {PART_KINDS[part]: held[part] for part in self.shared_parts}

    def shared_templates(self) -> dict[Kind, nn.Module]:
        """Modules laid out like `shared_modules` (with the common initial weights), for the F-server to unpack and
        average and for the S-server to evaluate."""
        split = self.world.build_model()
        return {PART_KINDS[part]: getattr(split, part) for part in self.shared_parts}

    def carrier(self, kind: Kind) -> Kind:
        """The message kind a shared module travels as between client and F-server."""
        return kind if self.averaged else Kind.EVAL

    def eval_keys(self, kinds) -> list[tuple[Kind, int]]:
        """What the F-server sends the S-server for each evaluation, as (kind, client id): the averaged modules
        (client id -1), or every client's own modules when they are never averaged."""
        if self.averaged:
            return [(kind, -1) for kind in kinds]
        return [(kind, cid) for cid in range(self.world.num_clients) for kind in kinds]

    def eval_templates(self) -> dict[tuple[Kind, int], nn.Module]:
        """A module to receive each of `eval_keys` into."""
        templates = self.shared_templates()
        return {(kind, cid): templates[kind] if cid < 0 else copy.deepcopy(templates[kind])
                for kind, cid in self.eval_keys(templates)}

    # ------------------------------------------------------------------ S-server side
    def make_server(self) -> ServerState:
        server = self.world.initial_part("server")
        return ServerState(server, make_optimizer(server.parameters(), self.cfg), np.zeros((self.world.num_clients, 3)))

    def expected_uploads(self, cid: int) -> int:
        """How many smashed batches client `cid` sends the S-server in one round."""
        return 0

    def on_upload(self, s: ServerState, round: int, cid: int, seq: int, z: torch.Tensor,
                  y: torch.Tensor) -> list[tuple]:
        """Handles one uploaded smashed batch; returns the replies: (kind, tensor) to the uploading client, or
        (client id, kind, tensor) to any client (sent with the upload's seq)."""
        return []

    def end_server_round(self, s: ServerState, round: int) -> None:
        pass

    def server_checkpoint(self, s: ServerState) -> dict:
        """Everything the S-server must keep to continue exactly (nested dicts of tensors and plain values)."""
        return {"model": s.model.state_dict(), "optimizer": s.optimizer.state_dict()}

    def restore_server(self, s: ServerState, flat: dict[str, torch.Tensor], prefix: str) -> None:
        """The inverse of server_checkpoint."""
        restore_module(s.model, flat, f"{prefix}/model")
        restore_optimizer(s.optimizer, flat, f"{prefix}/optimizer")

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

    def eval_models(self, s: ServerState, shared: dict[Kind, nn.Module]) -> tuple[nn.Module, nn.Module]:
        """(server, client) modules that make this round's global model, from the S-server's state and the
        averaged shared modules. The server part is a snapshot: evaluation runs while the S-server already trains
        on the next round's uploads."""
        return copy.deepcopy(s.model), shared[Kind.CLIENT_MODEL]

    def evaluation(self, s: ServerState, modules: dict[tuple[Kind, int], nn.Module]) -> "Evaluation":
        """The evaluation of this round's global model; `modules` as laid out by eval_templates."""
        server, client = self.eval_models(s, {kind: module for (kind, _), module in modules.items()})
        return self.make_evaluation(server, client)

    def make_evaluation(self, server: nn.Module, client: nn.Module) -> Evaluation:
        return Evaluation(server, client, self.world.data, self.cfg.eval_batch_size, self.world.device,
                          self.cfg.eval_samples)

    # ------------------------------------------------------------------ F-server side
    def aggregate(self, kind: Kind, packed: list[torch.Tensor], template: nn.Module) -> torch.Tensor:
        """FedAvg weighted by n_i / n over the whole state_dict, clients in id order."""
        weights = [self.world.num_samples(cid) for cid in range(self.world.num_clients)]
        return fedavg(packed, weights, template.state_dict())

    def describe(self) -> dict:
        """Facts about this run's algorithm for the metrics file."""
        return {"algorithm": self.name, "server_order": "canonical" if self.cfg.deterministic else "arrival"}
