"""The F-server of asynchronous methods (rank 0), one class per schedule (as the client and S-server loops in
mpisage/roles/asynchronous.py): C of the K clients are active; each starts from the current global model, runs E
local iterations and sends its model back; it is then replaced by a client drawn uniformly from the inactive ones
(`ClientPool`). Every Q_c returned models -> average -> new global model -> the S-server evaluates it -> one metrics
row. A model's "version" is the global update it belongs to (the `round` field of its messages, the metrics'
"round").

simulated  the returned models are taken, and the replacements started, in the order of the simulated schedule
           every rank computes (same seed, same run); mid-run checkpoints are cut at the step that completes the
           update.
arrival    models are taken as they arrive and replacements drawn then; a mid-run checkpoint pauses every client
           rank at the update until it is written.

The stop (after `rounds` updates, the comm budget or a preemption signal) drains every stream (`drain`) and writes
one checkpoint of every rank, from which `resume=` continues."""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch

from mpisage.algorithms.asynchronous import ClientPool
from mpisage.roles.asynchronous import FINAL, checkpoint_cuts, part_nbytes, part_name, recv_models
from mpisage.roles.records import Records, no_checkpoint_columns, resume_history, traffic_columns
from mpisage.roles.shared import shared_templates
from mpisage.runtime import preemption
from mpisage.runtime.checkpoint import midrun_checkpoint_due, recv_checkpoint, restore_transport, transport_state
from mpisage.runtime.environment import resident_bytes
from mpisage.runtime.metrics import GIB, run_finished
from mpisage.runtime.state import pack_state
from mpisage.runtime.protocol import (CLIENT_ROUND, EVAL_RESULT, FINAL_CLIENT_REPORT, RANK_REPORT,
                                      async_sserver_report, recv_any_report, recv_report)
from mpisage.runtime.transport import F_SERVER, NUM_KINDS, S_SERVER, Kind, ProtocolError


class Returned(NamedTuple):
    """One returned model in the buffer: its parts by kind, its client, the global model it started from (by kind;
    None unless the method's update needs it)."""
    parts: dict
    client: int
    started: dict | None


def run_async_fserver(algo, log) -> dict:
    f = (SimulatedFServer if algo.cfg.asynchronous.schedule == "simulated" else ArrivalFServer)(algo, log)
    f.start_first_clients()
    while not f.stopping:
        kind, src = f.next_message()
        if kind == Kind.CLIENT_MODEL:
            f.take_return(src)
        else:
            f.take_evaluation(src)
    f.drain()
    return f.finish()


