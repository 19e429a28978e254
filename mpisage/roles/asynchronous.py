"""The role loops of asynchronous methods (GAS). There are no rounds: a metrics "round" is one global client-model
update of the F-server (every Q_c client models that come back).

F-server  schedules: C of the K clients are active; each starts from the current global client model, runs E local
          iterations and sends its model back; it is then replaced by a client drawn uniformly from the inactive
          ones. Every Q_c models -> average -> new global model -> the S-server evaluates it -> one metrics row.
S-server  answers each activation at once (algo.on_activation), evaluates global models in its idle moments.
client    runs its active clients one iteration at a time, as fast as it (and its injected delay) allows.

Stopping (after `rounds` updates, the comm budget or a preemption signal) drains every stream: the F-server tells
each client rank how many starts it sent; a client rank takes them all, reports how many models it sent and
stops; then the S-server is told how many evaluations to finish. Nothing is left in flight. The stop writes one
checkpoint of every rank (global model, schedule and clocks, server model and statistics, every client's optimiser,
counters, metrics), and `resume=` continues from it: asynchrony makes the continuation a valid run, not a replay.
"""
from __future__ import annotations

import copy
import os
import time

import numpy as np
import torch

from mpisage.config import to_yaml
from mpisage.data import train_transform
from mpisage.roles.sserver import recv_labels
from mpisage.runtime import preemption
from mpisage.runtime.checkpoint import (recv_checkpoint, restore_rank_state, restore_transport, send_rank_state,
                                        transport_state, write_checkpoint)
from mpisage.runtime.environment import environment, resident_bytes
from mpisage.runtime.metrics import GIB, MetricsFile
from mpisage.runtime.protocol import (ASYNC_SSERVER_REPORT, CLIENT_ROUND, EVAL_RESULT, FINAL_CLIENT_REPORT,
                                      RANK_REPORT, ClientLink, recv_report, send_report)
from mpisage.runtime.state import flatten_state, load_packed, pack_state, state_nbytes
from mpisage.runtime.transport import F_SERVER, NUM_KINDS, S_SERVER, Kind, ProtocolError

# The round field of an asynchronous message is the global model version it belongs to (the metrics' "round");
# FINAL marks a rank's last report and the stop.
FINAL = -1


