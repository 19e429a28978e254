"""The building blocks algorithms train with: the task loss and its counts, the configured optimiser and its step."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mpisage.data.e2e import IGNORE_INDEX     # a target that is not scored (prompt and padding positions)


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


def make_optimizer(params, cfg, lr: float | None = None, weight_decay: float | None = None) -> torch.optim.Optimizer:
    """The configured optimiser: Adam (betas 0.9/0.999, weight decay as L2; the FSL-SAGE paper), AdamW, or SGD
    with momentum (GAS)."""
    params = [p for p in params if p.requires_grad]     # frozen weights (GPT-2 under LoRA) never step
    lr = cfg.optim.lr if lr is None else lr
    weight_decay = cfg.optim.weight_decay if weight_decay is None else weight_decay
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum, weight_decay=weight_decay)
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def optimizer_step(optimizer: torch.optim.Optimizer, cfg) -> None:
    """One step, after clipping the gradient norm of the optimiser's parameters when optim.grad_clip > 0."""
    if cfg.optim.grad_clip > 0:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    optimizer.step()


def scheduled_lr(cfg, base_lr: float, round: int) -> float:
    """optim.lr_decay_at: every rate x0.1 from that fraction of the rounds on (SGLR: 0.8)."""
    decay_at = cfg.optim.lr_decay_at
    return base_lr * (0.1 if decay_at is not None and round >= decay_at * cfg.rounds else 1.0)


def apply_schedule(optimizer: torch.optim.Optimizer, cfg, base_lr: float, round: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = scheduled_lr(cfg, base_lr, round)