class AsyncFServer:
    """What both schedules share: the global model, the clocks, the buffer of returned models, the rows."""

    def __init__(self, algo, log):
        self.algo, self.world, self.t, self.cfg, self.log = algo, algo.world, algo.world.transport, algo.cfg, log
        world, t, m = self.world, self.t, self.world.num_clients
        self.templates = shared_templates(algo)           # the global model's parts (GAS: the client part)
        self.parts = part_nbytes(algo)
        self.s_report = async_sserver_report(algo.server_report_fields())
        self.counters = {r: np.zeros((3, NUM_KINDS, 3), dtype=np.int64) for r in range(1, t.size)}  # latest reports
        self.resident = np.zeros(t.size)     # latest resident bytes per rank (client ranks: at their last model)
        self.rng = world.generator("fserver")
        self.global_model = {kind: pack_state(module.state_dict()) for kind, module in self.templates.items()}
        self.version = self.requested = 0    # the next global update; evaluations asked for
        self.starts = dict.fromkeys(world.client_ranks, 0)
        self.sim_start, self.sim_now = {}, 0.0
        self.participations = np.zeros(m, dtype=np.int64)
        self.buffer: list[Returned] = []
        # the global model each active client started from, by version (only for a method whose update needs it)
        self.started_from: dict[int, int] = {}                   # active client -> the version it started from
        self.models_at: dict[int, dict] = {}                     # version -> that global model (versions in use)
        self.update_clock: dict[int, tuple[float, float]] = {}   # version -> (wall seconds, simulated seconds)
        self.participations_at: dict[int, np.ndarray] = {}       # version -> returned models per client then
        self.local_stats = np.zeros((m, 4))
        self.start = time.perf_counter()
        self.held: list[dict] = []           # metrics rows from the stop on (written after the drain)
        self.stopping = False
        self.cut_states: dict[int, dict] = {}      # update -> this rank's state at that mid-run checkpoint's cut
        history = None
        if world.resume_from:
            history = self.resume()
        self.records = Records(algo, log, history, "async", "update")
        metrics = self.records.metrics
        metrics.set("simulated_seconds_per_participation", [algo.participation_seconds(c) for c in range(m)])
        # the straggler clock's inputs, so anyone can check the participation skew against the speeds
        metrics.set("client_flops", [p.flops for p in algo.profiles])
        metrics.set("client_uplink_bps", [p.uplink for p in algo.profiles])

    def resume(self) -> dict:
        """Participations in flight at the stop were abandoned, so every client is inactive again; the rest
        continues: the newest global model, the schedule's random stream, both clocks, counters and metrics."""
        flat = self.world.resume_state("fserver")
        restore_transport(self.t, flat)
        self.global_model = {kind: flat[f"{part_name(kind)}/packed"].clone() for kind in self.templates}
        self.algo.load_fserver_state(flat, "algorithm")
        self.version = self.requested = self.world.start_round
        self.participations = flat["schedule/participations"].numpy().copy()
        self.local_stats = flat["schedule/local_stats"].numpy().copy()
        self.sim_now, wall = (float(v) for v in flat["schedule/clock"])
        self.rng.set_state(flat["schedule/rng"])
        for r in self.counters:
            self.counters[r] = flat["schedule/reports"][r - 1].numpy().copy()
        self.update_clock[self.version - 1] = (wall, self.sim_now)
        self.start -= wall
        self.log(f"[mpisage] resuming after update {self.version} from {self.world.resume_from[0]}")
        return resume_history(flat)

    def own_state(self) -> dict:
        """The F-server's part of a checkpoint, as it is now: the global model, the schedule's state and clocks."""
        t = self.t
        return {**{part_name(kind): {"packed": packed.clone()} for kind, packed in self.global_model.items()},
                "transport": transport_state(t),
                "schedule": {"participations": torch.from_numpy(self.participations.copy()),
                             "local_stats": torch.from_numpy(self.local_stats.copy()),
                             "clock": torch.tensor([self.sim_now, time.perf_counter() - self.start],
                                                   dtype=torch.float64),
                             "rng": self.rng.get_state(),
                             "reports": torch.from_numpy(np.stack([self.counters[r] for r in range(1, t.size)]))},
                "algorithm": self.algo.fserver_state()}

    # ------------------------------------------------------------------ schedule-specific steps
    def start_first_clients(self) -> None:
        raise NotImplementedError

    def next_message(self) -> tuple[Kind, int]:
        """(CLIENT_MODEL, client rank) or (EVAL, S-server): what to take next."""
        raise NotImplementedError

    def receive_model(self, src: int):
        """The first part of the next returned model."""
        raise NotImplementedError

    def advance_clock(self, cid: int) -> None:
        """The simulated time once client `cid`'s model is back."""
        raise NotImplementedError

    def start_replacement(self, cid: int) -> None:
        raise NotImplementedError

    def pause(self, version: int) -> None:
        """Mid-run checkpoint of update `version`: hold the client ranks at the cut (arrival only)."""

    def go_on(self, version: int) -> None:
        """The checkpoint is written: the client ranks may go on (arrival only)."""

    # ------------------------------------------------------------------ the steps
    def start_client(self, cid: int) -> None:
        for kind, packed in self.global_model.items():
            self.t.send(self.world.rank_of(cid), kind, packed, round=self.version, client=cid)
        self.starts[self.world.rank_of(cid)] += 1
        self.sim_start[cid] = self.sim_now
        if self.algo.updates_from_start_models:
            self.started_from[cid] = self.version
            self.models_at.setdefault(self.version, self.global_model)

    def take_return(self, src: int) -> None:
        """A returned model with its figures; every Q_c of them make a global update; its client's replacement
        starts from the newest global model."""
        t, msg = self.t, self.receive_model(src)
        cid = msg.client
        returned = recv_models(t, msg, self.parts)
        local = recv_report(t, src, CLIENT_ROUND, client=cid)
        self.local_stats[cid] += [local[name] for name, _ in CLIENT_ROUND.fields]
        rank_report = recv_report(t, src, RANK_REPORT, round=msg.round)
        self.counters[src], self.resident[src] = rank_report["counters"], rank_report["resident_bytes"]
        self.participations[cid] += 1
        self.advance_clock(cid)
        self.buffer.append(Returned(returned, cid, self.start_model(cid)))
        if len(self.buffer) == self.algo.model_buffer:
            self.update()
        self.start_replacement(cid)

    def update(self) -> None:
        """The new global model from the buffer; its evaluation asked for; a mid-run checkpoint's cut taken."""
        buffer, cids = self.buffer, [b.client for b in self.buffer]
        self.global_model = {
            kind: self.algo.global_update(kind, self.global_model[kind], [b.parts[kind] for b in buffer],
                                          [b.started[kind] for b in buffer] if buffer[0].started else None, cids,
                                          template)
            for kind, template in self.templates.items()}
        buffer.clear()
        self.update_clock[self.version] = (time.perf_counter() - self.start, self.sim_now)
        self.participations_at[self.version] = self.participations.copy()
        if self.requested < self.cfg.rounds:
            for kind, packed in self.global_model.items():
                self.t.send(S_SERVER, Kind.EVAL, packed, round=self.version, part=int(kind))
            self.requested += 1
        if self.version in self.cuts:
            self.cut_states[self.version] = self.own_state()
            self.pause(self.version)
        self.version += 1

    def start_model(self, cid: int) -> dict | None:
        """The global model client `cid`'s returned one started from (None: the method does not use it); versions
        no active client started from are dropped, so at most C + 1 global models are kept."""
        if not self.algo.updates_from_start_models:
            return None
        started = self.models_at[self.started_from.pop(cid)]
        in_use = {*self.started_from.values(), self.version}
        for version in [v for v in self.models_at if v not in in_use]:
            del self.models_at[version]
        return started

    def take_evaluation(self, src: int) -> None:
        """An evaluation result: its row, then the stop rule; a mid-run checkpoint once its row is in."""
        if src != S_SERVER:
            raise ProtocolError(f"EVAL message from rank {src}: only the S-server (rank 1) sends results")
        row = self.evaluation_row()
        self.stopping = (run_finished(row["round"] + 1, row["comm_bytes"], self.cfg.rounds, self.cfg.comm_threshold_mb)
                         or preemption.requested() is not None)
        if self.stopping:
            self.held.append(row)          # written after the drain, with the final counters
            return
        self.records.append(row)
        update = int(row["round"])
        if update in self.cut_states:      # every row up to the cut is in: gather the other ranks' cut states
            self.records.checkpoint(update, lambda: {f"rank{r}": recv_checkpoint(self.t, r, update)
                                                     for r in (*self.world.client_ranks, S_SERVER)},
                                    self.cut_states.pop(update))
            self.go_on(update)

    def evaluation_row(self) -> dict:
        """Receives one evaluation result (and the S-server's report) and returns its metrics row. Participations
        and the algorithm's S-server figures are as of the update (with the simulated schedule, the same every run);
        byte figures are the sums of every rank's latest report, resident memory each rank's latest."""
        t = self.t
        msg = t.recv(Kind.EVAL, S_SERVER, shape=(EVAL_RESULT.size,), dtype=torch.float64)
        version, result = msg.round, EVAL_RESULT.unpack(msg.tensor)
        s_rep = recv_report(t, S_SERVER, self.s_report, round=version)
        self.counters[S_SERVER] = s_rep["counters"]
        self.resident[F_SERVER], self.resident[S_SERVER] = resident_bytes(), s_rep["resident_bytes"]
        wall, sim = self.update_clock[version]
        row = {"round": version, "test_acc": result["accuracy"], "test_loss": result["loss"],
               **traffic_columns(self.totals()), "wall_time": wall, "simulated_time": sim,
               "eval_seconds": result["seconds"],
               "round_seconds": wall - (self.update_clock[version - 1][0] if version else 0.0),
               "participations_by_client": self.participations_at.pop(version),
               "client_train_seconds": self.local_stats[:, 3].copy(), "sserver_busy_seconds": s_rep["busy_seconds"],
               **{name: s_rep[name] for name in self.algo.server_report_fields()},   # the algorithm's own
               "resident_bytes_by_rank": self.resident.copy(), **no_checkpoint_columns(t.size)}
        if version % self.cfg.runtime.log_interval == 0:
            self.log(f"update {version + 1:4d}/{self.cfg.rounds} | test acc {row['test_acc']:.4f} | loss "
                     f"{row['test_loss']:.4f} | {row['comm_bytes'] / GIB:8.3f} GiB | wall {wall:7.1f} s | "
                     f"simulated {sim:8.1f} s")
        return row

    def totals(self) -> np.ndarray:
        return sum(self.counters.values()) + self.t.counters()

    # ------------------------------------------------------------------ the stop
    def drain(self) -> None:
        """Every client rank takes the starts in flight and reports; then the S-server finishes its evaluations.
        Nothing is left in flight; the last row carries the totals of the whole run."""
        t, world = self.t, self.world
        for r in world.client_ranks:
            t.send(r, Kind.CONTROL, torch.tensor([self.starts[r]], dtype=torch.int64), round=FINAL)
        for r in world.client_ranks:
            self.take_late_returns(r)
        # (a rank may have sent its state for a mid-run checkpoint that the stop came before: dropped)
        self.final_states = {f"rank{r}": recv_checkpoint(t, r, FINAL, drop_others=True) for r in world.client_ranks}
        sent = self.requested - world.start_round       # evaluations this run asked for (a resumed run starts later)
        t.send(S_SERVER, Kind.CONTROL, torch.tensor([sent], dtype=torch.int64), round=FINAL)
        self.final_states["rank1"] = recv_checkpoint(t, S_SERVER, FINAL, drop_others=True)
        while self.held[-1]["round"] + 1 < self.requested:
            t.wait_any([Kind.EVAL], S_SERVER)
            self.held.append(self.evaluation_row())
        self.counters[S_SERVER] = recv_report(t, S_SERVER, self.s_report, round=FINAL)["counters"]
        t.flush()
        self.held[-1].update(traffic_columns(self.totals()))

    def take_late_returns(self, r: int) -> None:
        """Client rank r's reports up to its final one: models that came back after the stop are received, not
        used; its counters as of its last report."""
        t = self.t
        while True:
            schema, report, msg = recv_any_report(t, r, [CLIENT_ROUND, RANK_REPORT, FINAL_CLIENT_REPORT])
            if schema is CLIENT_ROUND:
                recv_models(t, t.recv(Kind.CLIENT_MODEL, r, client=msg.client, nbytes=self.parts[Kind.CLIENT_MODEL]),
                            self.parts)
                continue
            self.counters[r] = report["counters"]
            if schema is FINAL_CLIENT_REPORT:
                return

    def finish(self) -> dict:
        for row in self.held:
            self.records.append(row)
        last = int(self.held[-1]["round"])
        states = self.final_states
        self.records.checkpoint(last, lambda: states, self.own_state())
        if preemption.requested() and last < self.cfg.rounds - 1:
            self.log(f"[mpisage] {preemption.requested()}: stopped after update {last + 1} with a checkpoint; run "
                     f"again with resume=auto to continue")
        return self.records.close()