# ---------------------------------------------------------------------------------------------------- client
def run_async_client(algo) -> None:
    world, t, cfg = algo.world, algo.world.transport, algo.cfg
    hosted = algo.client_store(world.clients_of(world.rank))     # idle clients packed (config client_store)
    transform = train_transform(world.data, cfg.dataset.augment)
    active: list[list] = []             # [client id, global version it started from, iterations done, stats]
    starts = uploads = 0
    starts_announced = None             # set by the F-server's stop message
    busy = 0.0
    nbytes = state_nbytes(hosted[hosted.ids[0]].model.state_dict())
    if world.resume_from:
        hosted.load_state_dict(restore_rank_state(world, f"rank{world.rank}"))

    def take_start() -> None:
        nonlocal starts
        msg = t.recv(Kind.CLIENT_MODEL, F_SERVER, clients_of=lambda _: hosted,   # a client this rank hosts
                     nbytes=nbytes)
        starts += 1
        if starts_announced is None:
            c = hosted[msg.client]
            load_packed(c.model, msg.tensor)
            active.append([msg.client, msg.round, 0, dict.fromkeys(("loss_sum", "correct", "samples", "seconds"), 0.0)])

    while starts_announced is None or starts < starts_announced:
        ready = t.probe([Kind.CONTROL, Kind.CLIENT_MODEL], F_SERVER)
        if ready is None and (not active or starts_announced is not None):
            ready = t.wait_any([Kind.CONTROL, Kind.CLIENT_MODEL], F_SERVER)
        if ready is not None:
            if ready[0] == Kind.CLIENT_MODEL:
                take_start()
            else:
                msg = t.recv(Kind.CONTROL, F_SERVER, round=FINAL, shape=(1,), dtype=torch.int64)
                starts_announced = int(msg.tensor.item())
                active.clear()          # participations in flight are abandoned: the run is over
            continue
        # one local iteration of the next active client
        entry = active.pop(0)
        cid, version, k, stats = entry
        c = hosted[cid]
        start = time.perf_counter()
        idx = torch.randint(len(c.y), (min(cfg.batch_size, len(c.y)),), generator=c.generator)
        x = transform(c.x[idx].to(world.device), c.generator)
        y = c.y[idx].to(world.device)
        algo.client_iteration(c, ClientLink(t, cid, version), k, x, y)
        if cfg.straggler_delay_s > 0:     # real heterogeneity, proportional to the client's simulated slowness
            time.sleep(cfg.straggler_delay_s * algo.slowness[cid])
        elapsed = time.perf_counter() - start
        busy += elapsed
        stats["samples"] += len(y)
        stats["seconds"] += elapsed
        if k + 1 < cfg.local_iters:
            active.append([cid, version, k + 1, stats])
            continue
        t.send(F_SERVER, Kind.CLIENT_MODEL, pack_state(c.model.state_dict()), round=version, client=cid)
        send_report(t, F_SERVER, CLIENT_ROUND, stats, round=version, client=cid)
        send_report(t, F_SERVER, RANK_REPORT, {"wait_seconds": t.wait_seconds, "busy_seconds": busy,
                                               "resident_bytes": resident_bytes()}, round=version)
        uploads += 1
    send_rank_state(t, hosted.state_dict(), FINAL)
    send_report(t, F_SERVER, FINAL_CLIENT_REPORT, {"uploads": uploads, "wait_seconds": t.wait_seconds,
                                                   "busy_seconds": busy, "resident_bytes": resident_bytes()},
                round=FINAL)
    t.flush()


# ---------------------------------------------------------------------------------------------------- S-server
def run_async_sserver(algo) -> None:
    world, t, cfg = algo.world, algo.world.transport, algo.cfg
    s = algo.make_server()
    if world.resume_from:
        s.load_state_dict(restore_rank_state(world, "rank1"), "server", world.device)
    template = world.initial_part("client")
    nbytes = state_nbytes(template.state_dict())
    queue: list[tuple[int, torch.Tensor]] = []      # (version, global client model) waiting for evaluation
    evaluation: list = [None, -1]                   # the running Evaluation and its version
    evaluations_done = 0
    busy, start = 0.0, time.perf_counter()

    def report_counters(round: int) -> None:
        send_report(t, F_SERVER, ASYNC_SSERVER_REPORT, {
            "wait_seconds": t.wait_seconds, "busy_seconds": busy, "elapsed_seconds": time.perf_counter() - start,
            "server_steps": getattr(s, "steps", 0), "generated_samples": getattr(s, "generated", 0),
            "resident_bytes": resident_bytes()}, round=round)

    def report(version: int, result) -> None:
        loss, accuracy, seconds = result
        send_report(t, F_SERVER, EVAL_RESULT, {"loss": loss, "accuracy": accuracy, "seconds": seconds},
                    round=version, kind=Kind.EVAL)
        report_counters(version)

    def evaluate_step() -> bool:
        nonlocal evaluations_done
        if evaluation[0] is None:
            if not queue:
                return False
            version, packed = queue.pop(0)
            client = world.initial_part("client")
            load_packed(client, packed)
            evaluation[:] = [algo.make_evaluation(copy.deepcopy(s.model), client), version]
        evaluation[0].step()
        if evaluation[0].done:
            report(evaluation[1], evaluation[0].result())
            evaluation[:] = [None, -1]
            evaluations_done += 1
        return True

    expected_evaluations = None
    while expected_evaluations is None or evaluations_done < expected_evaluations:
        if expected_evaluations is not None:         # stopping: finish what was asked, nothing else comes
            if not evaluate_step():
                kind, src = t.wait_any([Kind.EVAL], F_SERVER)
                _take_eval(t, queue, nbytes)
            continue
        # The F-server's rare messages first: with C clients there is nearly always an activation waiting, and
        # probing activations first would leave evaluation requests and the stop unread for the whole run.
        kind, src = t.wait_any([Kind.EVAL, Kind.CONTROL, Kind.ACTIVATION], idle=evaluate_step)
        if kind == Kind.ACTIVATION:
            t0 = time.perf_counter()
            act = t.recv(Kind.ACTIVATION, src, clients_of=world.clients_of, trailing_shape=algo.activation_shape,
                         device=world.device)
            labels = recv_labels(world, act)
            progress = act.round * cfg.local_iters + act.seq + 1          # n = tE + e
            grad = algo.on_activation(s, act.client, progress, act.tensor, labels)
            t.send(src, Kind.GRADIENT, grad, round=act.round, client=act.client, seq=act.seq)
            busy += time.perf_counter() - t0
            evaluate_step()     # a busy S-server is never idle: evaluate one batch per activation served
        elif src != F_SERVER:
            raise ProtocolError(f"{kind.name} message from rank {src}: only the F-server (rank 0) sends these")
        elif kind == Kind.EVAL:
            _take_eval(t, queue, nbytes)
        else:
            msg = t.recv(Kind.CONTROL, F_SERVER, round=FINAL, shape=(1,), dtype=torch.int64)
            expected_evaluations = int(msg.tensor.item())
            send_rank_state(t, {"server": s.state_dict()}, FINAL)      # for the stop checkpoint
    report_counters(FINAL)
    t.flush()


