"""The F-server loop (rank 0): collect each client's shared modules, average them, send the averages back with
the continue/stop decision, have the S-server evaluate the new global model, and record the round once its
evaluation is in (while the clients already train the next one). Rank 0 is the only rank that prints or writes
files."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from mpisage.algorithms import Algorithm
from mpisage.roles.records import Records, no_checkpoint_columns, resume_history, traffic_columns
from mpisage.roles.shared import carrier, eval_keys, shared_templates
from mpisage.runtime import preemption
from mpisage.runtime.checkpoint import checkpoint_due, recv_checkpoint, restore_transport, transport_state
from mpisage.runtime.environment import resident_bytes
from mpisage.runtime.metrics import GIB, run_finished
from mpisage.runtime.protocol import (EVAL_RESULT, RANK_ROUND, client_round_report, recv_report,
                                      sserver_round_report)
from mpisage.runtime.state import RunningAverage, pack_state, state_nbytes
from mpisage.runtime.transport import NUM_KINDS, S_SERVER, Kind, role_of


def run_fserver(algo: Algorithm, log) -> dict:
    f = FServer(algo, log)
    for round in range(f.world.start_round, f.cfg.rounds):
        uploads = f.receive_round(round)
        f.average(round, uploads)
        stop = f.decide_stop(round)
        f.send_stop_and_evaluation(round, stop, uploads)
        f.account(round, uploads, stop)
        if checkpoint_due(f.cfg, round, stop):
            f.checkpoint(round)
        if stop:
            f.say_why_stopped(round)
            break
    return f.finish()


@dataclass
class RoundUploads:
    """What the F-server receives in one round: every client's shared modules (kept, or folded into a running
    average), their figures, and each rank's report."""
    packed: dict                # kind -> [each client's modules] (empty when streamed)
    running: dict | None        # kind -> RunningAverage (streaming only)
    client_stats: dict          # figure -> [per client]
    rank_reports: dict          # client rank -> RANK_ROUND
    sserver: dict               # the S-server's round report