class SimulatedFServer(AsyncFServer):
    """Returned models in simulated-time order; the schedule's drawn clients started."""

    def __init__(self, algo, log):
        super().__init__(algo, log)
        self.schedule = algo.simulated_schedule(max(self.cfg.rounds - self.world.start_round, 0),
                                                self.world.start_round)
        self.returns = iter([step for step in self.schedule.steps if not np.isnan(step.returned)])
        self.next_return = next(self.returns, None)
        self.step = None                 # the schedule step of the model being taken
        self.sim_offset = self.sim_now
        self.cuts = {u for _, u in checkpoint_cuts(algo, self.schedule)}

    def start_first_clients(self) -> None:
        for cid in self.schedule.first_clients:
            self.start_client(cid)

    def next_message(self) -> tuple[Kind, int]:
        wanted = [] if self.next_return is None else [(Kind.CLIENT_MODEL, self.world.rank_of(self.next_return.client))]
        return self.t.wait_first([(Kind.EVAL, S_SERVER)] + wanted)

    def receive_model(self, src: int):
        self.step, self.next_return = self.next_return, next(self.returns, None)
        return self.t.recv(Kind.CLIENT_MODEL, src, client=self.step.client,
                           round=self.world.start_round + self.step.version, nbytes=self.parts[Kind.CLIENT_MODEL])

    def advance_clock(self, cid: int) -> None:
        if self.step.update >= 0:
            self.sim_now = self.sim_offset + self.schedule.update_times[self.step.update]

    def start_replacement(self, cid: int) -> None:
        if self.step.replacement >= 0:
            self.start_client(self.step.replacement)