def _take_eval(t, queue: list, nbytes: int) -> None:
    msg = t.recv(Kind.EVAL, F_SERVER, part=int(Kind.CLIENT_MODEL), nbytes=nbytes)
    queue.append((msg.round, msg.tensor))


# ---------------------------------------------------------------------------------------------------- F-server
def run_async_fserver(algo, log) -> dict:
    world, t, cfg = algo.world, algo.world.transport, algo.cfg
    m = world.num_clients
    template = world.initial_part("client")
    nbytes = state_nbytes(template.state_dict())
    threshold = cfg.comm_threshold_mb * 1024 ** 2
    counters = {r: np.zeros((3, NUM_KINDS, 3), dtype=np.int64) for r in range(1, t.size)}   # latest reports
    resident = np.zeros(t.size)                  # latest resident bytes per rank (client ranks: at their last model)
    rng = world.generator("fserver")
    global_model = pack_state(template.state_dict())
    version, requested = 0, 0
    starts = dict.fromkeys(world.client_ranks, 0)
    sim_start, sim_now = {}, 0.0
    participations = np.zeros(m, dtype=np.int64)
    inactive = list(range(m))
    buffer: list[tuple[torch.Tensor, int]] = []
    update_clock: dict[int, tuple[float, float]] = {}     # version -> (wall seconds, simulated seconds)
    local_stats = np.zeros((m, 4))
    start = time.perf_counter()
    held: list[dict] = []       # metrics rows from the stop on
    history = None
    if world.resume_from:
        # Participations in flight at the stop were abandoned, so every client is inactive again; the rest
        # continues: the newest global model, the schedule's random stream, both clocks, counters and metrics.
        flat = world.resume_state("fserver")
        restore_transport(t, flat)
        global_model = flat["client/packed"].clone()
        version = requested = world.start_round
        participations = flat["schedule/participations"].numpy().copy()
        local_stats = flat["schedule/local_stats"].numpy().copy()
        sim_now, wall = (float(v) for v in flat["schedule/clock"])
        rng.set_state(flat["schedule/rng"])
        for r in counters:
            counters[r] = flat["schedule/reports"][r - 1].numpy().copy()
        update_clock[version - 1] = (wall, sim_now)
        start -= wall
        history = {k.removeprefix("metrics/"): v.numpy() for k, v in flat.items() if k.startswith("metrics/")}
        log(f"[mpisage] resuming after update {version} from {world.resume_from[0]}")
    os.makedirs(cfg.run_dir, exist_ok=True)
    metrics = MetricsFile(os.path.join(cfg.run_dir, "metrics.h5"), {
        "config": to_yaml(cfg), "environment": environment(t.comm, transport=t), "algorithm": algo.describe(),
        "kinds": [k.name.lower() for k in Kind], "roles": ["fserver", "sserver", "client"]}, history=history)
    metrics.set("label_histograms", world.histograms)
    metrics.set("client_samples", [world.num_samples(c) for c in range(m)])
    metrics.set("test_samples", world.test_samples)     # how many test images each accuracy is measured on
    metrics.set("simulated_seconds_per_participation", [algo.participation_seconds(c) for c in range(m)])

    def draw() -> int:
        return inactive.pop(int(torch.randint(len(inactive), (1,), generator=rng)))

    def start_client(cid: int) -> None:
        t.send(world.rank_of(cid), Kind.CLIENT_MODEL, global_model, round=version, client=cid)
        starts[world.rank_of(cid)] += 1
        sim_start[cid] = sim_now

    for _ in range(algo.active):
        start_client(draw())
    stop = False
    while not stop:
        kind, src = t.wait_any([Kind.EVAL, Kind.CLIENT_MODEL])      # results first: models must not starve them
        if kind == Kind.CLIENT_MODEL:
            msg = t.recv(Kind.CLIENT_MODEL, src, clients_of=world.clients_of, nbytes=nbytes)
            cid = msg.client
            local = recv_report(t, src, CLIENT_ROUND, client=cid)
            local_stats[cid] += [local[name] for name, _ in CLIENT_ROUND.fields]
            rank_report = recv_report(t, src, RANK_REPORT, round=msg.round)
            counters[src], resident[src] = rank_report["counters"], rank_report["resident_bytes"]
            participations[cid] += 1
            sim_now = max(sim_now, sim_start[cid] + algo.participation_seconds(cid))
            buffer.append((msg.tensor, cid))
            if len(buffer) == algo.model_buffer:
                global_model = algo.average_models([b[0] for b in buffer], [b[1] for b in buffer], template)
                buffer.clear()
                update_clock[version] = (time.perf_counter() - start, sim_now)
                if requested < cfg.rounds:
                    t.send(S_SERVER, Kind.EVAL, global_model, round=version, part=int(Kind.CLIENT_MODEL))
                    requested += 1
                version += 1
            # The replacement starts from the newest global model; the finished client may be drawn again later
            # (at once when every client is active, C = K: then it is the only one to draw).
            replacement = draw() if inactive else cid
            start_client(replacement)
            if replacement != cid:
                inactive.append(cid)
            continue
        if src != S_SERVER:
            raise ProtocolError(f"EVAL message from rank {src}: only the S-server (rank 1) sends results")
        summary = _record(t, counters, resident, update_clock, local_stats, participations, log, cfg)
        stop = summary["round"] + 1 >= cfg.rounds or summary["comm_bytes"] >= threshold or \
            preemption.requested() is not None
        if stop:
            held.append(summary)          # written after the drain, with the final counters
        else:
            metrics.append(summary)

    # drain: every client rank takes the starts in flight and reports; then the S-server finishes its evaluations
    for r in world.client_ranks:
        t.send(r, Kind.CONTROL, torch.tensor([starts[r]], dtype=torch.int64), round=FINAL)
    for r in world.client_ranks:
        while True:
            msg = t.recv(Kind.CONTROL, r, dtype=torch.float64)
            if msg.client >= 0:          # a model that came back after the stop: received, not used
                CLIENT_ROUND.unpack(msg.tensor)
                t.recv(Kind.CLIENT_MODEL, r, client=msg.client, nbytes=nbytes)
                continue
            counters[r] = (FINAL_CLIENT_REPORT if msg.round == FINAL else RANK_REPORT).unpack(msg.tensor)["counters"]
            if msg.round == FINAL:
                break
    ranks = {f"rank{r}": recv_checkpoint(t, r, FINAL) for r in world.client_ranks}
    sent = requested - world.start_round       # evaluations this run asked for (a resumed run starts later)
    t.send(S_SERVER, Kind.CONTROL, torch.tensor([sent], dtype=torch.int64), round=FINAL)
    ranks["rank1"] = recv_checkpoint(t, S_SERVER, FINAL)
    while held[-1]["round"] + 1 < requested:
        t.wait_any([Kind.EVAL], S_SERVER)
        held.append(_record(t, counters, update_clock, local_stats, participations, log, cfg))
    counters[S_SERVER] = recv_report(t, S_SERVER, ASYNC_SSERVER_REPORT, round=FINAL)["counters"]
    t.flush()
    # The last row carries the totals of the whole run: every activation answered, every model counted.
    held[-1].update(_totals(counters, t))
    for row in held:
        metrics.append(row)
    summary = held[-1]
    last = int(summary["round"])
    schedule = {"participations": torch.from_numpy(participations), "local_stats": torch.from_numpy(local_stats),
                "clock": torch.tensor([sim_now, time.perf_counter() - start], dtype=torch.float64),
                "rng": rng.get_state(), "reports": torch.from_numpy(np.stack([counters[r] for r in range(1, t.size)]))}
    ranks["fserver"] = flatten_state({"client": {"packed": global_model}, "transport": transport_state(t),
                                      "schedule": schedule,
                                      "metrics": {k: torch.from_numpy(v) for k, v in metrics.history().items()}})
    write_checkpoint(cfg.run_dir, last, ranks, {"config": to_yaml(cfg)}, cfg.keep_checkpoints)
    if preemption.requested() and last < cfg.rounds - 1:
        log(f"[mpisage] {preemption.requested()}: stopped after update {last + 1} with a checkpoint; run again with "
            f"resume=auto to continue")
    metrics.close()
    return summary


