"""Evaluation of a global model on the test set, one batch at a time, so the S-server can interleave it with the
uploads it serves."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from mpisage.algorithms.training import count_correct, count_scored, task_loss
from mpisage.data import eval_transform


class Evaluation:
    """Global model = server(client(x)), BN in eval mode, on the whole test set (or its first `samples`), one batch
    per `step()`. `result()` -> (mean loss, accuracy, seconds spent), both per scored target (per image, or per
    completion token for language models; no label smoothing)."""

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
