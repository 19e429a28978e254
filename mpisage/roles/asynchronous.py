"""The client and S-server loops of asynchronous methods (GAS, FedBuff), each split by schedule (simulated,
arrival); the F-server's are in mpisage/roles/async_fserver.py. There are no rounds: a metrics "round" is one global
client-model update of the F-server (every Q_c client models that come back), and the `round` field of an
asynchronous message is the global model version it belongs to.

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
With the simulated schedule a run also checkpoints every `checkpoint.interval` updates while it goes on, cut at
the step that completes the update (`checkpoint_cuts`): each rank sends its state when it has done its part of the schedule
up to that step, the F-server writes once the update's metrics row is in. With `asynchronous.schedule=arrival` the F-server
pauses every client rank at the update instead (a paused rank has no activation unanswered, and the S-server sends
its state once every client rank has paused) and lets them go on once the checkpoint is written.
"""
from __future__ import annotations

import copy
import time

import torch

from mpisage.algorithms.base import PART_KINDS
from mpisage.data import train_transform
from mpisage.roles.shared import shared_modules, shared_templates
from mpisage.roles.sserver import recv_labels
from mpisage.runtime.checkpoint import midrun_checkpoint_due, restore_rank_state, send_rank_state
from mpisage.runtime.environment import resident_bytes
from mpisage.runtime.protocol import (CLIENT_ROUND, EVAL_RESULT, FINAL_CLIENT_REPORT, RANK_REPORT, ClientLink,
                                      async_sserver_report, send_report)
from mpisage.runtime.state import load_packed, pack_state, state_nbytes
from mpisage.runtime.transport import F_SERVER, S_SERVER, Kind, ProtocolError

# The round field of an asynchronous message is the global model version it belongs to (the metrics' "round");
# FINAL marks a rank's last report and the stop.
FINAL = -1


def part_nbytes(algo) -> dict[Kind, int]:
    """The model parts a participation starts from and sends back (GAS: the client part; FedBuff: client and
    server), by message kind, in the order they travel, with their sizes in bytes."""
    return {kind: state_nbytes(module.state_dict()) for kind, module in shared_templates(algo).items()}


def checkpoint_cuts(algo, schedule) -> list[tuple[int, int]]:
    """The mid-run checkpoints of a simulated schedule, as (step index, global update): each is cut at the step
    whose returned model completes its update. Every rank keeps its state as it is when it has done all its work
    of the steps up to the cut and none after, so the checkpoint holds every message before the cut time, none
    after."""
    start = algo.world.start_round
    return [(i, start + step.update) for i, step in enumerate(schedule.steps)
            if step.update >= 0 and midrun_checkpoint_due(algo.cfg, start + step.update)]


def recv_models(t, first, parts: dict[Kind, int], **expect) -> dict[Kind, torch.Tensor]:
    """A model message `first` (the client part) and the other parts that follow it from the same sender."""
    got = {Kind.CLIENT_MODEL: first.tensor}
    for kind, nbytes in parts.items():
        if kind != Kind.CLIENT_MODEL:
            got[kind] = t.recv(kind, first.source, client=first.client, round=first.round, nbytes=nbytes,
                               **expect).tensor
    return got


