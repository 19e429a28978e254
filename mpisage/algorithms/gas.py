"""GAS (Yang & Liu, AAAI 2025): asynchronous split federated learning with generative activations.

Clients run at their own pace (the asynchronous role loops are in mpisage/roles/asynchronous.py). For every activation
the S-server answers at once with the gradient of the logit-adjusted loss CE(s + log P_k(y), y) through its
CURRENT model, and keeps the activation, weighted by how late in training it came. When Q_s batches are buffered
it folds them into per-label activation statistics, tops every label up to B samples with activations drawn from
N(mu_y, Sigma_y) (`generative=false`: no top-up, the ablation), steps on real + generated activations with plain
CE, and empties the buffer. The F-server averages every Q_c client models that come back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpisage.algorithms.base import Algorithm, ClientState, ServerState, optimizer_step
from mpisage.config import ConfigError
from mpisage.models import state_bytes
from mpisage.runtime.state import fedavg
from mpisage.runtime.world import derive_seed


@dataclass
class LabelStatistics:
    """Weighted activation statistics of one label: total weight W, mean mu and scatter S = sum w (x-mu)(x-mu)^T
    (only its diagonal when diagonal). Merging two sets with the pooled formula gives exactly the statistics of
    their union."""
    weight: float
    mean: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, w: torch.Tensor, diagonal: bool) -> "LabelStatistics":
        x, w = x.double(), w.double()
        total = w.sum()
        mean = (w[:, None] * x).sum(0) / total
        centred = x - mean
        scatter = (w[:, None] * centred * centred).sum(0) if diagonal else (w[:, None] * centred).T @ centred
        return cls(float(total), mean, scatter)

    def merge(self, other: "LabelStatistics") -> "LabelStatistics":
        total = self.weight + other.weight
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.weight / total)
        cross = self.weight * other.weight / total
        extra = cross * delta * delta if self.scatter.dim() == 1 else cross * torch.outer(delta, delta)
        return LabelStatistics(total, mean, self.scatter + other.scatter + extra)

    def sample(self, n: int, ridge: float, generator: torch.Generator) -> torch.Tensor:
        """n draws from N(mean, scatter / weight + ridge I) (the ridge keeps the covariance positive definite)."""
        noise = torch.randn(n, self.mean.numel(), generator=generator, dtype=torch.float64)
        cov = self.scatter / self.weight
        if cov.dim() == 1:
            return self.mean + noise * (cov + ridge).sqrt()
        chol = torch.linalg.cholesky(cov + ridge * torch.eye(len(cov), dtype=cov.dtype))
        return self.mean + noise @ chol.T


def merge_statistics(running: dict[int, LabelStatistics], z: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                     diagonal: bool) -> None:
    """Folds a buffer of flattened activations z [n, D] with labels y and weights w into `running`."""
    for label in torch.unique(y).tolist():
        rows = y == label
        batch = LabelStatistics.of(z[rows], w[rows], diagonal)
        running[label] = running[label].merge(batch) if label in running else batch


def top_up(counts: dict[int, int], batch_size: int) -> dict[int, int]:
    """GAS's degree of bias: how many generated samples each label needs to reach B in the server batch."""
    return {label: max(0, batch_size - n) for label, n in counts.items()}


@dataclass
class ClientProfile:
    """The straggler model of gas_sglr.md: compute speed c (FLOP/s) and uplink rate R (bit/s) of one client."""
    flops: float
    uplink: float

    def iteration_seconds(self, client_macs: float, batch_size: int, activation_bits: float) -> float:
        return 2 * client_macs * batch_size / self.flops + activation_bits / self.uplink

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


