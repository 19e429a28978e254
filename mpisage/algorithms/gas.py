"""GAS (Yang & Liu, AAAI 2025): asynchronous split federated learning with generative activations.

Clients run at their own pace (the asynchronous role loops are in mpisage/roles/asynchronous.py). For every activation
the S-server answers at once with the gradient of the logit-adjusted loss CE(s + log P_k(y), y) through its
CURRENT model, and keeps the activation, weighted by how late in training it came. When Q_s batches are buffered
it folds them into per-label activation statistics, tops every label up to B samples with activations drawn from
N(mu_y, Sigma_y) once every label has statistics (`gas.generative=false`: no top-up, the ablation), steps on real +
generated activations with plain CE, and empties the buffer. The F-server averages every Q_c client models that come back.
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
    (only its diagonal when diagonal), all float64 on the statistics' device. Merging two sets with the pooled
    formula gives exactly the statistics of their union.

    Full covariance, kept so that sampling needs no factorisation per server step. The pooled formula writes the
    scatter as a sum of rank-one terms: S = S_0 + G^T G, where S_0 (`base`) is the scatter at the last
    factorisation and the rows of G (`rows`) are sqrt(w_i) (x_i - batch mean) for every activation folded in since,
    plus sqrt(W_1 W_2 / W) (mu_2 - mu_1) for every merge. With L L^T = S_0 + ridge W_0 I factorised at weight W_0
    (float64 Cholesky, kept in float32), a draw
        x = mu + (L e_1 + G^T e_2) / sqrt(W) + sqrt(ridge (W - W_0) / W) e_3,   e_i ~ N(0, I),
    has covariance (S_0 + ridge W_0 I + G^T G) / W + ridge (W - W_0) / W I = S / W + ridge I: exactly the
    distribution N(mu, S / W + ridge I). The factor is renewed (S_0 <- S, G emptied) only when G has more than D / 2
    rows, i.e. every few hundred server steps, not every step. The rows are added into `base` lazily (when the
    scatter is read or at the next factorisation), each row exactly once."""
    weight: float
    mean: torch.Tensor
    base: torch.Tensor | None                    # S_0 (diagonal: the whole scatter); None: zero
    store: torch.Tensor | None = None            # G's rows are store[:count] (spare capacity after them)
    count: int = 0
    folded: int = 0                              # how many of G's leading rows are already in `base`
    factor: torch.Tensor | None = None           # float32 L with L L^T = S_0 + ridge W_0 I; None: not factorised
    factor_weight: float = 0.0                   # W_0
    restored: bool = False                       # `base` came from a checkpoint: factorise before sampling

    @classmethod
    def of(cls, x: torch.Tensor, w: torch.Tensor, diagonal: bool) -> "LabelStatistics":
        x, w = x.double(), w.double().to(x.device)
        total = w.sum()
        mean = (w[:, None] * x).sum(0) / total
        centred = x - mean
        if diagonal:
            return cls(float(total), mean, (w[:, None] * centred * centred).sum(0))
        rows = w.sqrt()[:, None] * centred
        return cls(float(total), mean, None, rows, len(rows))

    @classmethod
    def from_scatter(cls, weight: float, mean: torch.Tensor, scatter: torch.Tensor) -> "LabelStatistics":
        return cls(weight, mean, scatter, restored=scatter.dim() == 2)

    @property
    def diagonal(self) -> bool:
        return self.base is not None and self.base.dim() == 1

    @property
    def scatter(self) -> torch.Tensor:
        """S itself (adds the rows not yet in `base` into it, once)."""
        if self.diagonal:
            return self.base
        d = self.mean.numel()
        if self.base is None:
            self.base = torch.zeros(d, d, dtype=torch.float64, device=self.mean.device)
        if self.folded < self.count:
            g = self.store[self.folded:self.count]
            self.base.addmm_(g.T, g)
            self.folded = self.count
        return self.base

    @property
    def rows(self) -> torch.Tensor:
        """G [k, D] (a view)."""
        if self.store is None:
            return torch.zeros(0, self.mean.numel(), dtype=torch.float64, device=self.mean.device)
        return self.store[:self.count]

    def merge(self, other: "LabelStatistics") -> "LabelStatistics":
        total = self.weight + other.weight
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.weight / total)
        cross = self.weight * other.weight / total
        if self.diagonal:
            return LabelStatistics(total, mean, self.base + other.base + cross * delta * delta)
        if other.base is not None or other.factor is not None:
            raise ValueError("merge a fresh batch (LabelStatistics.of) into the running statistics, not two running "
                             "ones")
        # appended in place (the running statistics are replaced by the merged ones), into spare capacity
        new = torch.cat([other.rows, (cross ** 0.5 * delta)[None]])
        store, count = self.store, self.count
        if store is None or count + len(new) > len(store):
            # doubling, but no further than the D / 2 rows at which the factor is renewed (memory: D x D / 2 floats)
            need, d = count + len(new), len(delta)
            grown = torch.empty(max(need, min(2 * need, d // 2 + 64)), d, dtype=torch.float64, device=delta.device)
            grown[:count] = self.rows
            store = grown
        store[count:count + len(new)] = new
        return LabelStatistics(total, mean, self.base, store, count + len(new), self.folded, self.factor,
                               self.factor_weight, self.restored)

    def refactor(self, ridge: float) -> None:
        """L L^T = S + ridge W I; G emptied. float64 factorisation, float32 factor (draws need no more)."""
        scatter = self.scatter
        matrix = scatter + ridge * self.weight * torch.eye(len(scatter), dtype=scatter.dtype, device=scatter.device)
        chol, info = torch.linalg.cholesky_ex(matrix)
        if info.item() != 0:
            raise FloatingPointError(f"the activation covariance is not positive definite even with the ridge "
                                     f"(Cholesky failed at column {info.item()}); non-finite activations?")
        self.factor, self.factor_weight = chol.float(), self.weight
        self.count = self.folded = 0
        self.restored = False

    def sample(self, n: int, ridge: float, generator: torch.Generator, max_rows: int | None = None) -> torch.Tensor:
        """n draws (float32) from N(mean, scatter / weight + ridge I); the ridge keeps the covariance positive
        definite. `max_rows`: renew the factor when G has more rows than this (default D / 2)."""
        d, device = self.mean.numel(), self.mean.device
        if self.diagonal:
            noise = torch.randn(n, d, generator=generator, dtype=torch.float64).to(device)
            return (self.mean + noise * (self.base / self.weight + ridge).sqrt()).float()
        # without a factor, G alone is the whole scatter (S_0 = 0), unless the scatter was restored from a checkpoint
        if self.restored or self.count > (max_rows or d // 2):
            self.refactor(ridge)
        k = self.count
        noise = torch.randn(n, 2 * d + k, generator=generator).to(device)
        scale = self.weight ** -0.5
        out = self.mean.float() + noise[:, :d] * (ridge * (self.weight - self.factor_weight) / self.weight) ** 0.5
        if self.factor is not None:
            out.addmm_(noise[:, d:2 * d], self.factor.T, alpha=scale)
        if k:
            out += (noise[:, 2 * d:].double() @ self.rows * scale).float()
        return out


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
            self.statistics[label] = LabelStatistics.from_scatter(
                float(flat[f"{key}/weight"][0]), flat[f"{key}/mean"].to(device or "cpu"),
                flat[f"{key}/scatter"].to(device or "cpu"))


class Gas(AsyncAlgorithm):
    name = "gas"
    RIDGE = 1e-4

    def __init__(self, world):
        super().__init__(world)
        self.server_buffer = self.cfg.gas.server_buffer or self.active       # Q_s
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
        generative and once EVERY label has statistics, as the authors' code) generated ones topping each label up
        to B. The statistics live on the S-server's device."""
        buffer = s.buffer
        z = torch.cat([b[0] for b in buffer])
        y = torch.cat([b[1] for b in buffer])
        w = torch.cat([torch.full((len(b[1]),), b[2], device=z.device) for b in buffer])
        if not self.cfg.gas.generative:
            return z, y
        stats = s.statistics
        merge_statistics(stats, z.flatten(1), y, w, diagonal=self.cfg.gas.covariance == "diag")
        num_classes = self.world.data.num_classes
        if len(stats) < num_classes:
            return z, y
        counts = torch.bincount(y, minlength=num_classes).tolist()
        extra_z, extra_y = [], []
        for label, need in top_up(dict(enumerate(counts)), self.cfg.batch_size).items():
            if need:       # one factor per label that needs a top-up this step, then all its draws at once
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

    def server_report_fields(self) -> dict:
        return {"server_steps": 1, "generated_samples": 1}

    def server_report(self, s: GasServer) -> dict:
        """As of the update each evaluated model completes (with the simulated schedule, the same every run)."""
        return {"server_steps": s.steps, "generated_samples": s.generated}

    def describe(self) -> dict:
        return {**super().describe(), "server_buffer": self.server_buffer, "generative": self.cfg.gas.generative,
                "covariance": self.cfg.gas.covariance}