# ---------------------------------------------------------------------------------------------------- client
class _ClientRank:
    """What both client loops share: the hosted clients (restored on resume), one local iteration, the return of a
    participation's model and figures, and the rank's last report."""

    def __init__(self, algo):
        self.algo, self.world, self.t, self.cfg = algo, algo.world, algo.world.transport, algo.cfg
        self.hosted = algo.client_store(self.world.clients_of(self.world.rank))   # idle clients packed (client_store)
        self.transform = train_transform(self.world.data, self.cfg.dataset.augment)
        self.parts = part_nbytes(algo)
        self.nbytes = self.parts[Kind.CLIENT_MODEL]
        self.uploads, self.busy = 0, 0.0
        self.starts = 0                  # start messages taken
        self.announced = None            # starts the F-server sent in all, once it said stop
        if self.world.resume_from:
            self.hosted.load_state_dict(restore_rank_state(self.world, f"rank{self.world.rank}"))

    def next_start(self):
        """The next start message (for a client this rank hosts) and the global model it begins."""
        msg = self.t.recv(Kind.CLIENT_MODEL, F_SERVER, clients_of=lambda _: self.hosted, nbytes=self.nbytes)
        self.starts += 1
        return msg, recv_models(self.t, msg, self.parts)

    def take_stop(self) -> None:
        self.announced = int(self.t.recv(Kind.CONTROL, F_SERVER, round=FINAL, shape=(1,),
                                         dtype=torch.int64).tensor.item())

    def take_starts_left(self) -> None:
        """Starts sent before the stop reached this rank: taken, not run."""
        while self.starts < self.announced:
            self.next_start()

    def begin(self, c, packed: dict[Kind, torch.Tensor]) -> dict:
        """A participation starts from the global model it was sent, with a fresh optimiser (paper eq. 8: plain local
        steps; no momentum carried over from the client's previous participation); returns its figures."""
        for kind, module in shared_modules(self.algo, c).items():
            load_packed(module, packed[kind])
        c.optimizer.state.clear()
        return dict.fromkeys((name for name, _ in CLIENT_ROUND.fields), 0.0)

    def iterate(self, cid: int, version: int, k: int, stats: dict) -> None:
        """Local iteration k of client `cid`'s participation from global model `version`."""
        c, cfg = self.hosted[cid], self.cfg
        start = time.perf_counter()
        idx = torch.randint(len(c.y), (min(cfg.batch_size, len(c.y)),), generator=c.generator)
        x = self.transform(c.x[idx].to(self.world.device), c.generator)
        y = c.y[idx].to(self.world.device)
        self.algo.client_iteration(c, ClientLink(self.t, cid, version), k, x, y)
        if cfg.asynchronous.straggler_delay_s > 0:     # real heterogeneity, proportional to the client's simulated slowness
            time.sleep(cfg.asynchronous.straggler_delay_s * self.algo.slowness[cid])
        elapsed = time.perf_counter() - start
        self.busy += elapsed
        stats["samples"] += len(y)
        stats["seconds"] += elapsed

    def give_back(self, cid: int, version: int, stats: dict) -> None:
        """The end of a participation: the model and its figures to the F-server, with this rank's counters."""
        t = self.t
        for kind, module in shared_modules(self.algo, self.hosted[cid]).items():
            t.send(F_SERVER, kind, pack_state(module.state_dict()), round=version, client=cid)
        send_report(t, F_SERVER, CLIENT_ROUND, stats, round=version, client=cid)
        send_report(t, F_SERVER, RANK_REPORT, {"wait_seconds": t.wait_seconds, "busy_seconds": self.busy,
                                               "resident_bytes": resident_bytes()}, round=version)
        self.uploads += 1

    def finish(self) -> None:
        """Every hosted client's state for the stop checkpoint, then the rank's last report."""
        t = self.t
        send_rank_state(t, self.hosted.state_dict(), FINAL)
        send_report(t, F_SERVER, FINAL_CLIENT_REPORT, {"uploads": self.uploads, "wait_seconds": t.wait_seconds,
                                                       "busy_seconds": self.busy, "resident_bytes": resident_bytes()},
                    round=FINAL)
        t.flush()


