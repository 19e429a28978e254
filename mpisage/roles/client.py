"""The client-rank loop: train each hosted client for a round, send its shared modules to the F-server, load the
averages, repeat until the F-server says stop."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from mpisage.algorithms import Algorithm, ClientState
from mpisage.data import train_transform
from mpisage.roles.shared import carrier, shared_modules
from mpisage.runtime.checkpoint import checkpoint_due, restore_rank_state, send_rank_state
from mpisage.runtime.environment import resident_bytes
from mpisage.runtime.protocol import CLIENT_ROUND, RANK_ROUND, ClientLink, client_round_report, send_report
from mpisage.runtime.state import load_packed, pack_state, state_nbytes
from mpisage.runtime.transport import F_SERVER, Kind


def _batches(algo: Algorithm, c: ClientState, round: int, transform):
    """E local epochs over the client's shard in a fresh order each epoch; the ragged last batch is kept."""
    dev, n = algo.world.device, len(c.y)
    poisoned = _inject_nan(c.cid, round)      # the test hook: read once per round, not per batch
    for _ in range(algo.cfg.local_epochs):
        order = torch.randperm(n, generator=c.generator)
        for first in range(0, n, algo.cfg.batch_size):
            idx = order[first:first + algo.cfg.batch_size]
            x = transform(c.x[idx].to(dev), c.generator)
            if poisoned:
                x = x * float("nan")
            yield x, c.y[idx].to(dev)


def new_round_stats() -> dict[str, float]:
    return dict.fromkeys((name for name, _ in CLIENT_ROUND.fields), 0.0)


def _tally(stats: dict, local: tuple[float, int] | None, c: ClientState, round: int, k: int, n: int) -> None:
    """Adds one local iteration to the round's figures; a non-finite local loss stops the job."""
    if local is None:            # the loss lives on the S-server, which checks what it receives
        local = (np.nan, 0)
    elif not np.isfinite(local[0]):
        raise FloatingPointError(f"non-finite training loss on client {c.cid} in round {round}, local step {k}: the "
                                 f"usual cause is a learning rate too high for the model (try a smaller lr)")
    stats["loss_sum"] += local[0]
    stats["correct"] += local[1]
    stats["samples"] += n


def train_round(algo: Algorithm, c: ClientState, link: ClientLink, transform) -> dict:
    """One client's round (the step counter k restarts every round) -> its CLIENT_ROUND figures."""
    start, stats = time.perf_counter(), new_round_stats()
    for k, (x, y) in enumerate(_batches(algo, c, link.round, transform)):
        _tally(stats, algo.client_step(c, link, k, x, y), c, link.round, k, len(y))
    stats["seconds"] = time.perf_counter() - start
    return stats


def train_lockstep(algo: Algorithm, clients: list[ClientState], links: list[ClientLink], transform) -> list[dict]:
    """The round of every hosted client at once, one iteration at a time: all uploads of iteration k go out before
    any reply is awaited (the S-server answers iteration k when it has every client's batch). Time is shared out
    equally."""
    start, stats = time.perf_counter(), [new_round_stats() for _ in clients]
    streams = [_batches(algo, c, link.round, transform) for c, link in zip(clients, links)]
    for k, batches in enumerate(zip(*streams, strict=True)):
        sent = [algo.client_send(c, link, k, x, y) for c, link, (x, y) in zip(clients, links, batches)]
        for c, link, (_, y), out, st in zip(clients, links, batches, sent, stats):
            _tally(st, algo.client_finish(c, link, k, out), c, link.round, k, len(y))
    for st in stats:
        st["seconds"] = (time.perf_counter() - start) / len(clients)
    return stats


def _send_round(algo: Algorithm, c: ClientState, stats: dict, round: int) -> None:
    """A client's shared modules and its round figures, to the F-server."""
    t = algo.world.transport
    for kind, module in shared_modules(algo, c).items():
        t.send(F_SERVER, carrier(algo, kind), pack_state(module.state_dict()), round=round, client=c.cid)
    send_report(t, F_SERVER, client_round_report(algo.client_report_fields()),
                {**stats, **algo.client_report(c, round)}, round=round, client=c.cid)


def _load_from_fserver(algo: Algorithm, c: ClientState, round: int) -> None:
    t = algo.world.transport
    for kind, module in shared_modules(algo, c).items():
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
    cids = world.clients_of(world.rank)
    clients = algo.client_store(cids)          # idle clients packed (config client_store)
    transform = train_transform(world.data, world.cfg.dataset.augment)
    if world.resume_from:
        clients.load_state_dict(restore_rank_state(world, f"rank{world.rank}"))
    for round in range(world.start_round, world.cfg.rounds):
        round_start_wait = t.wait_seconds
        _inject_fault(world.rank, round)
        if algo.schedule == "lockstep":       # every hosted client at once: all live
            with clients.use(cids) as live:
                all_stats = train_lockstep(algo, live, [ClientLink(t, cid, round) for cid in cids], transform)
                for c, stats in zip(live, all_stats):
                    _send_round(algo, c, stats, round)
        else:
            all_stats = []
            for cid in cids:
                c = clients[cid]
                if algo.schedule == "sequential":         # take over the model the previous client trained
                    _load_from_fserver(algo, c, round)
                all_stats.append(train_round(algo, c, ClientLink(t, c.cid, round), transform))
                _send_round(algo, c, all_stats[-1], round)    # at once: a sequential F-server waits for it
        busy = sum(stats["seconds"] for stats in all_stats)
        send_report(t, F_SERVER, RANK_ROUND, {"wait_seconds": t.wait_seconds, "busy_seconds": busy,
                                              "round_start_wait_seconds": round_start_wait,
                                              "resident_bytes": resident_bytes()}, round=round)
        if algo.averages_shared and algo.schedule != "sequential":         # the averages
            for cid in cids:
                _load_from_fserver(algo, clients[cid], round)
        stop = t.recv(Kind.CONTROL, F_SERVER, round=round, shape=(1,), dtype=torch.int64).tensor.item()
        if checkpoint_due(world.cfg, round, stop):
            send_rank_state(t, clients.state_dict(), round)
        if stop:
            break
    t.flush()
