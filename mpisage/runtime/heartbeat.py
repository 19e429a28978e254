"""Liveness: every rank tells its watcher it is alive every `interval` seconds, on its own communicator and thread
(rank 0 watches every rank; the others watch rank 0). A watched rank silent for `timeout` seconds of *watching*
(frozen, stopped, or on a dead node) aborts the whole job with a message naming it, after every rank that still
answers has printed its Python stacks.

Why "seconds of watching" and not wall time: the watcher is a thread of a rank that can itself stall (its process
starved or swapped out, the GIL held by a long C call in its main thread, MPICH's global lock held by a blocking
call). Measured (docs/results.md): rank 0's main thread holding the GIL for 12 s made the old watcher, the moment
it woke, name a healthy peer "silent for 12 s" (timeout 8 s), because the beats that peer had sent meanwhile were
still queued in MPI when it looked. So silence only accrues while the watcher demonstrably runs: each pass of
its loop credits at most `slack` seconds, and each pass drains every beat that has arrived before judging.

A rank that finishes says goodbye, so finishing early is not taken for dying. Its bytes are wire traffic, counted
as CONTROL."""
from __future__ import annotations

import faulthandler
import sys
import threading
import time

import numpy as np
from mpi4py import MPI

from mpisage.runtime.transport import ROLE_NAMES, Kind, Transport, abort_job, role_of

BEAT_TAG, ALARM_TAG = 0, 1
BYE = -1


class SilenceClock:
    """The watcher's decision, free of MPI and of the real clock (so it can be tested with a fake one).
    `tick(now)` at the start of every pass of the watcher's loop, `heard(peer)` for every beat received, `gone(peer)`
    for a goodbye, then `silent_peers()`: the peers silent longer than `timeout` seconds of watching.
    A pass that comes more than `slack` seconds after the previous one means the watcher itself was stalled; only
    `slack` of that gap counts as silence, since the watcher could not have heard anything meanwhile."""

    def __init__(self, peers, timeout: float, slack: float, now: float):
        self.timeout, self.slack = timeout, slack
        self.silence = dict.fromkeys(peers, 0.0)
        self.last_tick = now
        self.stalled = 0.0          # seconds of this watcher's own stalls not counted against its peers

    def tick(self, now: float) -> float:
        """Accrues the silence of this pass; returns how long this watcher was stalled beyond `slack` (0 if not)."""
        gap = max(0.0, now - self.last_tick)
        self.last_tick = now
        credited = min(gap, self.slack)
        for p in self.silence:
            self.silence[p] += credited
        self.stalled += gap - credited
        return gap - credited

    def heard(self, peer: int) -> None:
        if peer in self.silence:
            self.silence[peer] = 0.0

    def gone(self, peer: int) -> None:
        self.silence.pop(peer, None)

    def silent_peers(self) -> list[int]:
        return [p for p, s in self.silence.items() if s > self.timeout]


class Heartbeat:
    """The thread that beats and watches; see the module docstring."""

    def __init__(self, transport: Transport, interval: float, timeout: float):
        self.t, self.interval, self.timeout = transport, interval, timeout
        self.comm = transport.comm.Dup()      # collective: every rank creates its heartbeat together
        self.rank, size = self.comm.Get_rank(), self.comm.Get_size()
        self.others = [r for r in range(size) if r != self.rank]
        self.peers = list(range(1, size)) if self.rank == 0 else [0]
        self.period = min(0.5, interval / 4)
        # A pass later than this after the previous one is the watcher's own stall, not its peers' silence.
        self.slack = max(1.0, 2 * interval)
        self._stop = threading.Event()
        self._dumped = False
        self._thread = threading.Thread(target=self._run, name="mpisage-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def _send(self, dest: int, value: int, tag: int = BEAT_TAG) -> None:
        self.comm.Isend(np.array([value], dtype=np.int64), dest=dest, tag=tag).Free()   # completes in the background
        self.t.count(Kind.CONTROL, dest, 8, header=False)

    def _run(self) -> None:
        inbox = {p: np.zeros(1, dtype=np.int64) for p in self.peers}
        pending = {p: self.comm.Irecv(inbox[p], source=p, tag=BEAT_TAG) for p in self.peers}
        alarm_box = np.zeros(1, dtype=np.int64)
        alarm = self.comm.Irecv(alarm_box, source=MPI.ANY_SOURCE, tag=ALARM_TAG)
        clock = SilenceClock(self.peers, self.timeout, self.slack, time.monotonic())
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            clock.tick(now)
            if now >= next_beat:
                for p in self.peers:
                    self._send(p, 0)
                next_beat = now + self.interval
            if alarm is not None and alarm.Test():
                self._dump_stacks(f"rank {int(alarm_box[0])} raised a heartbeat alarm")
                alarm = None
            # Drain every beat that has arrived (after a stall of this watcher many are queued) before judging.
            for p in list(pending):
                while p in pending and pending[p].Test():
                    if inbox[p][0] == BYE:
                        del pending[p]
                        clock.gone(p)
                    else:
                        clock.heard(p)
                        pending[p] = self.comm.Irecv(inbox[p], source=p, tag=BEAT_TAG)
            silent = clock.silent_peers()
            if silent:
                self._alarm(silent, clock)
            self._stop.wait(self.period)
        for p in self.peers:
            self._send(p, BYE)
        # The communicator is left allocated: freeing it could let a later one reuse its context while a
        # goodbye is still in flight.
        for req in [*pending.values(), *([alarm] if alarm is not None else [])]:
            req.Cancel()
            req.Free()

    def _alarm(self, silent: list[int], clock: SilenceClock) -> None:
        """Every rank that still answers prints its Python stacks, then the job is aborted naming the silent ones."""
        for r in self.others:
            self._send(r, self.rank, tag=ALARM_TAG)
        names = ", ".join(f"rank {p} ({ROLE_NAMES[role_of(p)]})" for p in silent)
        self._dump_stacks(f"it found {names} silent")
        time.sleep(2.0)     # lets the others' stacks reach mpiexec before the abort cuts the forwarders
        own = f"; this watcher was itself stalled {clock.stalled:.0f} s in all, not counted" if clock.stalled else ""
        abort_job(f"[mpisage] {names} stopped answering: no heartbeat for {max(clock.silence[p] for p in silent):.0f} s "
                  f"(runtime.heartbeat_timeout_s={self.timeout:g}{own}); every rank that still answers printed its "
                  f"Python stacks above; aborting all ranks\n")

    def _dump_stacks(self, why: str) -> None:
        if self._dumped:      # once per rank: when rank 0 is the silent one, every other rank raises an alarm
            return
        self._dumped = True
        sys.stderr.write(f"[mpisage] rank {self.rank} ({ROLE_NAMES[role_of(self.rank)]}) Python stacks ({why}):\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