class ArrivalFServer(AsyncFServer):
    """Returned models as they arrive; each replacement drawn then; mid-run checkpoints pause the client ranks."""

    def __init__(self, algo, log):
        super().__init__(algo, log)
        self.pool = ClientPool(self.world.num_clients, self.rng)
        self.cuts = {u for u in range(self.world.start_round, self.cfg.rounds) if midrun_checkpoint_due(self.cfg, u)}

    def start_first_clients(self) -> None:
        for _ in range(self.algo.active):
            self.start_client(self.pool.draw())

    def next_message(self) -> tuple[Kind, int]:
        return self.t.wait_any([Kind.EVAL, Kind.CLIENT_MODEL])      # results first: models must not starve them

    def receive_model(self, src: int):
        return self.t.recv(Kind.CLIENT_MODEL, src, clients_of=self.world.clients_of,
                           nbytes=self.parts[Kind.CLIENT_MODEL])

    def advance_clock(self, cid: int) -> None:
        self.sim_now = max(self.sim_now, self.sim_start[cid] + self.algo.participation_seconds(cid))

    def start_replacement(self, cid: int) -> None:
        self.start_client(self.pool.replace(cid))

    def pause(self, version: int) -> None:
        for r in self.world.client_ranks:
            self.t.send(r, Kind.CONTROL, torch.zeros(1, dtype=torch.int64), round=version)

    def go_on(self, version: int) -> None:
        self.pause(version)          # the same message: the client rank waits for it to go on