def run_async_client(algo) -> None:
    if algo.cfg.asynchronous.schedule == "simulated":
        return _run_simulated_client(algo)
    rank = _ClientRank(algo)
    t = rank.t
    active: list[list] = []             # [client id, global version it started from, iterations done, stats]
    while rank.announced is None or rank.starts < rank.announced:
        ready = t.probe([Kind.CONTROL, Kind.CLIENT_MODEL], F_SERVER)
        if ready is None and (not active or rank.announced is not None):
            ready = t.wait_any([Kind.CONTROL, Kind.CLIENT_MODEL], F_SERVER)
        if ready is not None and ready[0] == Kind.CLIENT_MODEL:
            msg, packed = rank.next_start()
            if rank.announced is None:
                active.append([msg.client, msg.round, 0, rank.begin(rank.hosted[msg.client], packed)])
        elif ready is not None:
            _obey_control(rank)
            if rank.announced is not None:
                active.clear()          # participations in flight are abandoned: the run is over
        else:
            cid, version, k, stats = active.pop(0)       # one local iteration of the next active client
            rank.iterate(cid, version, k, stats)
            if k + 1 < rank.cfg.asynchronous.local_iters:
                active.append([cid, version, k + 1, stats])
            else:
                rank.give_back(cid, version, stats)
    rank.finish()


def _obey_control(rank: _ClientRank) -> None:
    """The F-server's pause for the mid-run checkpoint of an update, or its stop. Paused, no activation of this
    rank is unanswered (an iteration waits for its gradient), so its state and the S-server's are a cut; the
    F-server says when to go on, or stops the run instead."""
    t = rank.t
    msg = t.recv(Kind.CONTROL, F_SERVER, shape=(1,), dtype=torch.int64)
    if msg.round != FINAL:
        send_rank_state(t, rank.hosted.state_dict(), msg.round)
        t.send(S_SERVER, Kind.CONTROL, torch.zeros(1, dtype=torch.int64), round=msg.round)
        msg = t.recv(Kind.CONTROL, F_SERVER, shape=(1,), dtype=torch.int64)
    if msg.round == FINAL:
        rank.announced = int(msg.tensor.item())


def _run_simulated_client(algo) -> None:
    """The simulated schedule: this rank runs its clients' iterations in simulated-time order (its part of the
    schedule every rank computes), so the S-server, which serves the whole schedule in that order, always waits
    for the message this rank sends next. A stop from the F-server ends it before the next iteration."""
    rank = _ClientRank(algo)
    world, t, cfg, hosted = rank.world, rank.t, rank.cfg, rank.hosted
    schedule = algo.simulated_schedule(max(cfg.rounds - world.start_round, 0), world.start_round)
    stats: dict[int, dict] = {}
    early: dict = {}                    # client id -> its start message, taken before its turn
    sent = 0
    cuts = checkpoint_cuts(algo, schedule)
    for i, step in enumerate(schedule.steps):
        if step.client not in hosted:
            continue
        _pass_cuts(rank, cuts, i)
        cid, version, c = step.client, world.start_round + step.version, hosted[step.client]
        if step.seq == 0:
            if not _await_start(rank, cid, early):
                rank.take_stop()
                break
            started_from, packed = early.pop(cid)
            if started_from != version:
                raise ProtocolError(f"client {cid} was started from global model {started_from}; the schedule says "
                                    f"{version}")
            stats[cid] = rank.begin(c, packed)
        elif t.probe([Kind.CONTROL], F_SERVER):
            rank.take_stop()                 # participations in flight are abandoned: the run is over
            break
        rank.iterate(cid, version, step.seq, stats[cid])
        sent += algo.uses_sserver           # activations sent
        if step.seq + 1 == cfg.asynchronous.local_iters:
            rank.give_back(cid, version, stats.pop(cid))
    else:
        _pass_cuts(rank, cuts, len(schedule.steps))
    if rank.announced is None:
        t.wait_any([Kind.CONTROL], F_SERVER)
        rank.take_stop()
    rank.take_starts_left()
    # the S-server answers exactly this many activations from this rank and skips the rest of its schedule
    t.send(S_SERVER, Kind.CONTROL, torch.tensor([sent], dtype=torch.int64), round=FINAL)
    rank.finish()


def _await_start(rank: _ClientRank, cid: int, early: dict) -> bool:
    """Client `cid`'s start message, in `early`; False when the stop comes first. Starts come in the order the
    F-server drew them; two of this rank's clients may begin their first iterations in the other order, so a start
    that comes early waits in `early`."""
    while cid not in early:
        kind, _ = rank.t.wait_any([Kind.CONTROL, Kind.CLIENT_MODEL], F_SERVER)
        if kind == Kind.CONTROL:
            return False
        msg, packed = rank.next_start()
        early[msg.client] = (msg.round, packed)
    return True


