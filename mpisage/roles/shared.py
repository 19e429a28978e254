"""The shared parts of a split, as the role loops move them: what a client sends the F-server after a round, the
templates the F-server unpacks and averages into, and what the S-server receives to evaluate."""
from __future__ import annotations

import copy
import os

import torch.nn as nn

from mpisage.algorithms.base import PART_KINDS, Algorithm, ClientState
from mpisage.config import to_yaml
from mpisage.runtime.environment import environment
from mpisage.runtime.metrics import MetricsFile
from mpisage.runtime.transport import Kind


def shared_modules(algo: Algorithm, c: ClientState) -> dict[Kind, nn.Module]:
    """The client's modules that go to the F-server each round (and come back averaged)."""
    held = {"client": c.model, "server": c.server, "aux": c.aux}
    return {PART_KINDS[part]: held[part] for part in algo.shared_parts}


def shared_templates(algo: Algorithm) -> dict[Kind, nn.Module]:
    """Modules laid out like `shared_modules`, with the common initial weights."""
    split = algo.world.build_model(algo.shared_parts)
    return {PART_KINDS[part]: getattr(split, part) for part in algo.shared_parts}


def carrier(algo: Algorithm, kind: Kind) -> Kind:
    """The message kind a shared module travels as between client and F-server: its own when it is averaged (paper
    traffic), EVAL when it goes there only to be evaluated (wire-only)."""
    return kind if algo.averages_shared else Kind.EVAL


def eval_keys(algo: Algorithm, kinds) -> list[tuple[Kind, int]]:
    """What the F-server sends the S-server for each evaluation, as (kind, client id): the averaged modules
    (client id -1), or every client's own modules when they are never averaged."""
    if algo.averages_shared:
        return [(kind, -1) for kind in kinds]
    return [(kind, cid) for cid in range(algo.world.num_clients) for kind in kinds]


def eval_templates(algo: Algorithm) -> dict[tuple[Kind, int], nn.Module]:
    """A module to receive each of `eval_keys` into."""
    templates = shared_templates(algo)
    return {(kind, cid): templates[kind] if cid < 0 else copy.deepcopy(templates[kind])
            for kind, cid in eval_keys(algo, templates)}


def open_metrics(algo: Algorithm, history: dict | None) -> MetricsFile:
    """Rank 0's metrics file for this run: the config, environment and algorithm as attributes, the partition and
    the test-set size as datasets; a resumed run starts from the rounds saved in its checkpoint (`history`), so it
    has no gap and no repeat."""
    world, cfg = algo.world, algo.cfg
    os.makedirs(cfg.run_dir, exist_ok=True)
    metrics = MetricsFile(os.path.join(cfg.run_dir, "metrics.h5"), {
        "config": to_yaml(cfg), "environment": environment(world.transport.comm, transport=world.transport),
        "algorithm": algo.describe(), "kinds": [k.name.lower() for k in Kind],
        "roles": ["fserver", "sserver", "client"]}, history=history)
    metrics.set("label_histograms", world.histograms)
    metrics.set("client_samples", [world.num_samples(c) for c in range(world.num_clients)])
    metrics.set("test_samples", world.test_samples)     # how many test images each accuracy is measured on
    return metrics
