"""GAS (Yang & Liu, AAAI 2025): asynchronous split federated learning with generative activations.

Clients run at their own pace (the asynchronous role loops are in mpisage/roles/asynchronous.py). For every activation
the S-server answers at once with the gradient of the logit-adjusted loss CE(s + log P_k(y), y) through its
CURRENT model, and keeps the activation, weighted by how late in training it came. When Q_s batches are buffered
it folds them into per-label activation statistics, tops every label up to B samples with activations drawn from
N(mu_y, Sigma_y) (`generative=false`: no top-up, the ablation), steps on real + generated activations with plain
CE, and empties the buffer. The F-server averages every Q_c client models that come back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mpisage.algorithms.asynchronous import AsyncAlgorithm
from mpisage.algorithms.base import ServerState
from mpisage.algorithms.training import optimizer_step
from mpisage.runtime.stateful import transient


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
class GasServer(ServerState):
    generator: torch.Generator = None      # generated activations
    steps: int = 0                         # server steps taken
    generated: int = 0                     # activations generated so far
    # (z, y, weight) batches waiting for the next server step; label -> running statistics (checkpointed below)
    buffer: list[tuple[torch.Tensor, torch.Tensor, float]] = transient(default_factory=list)
    statistics: dict[int, LabelStatistics] = transient(default_factory=dict)

    def state_dict(self) -> dict:
        buffer = self.buffer
        return {**super().state_dict(),
                "statistics": {str(label): {"weight": torch.tensor([st.weight], dtype=torch.float64),
                                            "mean": st.mean, "scatter": st.scatter}
                               for label, st in self.statistics.items()},
                # the activations waiting for the next server step, as one array each
                "buffer": {"z": torch.cat([b[0] for b in buffer]) if buffer else torch.zeros(0),
                           "y": torch.cat([b[1] for b in buffer]) if buffer else torch.zeros(0, dtype=torch.int64),
                           "weight": torch.tensor([b[2] for b in buffer], dtype=torch.float64),
                           "sizes": torch.tensor([len(b[1]) for b in buffer], dtype=torch.int64)}}

    def load_state_dict(self, flat: dict[str, torch.Tensor], prefix: str, device=None) -> None:
        super().load_state_dict(flat, prefix, device)
        sizes = flat[f"{prefix}/buffer/sizes"].tolist()
        parts = zip(flat[f"{prefix}/buffer/z"].split(sizes), flat[f"{prefix}/buffer/y"].split(sizes),
                    flat[f"{prefix}/buffer/weight"].tolist())
        self.buffer = [(z.to(device or "cpu"), y.to(device or "cpu"), w) for z, y, w in parts]
        self.statistics = {}
        head = f"{prefix}/statistics/"
        for label in sorted({int(k[len(head):].split("/")[0]) for k in flat if k.startswith(head)}):
            key = f"{head}{label}"
            self.statistics[label] = LabelStatistics(float(flat[f"{key}/weight"][0]), flat[f"{key}/mean"],
                                                     flat[f"{key}/scatter"])


class Gas(AsyncAlgorithm):
    name = "gas"
    RIDGE = 1e-4

    def __init__(self, world):
        super().__init__(world)
        self.server_buffer = self.cfg.server_buffer or self.active       # Q_s
        # log P_k(y) for the logit adjustment, from the label histograms every rank computed at start-up
        freq = world.histograms / world.histograms.sum(1, keepdims=True)
        self.log_prior = torch.log(torch.from_numpy(freq).float().clamp_min(1e-12)).to(world.device)

    # ------------------------------------------------------------------ S-server
    def make_server(self) -> GasServer:
        return self.server_state(GasServer, generator=self.world.generator("server"))

    def on_activation(self, s: GasServer, cid: int, progress: int, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The logit-adjusted gradient through the current server model (no step); buffers the activation with
        weight s(n) = n, n = the client's progress in local iterations (newer activations weigh more)."""
        z_leaf = z.detach().requires_grad_(True)
        s.model.train()
        logits = s.model(z_leaf)
        loss = F.cross_entropy(logits + self.log_prior[cid], y)
        (grad,) = torch.autograd.grad(loss, z_leaf)
        s.train_stats[cid] += (loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y))
        s.buffer.append((z.detach(), y, float(progress)))
        if len(s.buffer) >= self.server_buffer:
            self.server_update(s)
        return grad

    def server_batch(self, s: GasServer) -> tuple[torch.Tensor, torch.Tensor]:
        """Folds the buffer into the statistics and returns the server batch: every real activation, plus (when
        generative and every label seen so far has statistics) generated ones topping each label up to B."""
        buffer = s.buffer
        z = torch.cat([b[0] for b in buffer])
        y = torch.cat([b[1] for b in buffer])
        w = torch.cat([torch.full((len(b[1]),), b[2], device=z.device) for b in buffer])
        if not self.cfg.generative:
            return z, y
        stats = s.statistics
        merge_statistics(stats, z.flatten(1).cpu(), y.cpu(), w.cpu(), diagonal=self.cfg.covariance == "diag")
        counts = {label: int((y == label).sum()) for label in range(self.world.data.num_classes)}
        extra_z, extra_y = [], []
        for label, need in top_up(counts, self.cfg.batch_size).items():
            if need and label in stats:
                draws = stats[label].sample(need, self.RIDGE, s.generator)
                extra_z.append(draws.to(z.dtype).to(z.device).view(need, *z.shape[1:]))
                extra_y.append(torch.full((need,), label, dtype=y.dtype, device=y.device))
        s.generated += sum(len(e) for e in extra_y)
        return torch.cat([z, *extra_z]), torch.cat([y, *extra_y])

    def server_update(self, s: GasServer) -> None:
        z, y = self.server_batch(s)
        s.buffer = []
        s.model.train()
        s.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(s.model(z), y).backward()
        optimizer_step(s.optimizer, self.cfg)
        s.steps += 1

    def describe(self) -> dict:
        return {**super().describe(), "server_buffer": self.server_buffer, "generative": self.cfg.generative,
                "covariance": self.cfg.covariance}