def _pass_cuts(rank: _ClientRank, cuts: list, before: int) -> None:
    """This rank's state for every mid-run checkpoint cut before step `before` (its steps up to the cut done)."""
    while cuts and cuts[0][0] < before:
        send_rank_state(rank.t, rank.hosted.state_dict(), cuts.pop(0)[1])


# ---------------------------------------------------------------------------------------------------- S-server
class _Evaluations:
    """The S-server's queue of global models to evaluate, one test batch at a time in its idle moments, and its
    reports: each result goes to the F-server with the S-server's counters."""

    def __init__(self, algo, s, server_for, figures_for=None):
        """`server_for(version)` -> the server model to evaluate global model `version` with; `figures_for(version)`
        -> the algorithm's report figures (`server_report_fields`) as of that update (default: as they are when
        the result goes out)."""
        self.figures_for = figures_for
        self.algo, self.world, self.t, self.s, self.server_for = algo, algo.world, algo.world.transport, s, server_for
        self.parts = part_nbytes(algo)
        self.report = async_sserver_report(algo.server_report_fields())
        self.queue: list[tuple[int, dict]] = []     # (version, global model parts) waiting
        self.running, self.version, self.done = None, -1, 0
        self.busy, self.start = 0.0, time.perf_counter()

    def take_request(self) -> None:
        version, parts = None, {}
        for kind, nbytes in self.parts.items():       # sent one after another: EVAL keeps them in order
            msg = self.t.recv(Kind.EVAL, F_SERVER, part=int(kind), nbytes=nbytes, round=version)
            version, parts[kind] = msg.round, msg.tensor
        self.queue.append((version, parts))

    def step(self) -> bool:
        """One test batch of the running evaluation (starting the next queued one); False when there is none."""
        if self.running is None:
            if not self.queue:
                return False
            self.version, packed = self.queue.pop(0)
            client = self.world.initial_part("client")
            load_packed(client, packed[Kind.CLIENT_MODEL])
            if Kind.SERVER_MODEL in packed:      # the global model has its own server part (FedBuff)
                server = self.world.initial_part("server")
                load_packed(server, packed[Kind.SERVER_MODEL])
            else:
                server = self.server_for(self.version)
            self.running = self.algo.make_evaluation(server, client)
        self.running.step()
        if self.running.done:
            loss, accuracy, seconds = self.running.result()
            send_report(self.t, F_SERVER, EVAL_RESULT, {"loss": loss, "accuracy": accuracy, "seconds": seconds},
                        round=self.version, kind=Kind.EVAL)
            self.report_counters(self.version, self.figures_for(self.version) if self.figures_for else None)
            self.running, self.done = None, self.done + 1
        return True

    def report_counters(self, version: int, figures: dict | None = None) -> None:
        """The S-server's report: counters, seconds, the algorithm's figures (default: as they are now)."""
        t = self.t
        send_report(t, F_SERVER, self.report, {
            "wait_seconds": t.wait_seconds, "busy_seconds": self.busy,
            "elapsed_seconds": time.perf_counter() - self.start,
            **(self.algo.server_report(self.s) if figures is None else figures),
            "resident_bytes": resident_bytes()}, round=version)

    def answer(self, act) -> None:
        """One activation answered at once with its gradient (algo.on_activation); its seconds count as busy."""
        t0, world, algo = time.perf_counter(), self.world, self.algo
        labels = recv_labels(world, act)
        progress = act.round * self.algo.cfg.asynchronous.local_iters + act.seq + 1          # n = tE + e
        grad = algo.on_activation(self.s, act.client, progress, act.tensor, labels)
        self.t.send(act.source, Kind.GRADIENT, grad, round=act.round, client=act.client, seq=act.seq)
        self.busy += time.perf_counter() - t0


