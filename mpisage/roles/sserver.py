"""The S-server loop: answer every upload of the round (in arrival order, or in the canonical client order when
`runtime.deterministic=true`), report the round to the F-server, then evaluate the averaged client model on the test
set.

A round's evaluation runs in the S-server's idle moments of the next round and is off the round's critical path:
the report that lets the F-server send the averages goes out as soon as the uploads are answered, whether or not
the previous evaluation has finished (it finishes while the F-server averages and the clients start again)."""
from __future__ import annotations

import time

import torch
from mpi4py import MPI

from mpisage.algorithms import Algorithm
from mpisage.algorithms.training import IGNORE_INDEX
from mpisage.roles.shared import eval_templates
from mpisage.runtime.checkpoint import checkpoint_due, restore_rank_state, send_rank_state
from mpisage.runtime.environment import resident_bytes
from mpisage.runtime.protocol import EVAL_RESULT, send_report, sserver_round_report
from mpisage.runtime.state import load_packed, state_nbytes
from mpisage.runtime.transport import F_SERVER, Kind, ProtocolError


def _uploads(algo: Algorithm, round: int, expected: dict[int, int], idle=None):
    """Yields (activation message, labels) for every upload of the round, validated against what each client
    must send: its id is hosted by the sending rank, uploads arrive in sequence, nobody sends too many."""
    world, t = algo.world, algo.world.transport
    per_sample = algo.activation_shape
    clients = range(world.num_clients)
    deterministic = algo.cfg.runtime.deterministic
    if deterministic and algo.schedule == "lockstep":    # iteration k of every client before k + 1 of any
        order = [(cid, seq) for seq in range(max(expected.values())) for cid in clients if seq < expected[cid]]
    elif deterministic and algo.gathers_first_uploads(round):    # every first upload, then the rest
        order = [(cid, 0) for cid in clients] + [(cid, seq) for cid in clients for seq in range(1, expected[cid])]
    elif deterministic:
        order = [(cid, seq) for cid in range(world.num_clients) for seq in range(expected[cid])]
    else:
        order = [(None, None)] * sum(expected.values())
    next_seq = dict.fromkeys(expected, 0)
    for cid, seq in order:
        source = MPI.ANY_SOURCE if cid is None else world.rank_of(cid)
        act = t.recv(Kind.ACTIVATION, source, round=round, client=cid, seq=seq, clients_of=world.clients_of,
                      trailing_shape=per_sample, device=world.device, idle=idle)
        if act.seq != next_seq[act.client] or act.seq >= expected[act.client]:
            raise ProtocolError(f"ACTIVATION from rank {act.source}: client {act.client} sent upload {act.seq} of "
                                f"round {round}; expected upload {next_seq[act.client]} of {expected[act.client]}")
        next_seq[act.client] += 1
        yield act, recv_labels(world, act)