class FServer:
    """The F-server's state across rounds and one method per step of a round."""

    def __init__(self, algo: Algorithm, log):
        self.algo, self.world, self.t, self.cfg, self.log = algo, algo.world, algo.world.transport, algo.cfg, log
        self.m = self.world.num_clients
        self.templates = shared_templates(algo)
        self.evaluated = eval_keys(algo, self.templates)  # (kind, client id) of what the S-server evaluates
        self.s_report = sserver_round_report(self.m, algo.server_report_fields())
        self.c_report = client_round_report(algo.client_report_fields())
        self.sequential = algo.schedule == "sequential"
        # plain FedAvg needs no client's modules once added: a running average keeps the F-server's memory flat
        self.streaming = (algo.averages_shared and algo.aggregate_streams and not self.sequential
                          and all(cid < 0 for _, cid in self.evaluated))
        # the current global modules: the common initial weights until the first round is done
        self.current = {kind: pack_state(module.state_dict()) for kind, module in self.templates.items()}
        self.round_seconds = 0.0   # the last round's, from its start to its global model
        self.ready = 0.0           # when the previous round's averaged model was ready (seconds since start)
        self.prev_wait = np.zeros(self.t.size)
        self.last_counters = {r: np.zeros((3, NUM_KINDS, 3), dtype=np.int64) for r in range(1, self.t.size)}
        history = None
        if self.world.resume_from:
            flat = self.world.resume_state("fserver")
            self.current = {kind: flat[f"{kind.name.lower()}/packed"].clone() for kind in self.templates}
            restore_transport(self.t, flat)
            self.ready, self.prev_wait = float(flat["clock/ready"][0]), flat["clock/prev_wait"].numpy().copy()
            history = resume_history(flat)
            log(f"[mpisage] resuming after round {self.world.start_round} from {self.world.resume_from[0]}")
        self.records = Records(algo, log, history, "sync", "round")
        self.start = time.perf_counter() - self.ready
        self.pending = None        # the row of a finished round whose evaluation has not come back yet
        self.last_round = None     # the round the run stops after, once decided (its progress line is printed)

    # ------------------------------------------------------------------ 1. the round's uploads
    def receive_round(self, round: int) -> RoundUploads:
        """Every client's shared modules and local figures, in client id order (deterministic sums); a sequential
        method hands each client the modules the previous one trained instead. Then every rank's report."""
        t, world = self.t, self.world
        packed = {kind: [] for kind in self.templates}
        running = {kind: RunningAverage(module.state_dict(), [world.num_samples(c) for c in range(self.m)])
                   for kind, module in self.templates.items()} if self.streaming else None
        client_rounds = []
        for cid in range(self.m):
            src = world.rank_of(cid)
            if self.sequential:
                for kind in self.templates:
                    t.send(src, kind, self.current[kind], round=round, client=cid)
            for kind, module in self.templates.items():
                received = t.recv(carrier(self.algo, kind), src, round=round, client=cid,
                                  nbytes=state_nbytes(module.state_dict()), idle=self.evaluation_arrived).tensor
                if self.streaming:
                    running[kind].add(received)
                else:
                    packed[kind].append(received)
                if self.sequential:
                    self.current[kind] = received
            client_rounds.append(recv_report(t, src, self.c_report, round=round, client=cid,
                                             idle=self.evaluation_arrived))
        client_stats = {name: np.array([c[name] for c in client_rounds]) for name, _ in self.c_report.fields}
        rank_reports = {r: recv_report(t, r, RANK_ROUND, round=round, idle=self.evaluation_arrived)
                        for r in world.client_ranks}
        s_rep = recv_report(t, S_SERVER, self.s_report, round=round, idle=self.evaluation_arrived)
        self.last_counters[S_SERVER] = s_rep["counters"]
        for r, rep in rank_reports.items():
            self.last_counters[r] = rep["counters"]
        return RoundUploads(packed, running, client_stats, rank_reports, s_rep)

    # ------------------------------------------------------------------ 2. average, stop, evaluate
    def average(self, round: int, uploads: RoundUploads) -> None:
        """The new global modules, sent back to every client (not for a sequential method: it has them)."""
        if not self.algo.averages_shared or self.sequential:
            return
        self.current = {kind: uploads.running[kind].packed() if self.streaming else
                        self.algo.aggregate(kind, uploads.packed[kind], template)
                        for kind, template in self.templates.items()}
        for cid in range(self.m):
            for kind in self.templates:
                self.t.send(self.world.rank_of(cid), kind, self.current[kind], round=round, client=cid)

    def totals(self) -> np.ndarray:
        """Every rank's counters as last reported, and the F-server's own as they are now."""
        return sum(self.last_counters.values()) + self.t.counters()

    def decide_stop(self, round: int) -> bool:
        return (run_finished(round + 1, int(self.totals()[1].sum()), self.cfg.rounds, self.cfg.comm_threshold_mb)
                or preemption.requested() is not None)

    def send_stop_and_evaluation(self, round: int, stop: bool, uploads: RoundUploads) -> None:
        """The continue/stop flag to every rank, the modules to evaluate to the S-server; the round's clock stops
        here, when its global model exists (its evaluation runs while the next round trains)."""
        flag = torch.tensor([int(stop)], dtype=torch.int64)
        for r in range(1, self.t.size):
            self.t.send(r, Kind.CONTROL, flag, round=round)
        for kind, cid in self.evaluated:
            self.t.send(S_SERVER, Kind.EVAL, self.current[kind] if cid < 0 else uploads.packed[kind][cid],
                        round=round, client=cid, part=int(kind))
        self.round_seconds, self.ready = time.perf_counter() - self.start - self.ready, time.perf_counter() - self.start

    # ------------------------------------------------------------------ 3. the round's row
    def account(self, round: int, uploads: RoundUploads, stop: bool) -> None:
        """The round's row, pending until its evaluation is in (the clients train the next round meanwhile)."""
        waits, idle = self.client_waits(round, uploads)
        self.await_evaluation()    # the previous round's, if still out: the S-server sends it before it takes these
        self.last_round = round if stop else None
        self.pending = self.row(round, uploads, waits, idle)
        if checkpoint_due(self.cfg, round, stop) or stop:
            self.await_evaluation()    # a checkpoint holds every row up to its round; the last row ends the run

    def client_waits(self, round: int, uploads: RoundUploads) -> tuple[np.ndarray, np.ndarray]:
        """The round's waiting seconds per rank, and the client ranks' idle seconds by the round they belong to:
        the waits inside this round (an alignment round's wait for the aux) here, and the wait for the previous
        round's averages, known only now, credited to the previous row (written or still pending)."""
        t, ranks, reports = self.t, self.world.client_ranks, uploads.rank_reports
        waits = np.array([t.wait_seconds, uploads.sserver["wait_seconds"]] + [reports[r]["wait_seconds"] for r in ranks])
        started = np.zeros(t.size)
        started[ranks] = [reports[r]["round_start_wait_seconds"] for r in ranks]
        idle, idle_before = np.zeros(t.size), np.zeros(t.size)
        idle[ranks] = (waits - started)[ranks]
        idle_before[ranks] = (started - self.prev_wait)[ranks]
        round_wait, self.prev_wait = waits - self.prev_wait, waits
        if round > self.world.start_round:     # (a resumed run's first wait includes its start-up: not attributed)
            previous = self.pending or self.records.last
            credited = {"client_idle_seconds_by_rank": previous["client_idle_seconds_by_rank"] + idle_before}
            if previous is self.pending:
                previous.update(credited)
            else:
                self.records.amend_last(credited)
        return round_wait, idle

    def row(self, round: int, uploads: RoundUploads, waits: np.ndarray, idle: np.ndarray) -> dict:
        """Every column of the round but its evaluation's (`record`)."""
        stats, s_rep, reports = uploads.client_stats, uploads.sserver, uploads.rank_reports
        s_train = s_rep["train_stats"]
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "round": round, **traffic_columns(self.totals()), "wall_time": self.ready,
                "round_seconds": self.round_seconds, "wire_bytes_by_link": _by_link(self.last_counters, self.t.counters()),
                "client_local_loss": stats["loss_sum"] / stats["samples"],
                "client_local_acc": stats["correct"] / stats["samples"], "client_train_seconds": stats["seconds"],
                "server_train_loss": s_train[:, 0] / s_train[:, 2], "server_train_acc": s_train[:, 1] / s_train[:, 2],
                "resident_bytes_by_rank": np.array([resident_bytes(), s_rep["resident_bytes"]] +
                                                   [reports[r]["resident_bytes"] for r in self.world.client_ranks]),
                "sserver_busy_seconds": s_rep["busy_seconds"], "sserver_round_seconds": s_rep["round_seconds"],
                "wait_seconds_by_rank": waits, "client_idle_seconds_by_rank": idle,
                **{name: s_rep[name] for name in self.algo.server_report_fields()},   # the algorithm's own figures
                **{name: stats[name] for name in self.algo.client_report_fields()},   # per client
                **no_checkpoint_columns(self.t.size)}

    def record(self, result: dict) -> None:
        """Completes the pending row with its evaluation, writes it and prints the round's progress line."""
        row, self.pending = self.pending, None
        row.update({"test_acc": result["accuracy"], "test_loss": result["loss"], "eval_seconds": result["seconds"],
                    "eval_lag_seconds": time.perf_counter() - self.start - row["wall_time"]})
        self.records.append(row)
        if row["round"] % self.cfg.runtime.log_interval == 0 or row["round"] == self.last_round:
            self.log(f"round {row['round'] + 1:4d}/{self.cfg.rounds} | test acc {row['test_acc']:.4f} | loss "
                     f"{row['test_loss']:.4f} | {row['comm_bytes'] / GIB:8.3f} GiB | {row['round_seconds']:6.2f} "
                     f"s/round")

    def await_evaluation(self) -> None:
        if self.pending is not None:
            self.record(recv_report(self.t, S_SERVER, EVAL_RESULT, round=self.pending["round"], kind=Kind.EVAL))

    def evaluation_arrived(self) -> bool:
        """Idle work while the F-server waits for the clients: the previous round's evaluation, as soon as it is
        in, so its row and progress line never wait for the next round (the S-server evaluates it meanwhile)."""
        if self.pending is None or not self.t.probe([Kind.EVAL], S_SERVER):
            return False
        self.await_evaluation()
        return True

    # ------------------------------------------------------------------ 4. checkpoint, stop
    def checkpoint(self, round: int) -> None:
        own = {**{kind.name.lower(): {"packed": self.current[kind]} for kind in self.templates},
               "transport": transport_state(self.t),
               "clock": {"ready": torch.tensor([self.ready]), "prev_wait": torch.from_numpy(self.prev_wait.copy())}}
        self.records.checkpoint(round, lambda: {f"rank{r}": recv_checkpoint(self.t, r, round)
                                                for r in range(1, self.t.size)}, own)

    def say_why_stopped(self, round: int) -> None:
        if preemption.requested() and round < self.cfg.rounds - 1:
            self.log(f"[mpisage] {preemption.requested()}: stopped after round {round + 1} with a checkpoint; "
                     f"run again with resume=auto to continue")

    def finish(self) -> dict:
        summary = self.records.close()
        self.t.flush()
        return summary


def _by_link(last_counters: dict, own: np.ndarray) -> np.ndarray:
    """[source role, destination role] cumulative wire bytes."""
    out = np.zeros((3, 3), dtype=np.int64)
    out[0] = own[0].sum(axis=0)
    for r, c in last_counters.items():
        out[role_of(r)] += c[0].sum(axis=0)
    return out
