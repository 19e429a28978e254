"""The client-rank loop: train each hosted client for a round, send its shared modules to the F-server, load the
averages, repeat until the F-server says stop."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from mpisage.algorithms import Algorithm, ClientLink, ClientState
from mpisage.checkpoint import checkpoint_due, restore_transport, send_checkpoint, transport_state
from mpisage.data import train_transform
from mpisage.environment import resident_bytes
from mpisage.state import load_packed, pack_state, state_nbytes
from mpisage.transport import F_SERVER, Kind

# per-client figures sent to the F-server after each round: local loss sum, correct, samples, seconds
CLIENT_STATS = 4


def train_round(algo: Algorithm, c: ClientState, link: ClientLink, transform) -> np.ndarray:
    """E local epochs over the client's shard (step counter k restarts every round); ragged last batch kept."""
    cfg, dev = algo.cfg, algo.world.device
    start = time.perf_counter()
    loss_sum, correct, seen, k = 0.0, 0, 0, 0
    n = len(c.y)
    for _ in range(cfg.local_epochs):
        order = torch.randperm(n, generator=c.generator)
        for first in range(0, n, cfg.batch_size):
            idx = order[first:first + cfg.batch_size]
            x = transform(c.x[idx].to(dev), c.generator)
            if _inject_nan(c.cid, link.round):
                x = x * float("nan")
            y = c.y[idx].to(dev)
            local = algo.client_step(c, link, k, x, y)
            if local is None:        # the loss lives on the S-server, which checks what it receives
                local = (np.nan, 0)
            elif not np.isfinite(local[0]):
                raise FloatingPointError(f"non-finite training loss on client {c.cid} in round {link.round}, "
                                         f"local step {k}")
            loss_sum, correct, seen, k = loss_sum + local[0], correct + local[1], seen + len(y), k + 1
    return np.array([loss_sum, correct, seen, time.perf_counter() - start])


def _load_from_fserver(algo: Algorithm, c: ClientState, round: int) -> None:
    t = algo.world.transport
    for kind, module in algo.shared_modules(c).items():
        msg = t.recv(kind, F_SERVER, round=round, client=c.cid, nbytes=state_nbytes(module.state_dict()))
        load_packed(module, msg.tensor)


def _inject_fault(rank: int, round: int) -> None:
    """Test hook: MPISAGE_INJECT_FAULT=RANK:ROUND makes that client rank raise at the start of that round."""
    spec = os.environ.get("MPISAGE_INJECT_FAULT")
    if spec and tuple(int(v) for v in spec.split(":")) == (rank, round):
        raise RuntimeError(f"fault injected by MPISAGE_INJECT_FAULT={spec}")


def _inject_nan(cid: int, round: int) -> bool:
    """Test hook: MPISAGE_INJECT_NAN=CLIENT:ROUND feeds that client NaN inputs in that round."""
    spec = os.environ.get("MPISAGE_INJECT_NAN")
    return bool(spec) and tuple(int(v) for v in spec.split(":")) == (cid, round)


def run_client(algo: Algorithm) -> None:
    world, t = algo.world, algo.world.transport
    clients = [algo.make_client(cid) for cid in world.clients_of(world.rank)]
    transform = train_transform(world.data, world.cfg.dataset.augment)
    if world.resume_from:
        flat = world.resume_state(f"rank{world.rank}")
        for c in clients:
            algo.restore_client(c, flat, f"client{c.cid}")
        torch.set_rng_state(flat["torch_rng"])
        restore_transport(t, flat)
    for round in range(world.start_round, world.cfg.rounds):
        _inject_fault(world.rank, round)
        busy = 0.0
        for c in clients:
            if algo.sequential:         # take over the model the previous client trained
                _load_from_fserver(algo, c, round)
            stats = train_round(algo, c, ClientLink(t, c.cid, round), transform)
            busy += stats[3]
            for kind, module in algo.shared_modules(c).items():
                t.send(F_SERVER, kind, pack_state(module.state_dict()), round=round, client=c.cid)
            t.send(F_SERVER, Kind.CONTROL, torch.from_numpy(stats), round=round, client=c.cid)
        t.send_counters(F_SERVER, round=round, extra=np.array([t.wait_seconds, busy, resident_bytes()]))
        if not algo.sequential:         # the averages
            for c in clients:
                _load_from_fserver(algo, c, round)
        stop = t.recv(Kind.CONTROL, F_SERVER, round=round, shape=(1,), dtype=torch.int64).tensor.item()
        if checkpoint_due(world.cfg, round, stop):
            state = {f"client{c.cid}": algo.client_checkpoint(c) for c in clients}
            send_checkpoint(t, {**state, "torch_rng": torch.get_rng_state(), "transport": transport_state(t)}, round)
        if stop:
            break
    t.flush()