def run_async_sserver(algo) -> None:
    if algo.cfg.asynchronous.schedule == "simulated":
        return _run_simulated_sserver(algo)
    world, t, cfg = algo.world, algo.world.transport, algo.cfg
    s = algo.make_server()
    if world.resume_from:
        s.load_state_dict(restore_rank_state(world, "rank1"), "server", world.device)
    evals = _Evaluations(algo, s, lambda version: copy.deepcopy(s.model))    # the server model as it is now
    expected_evaluations = None
    paused: dict[int, int] = {}         # mid-run checkpoint -> client ranks paused for it so far
    while expected_evaluations is None or evals.done < expected_evaluations:
        if expected_evaluations is not None:         # stopping: finish what was asked, nothing else comes
            if not evals.step():
                t.wait_any([Kind.EVAL], F_SERVER)
                evals.take_request()
            continue
        # The F-server's rare messages first: with C clients there is nearly always an activation waiting, and
        # probing activations first would leave evaluation requests and the stop unread for the whole run.
        kind, src = t.wait_any([Kind.EVAL, Kind.CONTROL, Kind.ACTIVATION], idle=evals.step)
        if kind == Kind.ACTIVATION:
            evals.answer(t.recv(Kind.ACTIVATION, src, clients_of=world.clients_of,
                                trailing_shape=algo.activation_shape, device=world.device))
            evals.step()     # a busy S-server is never idle: evaluate one batch per activation served
        elif kind == Kind.CONTROL and src in world.client_ranks:
            # a client rank paused for a mid-run checkpoint; once every one has, nothing is in flight to or from
            # this rank and its state is the checkpoint's
            update = t.recv(Kind.CONTROL, src, shape=(1,), dtype=torch.int64).round
            paused[update] = paused.get(update, 0) + 1
            if paused[update] == len(world.client_ranks):
                send_rank_state(t, {"server": s.state_dict()}, update)
        elif src != F_SERVER:
            raise ProtocolError(f"{kind.name} message from rank {src}: only the F-server (rank 0) sends these")
        elif kind == Kind.EVAL:
            evals.take_request()
        else:
            msg = t.recv(Kind.CONTROL, F_SERVER, round=FINAL, shape=(1,), dtype=torch.int64)
            expected_evaluations = int(msg.tensor.item())
            send_rank_state(t, {"server": s.state_dict()}, FINAL)      # for the stop checkpoint
    evals.report_counters(FINAL)
    t.flush()


def _run_simulated_sserver(algo) -> None:
    """The simulated schedule: activations are answered in simulated-time order, whatever order they arrive in
    (each client rank sends its own in that order, so the next one is always on its way). A global model is
    evaluated with the server model as it was at its update's simulated time (a snapshot), not whenever its
    request arrives: same seed, same run."""
    srv = _SimulatedSServer(algo)
    for i, step in enumerate(srv.schedule.steps if algo.uses_sserver else ()):
        srv.serve(i, step)
    # the schedule is done (or cut short by a stop): every client rank's total, then the F-server's stop
    srv.await_client_totals()
    while srv.expected is None:
        srv.take(*srv.t.wait_first(srv.from_fserver, idle=srv.evals.step))
    send_rank_state(srv.t, {"server": srv.s.state_dict()}, FINAL)      # for the stop checkpoint
    evals = srv.evals
    while evals.done < srv.expected:
        if not evals.step():
            srv.t.wait_any([Kind.EVAL], F_SERVER)
            evals.take_request()
    evals.report_counters(FINAL)
    srv.t.flush()


