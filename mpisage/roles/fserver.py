"""The F-server loop (rank 0): collect each client's shared modules, average them, send the averages back with
the continue/stop decision, have the S-server evaluate the new global model, and record the round once its
evaluation is in (while the clients already train the next one). Rank 0 is the only rank that prints or writes
files."""
from __future__ import annotations

import time

import numpy as np
import torch

from mpisage.algorithms import Algorithm
from mpisage.config import to_yaml
from mpisage.roles.shared import carrier, eval_keys, open_metrics, shared_templates
from mpisage.runtime import preemption
from mpisage.runtime.checkpoint import checkpoint_due, recv_checkpoint, restore_transport, transport_state, write_checkpoint
from mpisage.runtime.environment import resident_bytes
from mpisage.runtime.metrics import GIB
from mpisage.runtime.protocol import (EVAL_RESULT, RANK_ROUND, client_round_report, recv_report,
                                      sserver_round_report)
from mpisage.runtime.state import RunningAverage, flatten_state, pack_state, state_nbytes
from mpisage.runtime.transport import NUM_KINDS, S_SERVER, Kind, role_of


def run_fserver(algo: Algorithm, log) -> dict:
    world, t, cfg = algo.world, algo.world.transport, algo.cfg
    m = world.num_clients
    templates = shared_templates(algo)
    evaluated = eval_keys(algo, templates)     # (kind, client id) of what the S-server evaluates each round
    s_report = sserver_round_report(m, algo.server_report_fields())
    c_report = client_round_report(algo.client_report_fields())
    sequential = algo.schedule == "sequential"
    streaming = (type(algo).aggregate is Algorithm.aggregate and algo.averages_shared and not sequential
                 and all(cid < 0 for _, cid in eval_keys(algo, templates)))
    # the current global modules: the common initial weights until the first round is done
    current = {kind: pack_state(module.state_dict()) for kind, module in templates.items()}
    ready = 0.0    # when the previous round's averaged model was ready (seconds since start)
    prev_wait = np.zeros(t.size)
    history = None
    if world.resume_from:
        flat = world.resume_state("fserver")
        current = {kind: flat[f"{kind.name.lower()}/packed"].clone() for kind in templates}
        restore_transport(t, flat)
        ready, prev_wait = float(flat["clock/ready"][0]), flat["clock/prev_wait"].numpy().copy()
        history = {k.removeprefix("metrics/"): v.numpy() for k, v in flat.items() if k.startswith("metrics/")}
        log(f"[mpisage] resuming after round {world.start_round} from {world.resume_from[0]}")
    metrics = open_metrics(algo, history)
    threshold = cfg.comm_threshold_mb * 1024 ** 2
    last_counters = {r: np.zeros((3, NUM_KINDS, 3), dtype=np.int64) for r in range(1, t.size)}
    start = time.perf_counter() - ready
    pending = None   # the row of a finished round whose evaluation has not come back yet
    recorded = None  # the last row written (its client idle seconds are completed by the next round's reports)
    last_round = None     # the round the run stops after, once decided (its progress line is always printed)

    def record(result: dict) -> None:
        """Completes the pending row with its evaluation, writes it and prints the round's progress line."""
        nonlocal pending, recorded
        row, pending = pending, None
        row.update({"test_acc": result["accuracy"], "test_loss": result["loss"], "eval_seconds": result["seconds"],
                    "eval_lag_seconds": time.perf_counter() - start - row["wall_time"]})
        metrics.append(row)
        recorded = row
        if row["round"] % cfg.runtime.log_interval == 0 or row["round"] == last_round:
            log(f"round {row['round'] + 1:4d}/{cfg.rounds} | test acc {row['test_acc']:.4f} | loss "
                f"{row['test_loss']:.4f} | {row['comm_bytes'] / GIB:8.3f} GiB | {row['round_seconds']:6.2f} s/round")

    def await_evaluation() -> None:
        if pending is not None:
            record(recv_report(t, S_SERVER, EVAL_RESULT, round=pending["round"], kind=Kind.EVAL))

    def evaluation_arrived() -> bool:
        """Idle work while the F-server waits for the clients: the previous round's evaluation, as soon as it is
        in, so its row and progress line never wait for the next round (the S-server evaluates it meanwhile)."""
        if pending is None or not t.probe([Kind.EVAL], S_SERVER):
            return False
        await_evaluation()
        return True

    for round in range(world.start_round, cfg.rounds):
        # 1. every client's shared modules and local figures, in client id order (deterministic sums);
        #    a sequential method hands each client the modules the previous one trained instead
        packed = {kind: [] for kind in templates}
        # plain FedAvg needs no client's modules once added: a running average keeps the F-server's memory flat
        running = {kind: RunningAverage(module.state_dict(), [world.num_samples(c) for c in range(m)])
                   for kind, module in templates.items()} if streaming else None
        client_rounds = []
        for cid in range(m):
            src = world.rank_of(cid)
            if sequential:
                for kind in templates:
                    t.send(src, kind, current[kind], round=round, client=cid)
            for kind, module in templates.items():
                received = t.recv(carrier(algo, kind), src, round=round, client=cid,
                                  nbytes=state_nbytes(module.state_dict()), idle=evaluation_arrived).tensor
                if streaming:
                    running[kind].add(received)
                else:
                    packed[kind].append(received)
                if sequential:
                    current[kind] = received
            client_rounds.append(recv_report(t, src, c_report, round=round, client=cid, idle=evaluation_arrived))
        client_stats = {name: np.array([c[name] for c in client_rounds]) for name, _ in c_report.fields}
        rank_reports = {r: recv_report(t, r, RANK_ROUND, round=round, idle=evaluation_arrived)
                        for r in world.client_ranks}
        s_rep = recv_report(t, S_SERVER, s_report, round=round, idle=evaluation_arrived)
        last_counters[S_SERVER] = s_rep["counters"]
        for r, rep in rank_reports.items():
            last_counters[r] = rep["counters"]

        # 2. average and send back; decide whether this was the last round; have the S-server evaluate the result
        if algo.averages_shared and not sequential:
            current = {kind: running[kind].packed() if streaming else
                       algo.aggregate(kind, packed[kind], templates[kind]) for kind in templates}
            for cid in range(m):
                for kind in templates:
                    t.send(world.rank_of(cid), kind, current[kind], round=round, client=cid)
        totals = sum(last_counters.values()) + t.counters()
        paper_total = int(totals[1].sum())
        stop = round == cfg.rounds - 1 or paper_total >= threshold or preemption.requested() is not None
        flag = torch.tensor([int(stop)], dtype=torch.int64)
        for r in range(1, t.size):
            t.send(r, Kind.CONTROL, flag, round=round)
        for kind, cid in evaluated:
            t.send(S_SERVER, Kind.EVAL, current[kind] if cid < 0 else packed[kind][cid], round=round, client=cid,
                   part=int(kind))
        # The round's clock stops when its global model exists; its evaluation runs while the next round trains.
        round_s, ready = time.perf_counter() - start - ready, time.perf_counter() - start

        # 3. the round's row, written once its evaluation is in (the clients train the next round meanwhile)
        totals = sum(last_counters.values()) + t.counters()
        waits = np.array([t.wait_seconds, s_rep["wait_seconds"]] +
                         [rank_reports[r]["wait_seconds"] for r in world.client_ranks])
        # client ranks' idle seconds, by the round they belong to: the waits inside this round (an alignment round's
        # wait for the aux) here, and the wait for the previous round's averages added to the previous row
        started = np.zeros(t.size)
        started[world.client_ranks] = [rank_reports[r]["round_start_wait_seconds"] for r in world.client_ranks]
        idle, idle_before = np.zeros(t.size), np.zeros(t.size)
        idle[world.client_ranks] = (waits - started)[world.client_ranks]
        idle_before[world.client_ranks] = (started - prev_wait)[world.client_ranks]
        round_wait, prev_wait = waits - prev_wait, waits
        if round > world.start_round:     # (a resumed run's first wait includes its start-up: not attributed)
            previous = pending or recorded
            previous["client_idle_seconds_by_rank"] = previous["client_idle_seconds_by_rank"] + idle_before
            if previous is recorded:
                metrics.update_last({"client_idle_seconds_by_rank": previous["client_idle_seconds_by_rank"]})
        await_evaluation()       # the previous round's, if still out: the S-server sends it before it takes these
        last_round = round if stop else None
        s_train = s_rep["train_stats"]
        with np.errstate(invalid="ignore", divide="ignore"):
            pending = {
                "round": round, "comm_bytes": int(totals[1].sum()), "wire_bytes": int(totals[0].sum()),
                "wall_time": ready, "round_seconds": round_s,
                "paper_bytes_by_kind": totals[1].sum(axis=1), "wire_bytes_by_kind": totals[0].sum(axis=1),
                "messages_by_kind": totals[2].sum(axis=1),
                "wire_bytes_by_link": _by_link(last_counters, t.counters()),
                "client_local_loss": client_stats["loss_sum"] / client_stats["samples"],
                "client_local_acc": client_stats["correct"] / client_stats["samples"],
                "client_train_seconds": client_stats["seconds"],
                "server_train_loss": s_train[:, 0] / s_train[:, 2],
                "server_train_acc": s_train[:, 1] / s_train[:, 2],
                "resident_bytes_by_rank": np.array([resident_bytes(), s_rep["resident_bytes"]] +
                                                   [rank_reports[r]["resident_bytes"] for r in world.client_ranks]),
                "sserver_busy_seconds": s_rep["busy_seconds"], "sserver_round_seconds": s_rep["round_seconds"],
                "wait_seconds_by_rank": round_wait, "client_idle_seconds_by_rank": idle,
                **{name: s_rep[name] for name in algo.server_report_fields()},   # the algorithm's own figures
                **{name: client_stats[name] for name in algo.client_report_fields()},   # per client
                # filled in below once this round's checkpoint (if any) is written: bytes of each rank's state
                "checkpoint_bytes_by_rank": np.zeros(t.size, dtype=np.int64), "checkpoint_seconds": 0.0,
            }
        if checkpoint_due(cfg, round, stop) or stop:
            await_evaluation()    # a checkpoint holds every row up to its round; the last row ends the run
        if checkpoint_due(cfg, round, stop):
            row = recorded
            began = time.perf_counter()
            ranks = {f"rank{r}": recv_checkpoint(t, r, round) for r in range(1, t.size)}
            ranks["fserver"] = flatten_state({
                **{kind.name.lower(): {"packed": current[kind]} for kind in templates}, "transport": transport_state(t),
                "clock": {"ready": torch.tensor([ready]), "prev_wait": torch.from_numpy(prev_wait.copy())},
                "metrics": {k: torch.from_numpy(v) for k, v in metrics.history().items()}})
            write_checkpoint(cfg.run_dir, round, ranks, {"config": to_yaml(cfg)}, cfg.checkpoint.keep)
            sizes = np.array([state_nbytes(ranks[f"rank{r}" if r else "fserver"][0]) for r in range(t.size)])
            row["checkpoint_bytes_by_rank"], row["checkpoint_seconds"] = sizes, time.perf_counter() - began
            metrics.update_last({k: row[k] for k in ("checkpoint_bytes_by_rank", "checkpoint_seconds")})
            log(f"[mpisage] checkpoint after round {round + 1}: {sizes.sum() / 1024 ** 2:.1f} MiB "
                f"(largest rank {int(sizes.argmax())}: {sizes.max() / 1024 ** 2:.1f} MiB), gathered and written in "
                f"{row['checkpoint_seconds']:.1f} s")
        if stop:
            if preemption.requested() and round < cfg.rounds - 1:
                log(f"[mpisage] {preemption.requested()}: stopped after round {round + 1} with a checkpoint; "
                    f"run again with resume=auto to continue")
            break
    summary = recorded or {}
    metrics.close()
    t.flush()
    return summary


def _by_link(last_counters: dict, own: np.ndarray) -> np.ndarray:
    """[source role, destination role] cumulative wire bytes."""
    out = np.zeros((3, 3), dtype=np.int64)
    out[0] = own[0].sum(axis=0)
    for r, c in last_counters.items():
        out[role_of(r)] += c[0].sum(axis=0)
    return out