class Gas(Algorithm):
    name = "gas"
    asynchronous = True
    RIDGE = 1e-4

    def __init__(self, world):
        super().__init__(world)
        if world.is_token_task:
            raise ConfigError(f"gas is defined for image classification; {world.data.name} is a language-modelling "
                              f"dataset (use fsl_sage or a baseline)")
        cfg, m = self.cfg, world.num_clients
        self.active = min(cfg.active_clients or m, m)
        self.server_buffer = cfg.server_buffer or self.active
        self.model_buffer = cfg.model_buffer or self.active
        # log P_k(y) for the logit adjustment, from the label histograms every rank computed at start-up
        freq = world.histograms / world.histograms.sum(1, keepdims=True)
        self.log_prior = torch.log(torch.from_numpy(freq).float().clamp_min(1e-12)).to(world.device)
        # the simulated clock
        data, client = world.data, world.initial_part("client")
        example = torch.zeros(1, data.in_channels, data.image_size, data.image_size, device=world.device)
        self.client_macs = count_macs(client, example)
        self.activation_bits = 32.0 * cfg.batch_size * math.prod(self.activation_shape)
        self.model_bits = 8.0 * state_bytes(client)
        self.profiles = client_profiles(m, derive_seed(cfg.seed, "init", 2))
        per_iter = [p.iteration_seconds(self.client_macs, cfg.batch_size, self.activation_bits) for p in self.profiles]
        self.iteration_seconds = per_iter
        self.slowness = [s / max(per_iter) for s in per_iter]     # 1 = the slowest client

    def participation_seconds(self, cid: int) -> float:
        """Simulated time of one participation: E iterations plus the model upload."""
        return self.cfg.local_iters * self.iteration_seconds[cid] + self.profiles[cid].model_seconds(self.model_bits)

    # ------------------------------------------------------------------ client
    def client_iteration(self, c: ClientState, link, k: int, x, y) -> None:
        """One local step on the gradient the S-server returns (its loss is measured there)."""
        self.returned_gradient_step(c, link, k, x, y)

    # ------------------------------------------------------------------ S-server
    def make_server(self) -> ServerState:
        s = super().make_server()
        s.extra.update(buffer=[], statistics={}, generator=self.world.generator("server"), steps=0, generated=0)
        return s

    def on_activation(self, s: ServerState, cid: int, progress: int, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The logit-adjusted gradient through the current server model (no step); buffers the activation with
        weight s(n) = n, n = the client's progress in local iterations (newer activations weigh more)."""
        z_leaf = z.detach().requires_grad_(True)
        s.model.train()
        logits = s.model(z_leaf)
        loss = F.cross_entropy(logits + self.log_prior[cid], y)
        (grad,) = torch.autograd.grad(loss, z_leaf)
        s.train_stats[cid] += (loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y))
        s.extra["buffer"].append((z.detach(), y, float(progress)))
        if len(s.extra["buffer"]) >= self.server_buffer:
            self.server_update(s)
        return grad

    def server_batch(self, s: ServerState) -> tuple[torch.Tensor, torch.Tensor]:
        """Folds the buffer into the statistics and returns the server batch: every real activation, plus (when
        generative and every label seen so far has statistics) generated ones topping each label up to B."""
        buffer = s.extra["buffer"]
        z = torch.cat([b[0] for b in buffer])
        y = torch.cat([b[1] for b in buffer])
        w = torch.cat([torch.full((len(b[1]),), b[2], device=z.device) for b in buffer])
        if not self.cfg.generative:
            return z, y
        stats = s.extra["statistics"]
        merge_statistics(stats, z.flatten(1).cpu(), y.cpu(), w.cpu(), diagonal=self.cfg.covariance == "diag")
        counts = {label: int((y == label).sum()) for label in range(self.world.data.num_classes)}
        extra_z, extra_y = [], []
        for label, need in top_up(counts, self.cfg.batch_size).items():
            if need and label in stats:
                draws = stats[label].sample(need, self.RIDGE, s.extra["generator"])
                extra_z.append(draws.to(z.dtype).to(z.device).view(need, *z.shape[1:]))
                extra_y.append(torch.full((need,), label, dtype=y.dtype, device=y.device))
        s.extra["generated"] += sum(len(e) for e in extra_y)
        return torch.cat([z, *extra_z]), torch.cat([y, *extra_y])

    def server_update(self, s: ServerState) -> None:
        z, y = self.server_batch(s)
        s.extra["buffer"] = []
        s.model.train()
        s.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(s.model(z), y).backward()
        optimizer_step(s.optimizer, self.cfg)
        s.extra["steps"] += 1

    def server_checkpoint(self, s: ServerState) -> dict:
        stats, buffer = s.extra["statistics"], s.extra["buffer"]
        return {**super().server_checkpoint(s), "generator": s.extra["generator"].get_state(),
                "counts": torch.tensor([s.extra["steps"], s.extra["generated"]], dtype=torch.int64),
                "statistics": {str(label): {"weight": torch.tensor([st.weight], dtype=torch.float64),
                                            "mean": st.mean, "scatter": st.scatter} for label, st in stats.items()},
                # the activations waiting for the next server step, as one array each
                "buffer": {"z": torch.cat([b[0] for b in buffer]) if buffer else torch.zeros(0),
                           "y": torch.cat([b[1] for b in buffer]) if buffer else torch.zeros(0, dtype=torch.int64),
                           "weight": torch.tensor([b[2] for b in buffer], dtype=torch.float64),
                           "sizes": torch.tensor([len(b[1]) for b in buffer], dtype=torch.int64)}}

    def restore_server(self, s: ServerState, flat, prefix: str) -> None:
        super().restore_server(s, flat, prefix)
        s.extra["generator"].set_state(flat[f"{prefix}/generator"])
        s.extra["steps"], s.extra["generated"] = (int(v) for v in flat[f"{prefix}/counts"])
        sizes = flat[f"{prefix}/buffer/sizes"].tolist()
        parts = zip(flat[f"{prefix}/buffer/z"].split(sizes), flat[f"{prefix}/buffer/y"].split(sizes),
                    flat[f"{prefix}/buffer/weight"].tolist())
        s.extra["buffer"] = [(z.to(self.world.device), y.to(self.world.device), w) for z, y, w in parts]
        for label in range(self.world.data.num_classes):
            key = f"{prefix}/statistics/{label}"
            if f"{key}/weight" in flat:
                s.extra["statistics"][label] = LabelStatistics(float(flat[f"{key}/weight"][0]), flat[f"{key}/mean"],
                                                               flat[f"{key}/scatter"])

    # ------------------------------------------------------------------ F-server
    def average_models(self, packed: list[torch.Tensor], cids: list[int], template: nn.Module) -> torch.Tensor:
        weights = [self.world.num_samples(c) if self.cfg.model_weighting == "samples" else 1.0 for c in cids]
        return fedavg(packed, weights, template.state_dict())

    def describe(self) -> dict:
        return {**super().describe(), "active_clients": self.active, "server_buffer": self.server_buffer,
                "model_buffer": self.model_buffer, "generative": self.cfg.generative,
                "covariance": self.cfg.covariance, "client_macs_per_sample": self.client_macs}