class _SimulatedSServer:
    """The simulated-schedule S-server's state: the schedule, the snapshots of the server at each update, the
    evaluations, what each client rank sent and was answered, the checkpoint cuts, the stop."""

    def __init__(self, algo):
        self.algo, self.world, self.t, self.cfg = algo, algo.world, algo.world.transport, algo.cfg
        world, cfg = self.world, self.cfg
        self.s = s = algo.make_server()
        if world.resume_from:
            s.load_state_dict(restore_rank_state(world, "rank1"), "server", world.device)
        self.schedule = algo.simulated_schedule(max(cfg.rounds - world.start_round, 0), world.start_round)
        self.snapshots: dict[int, torch.nn.Module] = {}      # version -> the server model at that update
        self.figures_at: dict[int, dict] = {}        # version -> the algorithm's report figures at that update
        # (a method whose S-server only evaluates, FedBuff, has no snapshots: its figures are those of now)
        self.evals = _Evaluations(algo, s, self.snapshots.pop, lambda v: self.figures_at.pop(v, None))
        self.expected = None                 # evaluations to finish, once the F-server said stop
        self.sent_by = dict.fromkeys(world.client_ranks)     # activations a client rank sent in all, once it stopped
        self.served = dict.fromkeys(world.client_ranks, 0)
        self.cuts = checkpoint_cuts(algo, self.schedule)
        self.from_fserver = [(Kind.EVAL, F_SERVER), (Kind.CONTROL, F_SERVER)]

    def serve(self, i: int, step) -> None:
        """Step i of the schedule: its activation answered (taking any other message that comes first), unless its
        client rank stopped before it."""
        t, world, r = self.t, self.world, self.world.rank_of(step.client)
        while self.sent_by[r] is None or self.served[r] < self.sent_by[r]:
            kind, src = t.wait_first([(Kind.ACTIVATION, r), *self.from_fserver,
                                      *([(Kind.CONTROL, r)] if self.sent_by[r] is None else [])],
                                     idle=self.evals.step)
            if kind != Kind.ACTIVATION:
                self.take(kind, src)
                continue
            self.evals.answer(t.recv(Kind.ACTIVATION, r, round=world.start_round + step.version, client=step.client,
                                     seq=step.seq, trailing_shape=self.algo.activation_shape, device=world.device))
            self.served[r] += 1
            update = world.start_round + step.update
            if step.update >= 0 and update < self.cfg.rounds:
                self.snapshots[update] = copy.deepcopy(self.s.model)
                self.figures_at[update] = self.algo.server_report(self.s)
            if self.cuts and self.cuts[0][0] == i:
                send_rank_state(t, {"server": self.s.state_dict()}, self.cuts.pop(0)[1])
            self.evals.step()     # a busy S-server is never idle: evaluate one batch per activation served
            return

    def take(self, kind: Kind, src: int) -> None:
        """A message other than the next activation: an evaluation request, the stop, a client rank's total."""
        t, cuts = self.t, self.cuts
        if kind == Kind.EVAL:
            self.evals.take_request()
            # a server that only evaluates (FedBuff) has nothing of its own at a cut: its state goes with the request
            while not self.algo.uses_sserver and cuts and cuts[0][1] <= self.evals.queue[-1][0]:
                send_rank_state(t, {"server": self.s.state_dict()}, cuts.pop(0)[1])
        elif src == F_SERVER:
            msg = t.recv(Kind.CONTROL, F_SERVER, round=FINAL, shape=(1,), dtype=torch.int64)
            self.expected = int(msg.tensor.item())
        else:
            self.sent_by[src] = int(t.recv(Kind.CONTROL, src, round=FINAL, shape=(1,),
                                           dtype=torch.int64).tensor.item())
            if self.sent_by[src] < self.served[src]:
                raise ProtocolError(f"client rank {src} says it sent {self.sent_by[src]} activations; "
                                    f"{self.served[src]} were answered")

    def await_client_totals(self) -> None:
        for r in self.world.client_ranks:
            while self.sent_by[r] is None:
                self.take(*self.t.wait_first([(Kind.CONTROL, r), *self.from_fserver], idle=self.evals.step))
            if self.served[r] != self.sent_by[r]:
                raise ProtocolError(f"client rank {r} sent {self.sent_by[r]} activations; {self.served[r]} were "
                                    f"answered")


def part_name(kind: Kind) -> str:
    """client / server / aux: how a global model part is named in the checkpoint."""
    return next(name for name, k in PART_KINDS.items() if k == kind)