def recv_labels(world, act) -> torch.Tensor:
    """The labels that follow activation message `act`, checked, with the activation itself: one label per sample
    (per position for token targets), each a class or IGNORE_INDEX, and finite activations."""
    labels = world.transport.recv(Kind.LABELS, act.source, round=act.round, client=act.client, seq=act.seq,
                                  dtype=torch.int64, shape=tuple(act.tensor.shape[:world.data.train_y.dim()]),
                                  device=world.device).tensor
    if (((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= world.data.num_classes)).any():
        raise ProtocolError(f"LABELS from rank {act.source}: client {act.client} sent labels outside "
                            f"0..{world.data.num_classes - 1}")
    if not torch.isfinite(act.tensor).all():
        raise FloatingPointError(f"non-finite smashed activations from client {act.client} in round {act.round}")
    return labels


def run_sserver(algo: Algorithm) -> None:
    srv = SServer(algo)
    for round in range(srv.world.start_round, srv.cfg.rounds):
        srv.serve_uploads(round)
        srv.report_round(round)
        stop = srv.await_decision(round)
        srv.take_evaluation(round)
        if checkpoint_due(srv.cfg, round, stop):
            send_rank_state(srv.t, {"server": srv.s.state_dict()}, round)
        if stop:
            srv.finish_evaluation()
            break
    srv.t.flush()


class SServer:
    """The synchronous S-server's state across rounds (the server state; the previous round's evaluation, run in
    idle moments) and one method per step of a round."""

    def __init__(self, algo: Algorithm):
        self.algo, self.world, self.t, self.cfg = algo, algo.world, algo.world.transport, algo.cfg
        self.s = algo.make_server()
        self.report = sserver_round_report(self.world.num_clients, algo.server_report_fields())
        self.eval_modules = eval_templates(algo)     # receive each round's global modules, for evaluation
        self.evaluation, self.eval_round = None, -1  # the previous round's evaluation, run in idle moments
        self.start, self.busy = time.perf_counter(), 0.0     # the round's start, its seconds of computing
        if self.world.resume_from:
            self.s.load_state_dict(restore_rank_state(self.world, "rank1"), "server", self.world.device)

    def serve_uploads(self, round: int) -> None:
        """Every upload of the round answered (`on_upload`'s replies sent with the upload's seq)."""
        algo, world, s = self.algo, self.world, self.s
        self.start, self.busy = time.perf_counter(), 0.0
        s.train_stats[:] = 0
        expected = {cid: algo.expected_uploads(cid) for cid in range(world.num_clients)}
        first_uploads = 0
        for act, labels in _uploads(algo, round, expected, idle=self.evaluate_in_background):
            t0 = time.perf_counter()
            first_uploads += act.seq == 0
            if first_uploads == world.num_clients and act.seq == 0 and algo.gathers_first_uploads(round):
                self.finish_evaluation()     # the last first upload starts a long computation: report round r-1 now
            for reply in algo.on_upload(s, round, act.client, act.seq, act.tensor, labels):
                cid = act.client if reply.client is None else reply.client
                self.t.send(world.rank_of(cid), reply.kind, reply.tensor, round=round, client=cid, seq=act.seq,
                            paper=reply.paper)
            self.busy += time.perf_counter() - t0
        algo.end_server_round(s, round)

    def report_round(self, round: int) -> None:
        send_report(self.t, F_SERVER, self.report, {
            "wait_seconds": self.t.wait_seconds, "busy_seconds": self.busy,
            "round_seconds": time.perf_counter() - self.start, "train_stats": self.s.train_stats,
            **self.algo.server_report(self.s), "resident_bytes": resident_bytes()}, round=round)

    def await_decision(self, round: int) -> bool:
        """The F-server's continue/stop flag (evaluating meanwhile)."""
        return bool(self.t.recv(Kind.CONTROL, F_SERVER, round=round, shape=(1,), dtype=torch.int64,
                                idle=self.evaluate_in_background).tensor.item())

    def take_evaluation(self, round: int) -> None:
        """The round's global modules, to evaluate in the idle moments of the next round (round r-1's evaluation is
        finished first, if the idle moments did not suffice: its modules take round r's now)."""
        self.finish_evaluation()
        for (kind, cid), module in self.eval_modules.items():
            msg = self.t.recv(Kind.EVAL, F_SERVER, round=round, client=cid, part=int(kind),
                              nbytes=state_nbytes(module.state_dict()))
            load_packed(module, msg.tensor)
        self.evaluation, self.eval_round = self.algo.evaluation(self.s, self.eval_modules), round

    def evaluate_in_background(self) -> bool:
        if self.evaluation is None:
            return False
        self.evaluation.step()
        if self.evaluation.done:       # report at once: the F-server writes the round's row when it comes
            self.finish_evaluation()
        return True

    def finish_evaluation(self) -> None:
        if self.evaluation is not None:
            loss, accuracy, seconds = self.evaluation.result()
            send_report(self.t, F_SERVER, EVAL_RESULT, {"loss": loss, "accuracy": accuracy, "seconds": seconds},
                        round=self.eval_round, kind=Kind.EVAL)
            self.evaluation = None