def _totals(counters: dict, t) -> dict:
    totals = sum(counters.values()) + t.counters()
    return {"comm_bytes": int(totals[1].sum()), "wire_bytes": int(totals[0].sum()),
            "paper_bytes_by_kind": totals[1].sum(axis=1), "wire_bytes_by_kind": totals[0].sum(axis=1),
            "messages_by_kind": totals[2].sum(axis=1)}


def _record(t, counters, resident, update_clock, local_stats, participations, log, cfg) -> dict:
    """Receives one evaluation result (and the S-server's counters) and returns its metrics row. Byte figures are
    the sums of every rank's latest report; resident memory is each rank's latest."""
    msg = t.recv(Kind.EVAL, S_SERVER, shape=(EVAL_RESULT.size,), dtype=torch.float64)
    version = msg.round
    result = EVAL_RESULT.unpack(msg.tensor)
    s_rep = recv_report(t, S_SERVER, ASYNC_SSERVER_REPORT, round=version)
    counters[S_SERVER] = s_rep["counters"]
    resident[F_SERVER], resident[S_SERVER] = resident_bytes(), s_rep["resident_bytes"]
    test_loss, test_acc, eval_s = result["loss"], result["accuracy"], result["seconds"]
    wall, sim = update_clock[version]
    row = {"round": version, "test_acc": test_acc, "test_loss": test_loss, **_totals(counters, t),
           "wall_time": wall, "simulated_time": sim, "eval_seconds": eval_s,
           "round_seconds": wall - (update_clock[version - 1][0] if version else 0.0),
           "participations": participations.copy(), "client_train_seconds": local_stats[:, 3].copy(),
           "sserver_busy_seconds": s_rep["busy_seconds"], "server_steps": s_rep["server_steps"],
           "generated_samples": s_rep["generated_samples"], "resident_bytes_by_rank": resident.copy()}
    if version % cfg.log_interval == 0:
        log(f"update {version + 1:4d}/{cfg.rounds} | test acc {test_acc:.4f} | loss {test_loss:.4f} | "
            f"{row['comm_bytes'] / GIB:8.3f} GiB | wall {wall:7.1f} s | simulated {sim:8.1f} s")
    return row
