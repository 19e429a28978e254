"""What both F-servers keep besides training: the metrics file and its rows (columns declared in
mpisage/runtime/metrics.py ROW), the checkpoint of every rank with its size report, the history a resumed run
starts from, and the traffic totals of every rank's counters."""
from __future__ import annotations

import time

import numpy as np
import torch

from mpisage.config import to_yaml
from mpisage.roles.shared import open_metrics
from mpisage.runtime.checkpoint import write_checkpoint
from mpisage.runtime.metrics import MIB, ROW
from mpisage.runtime.state import flatten_state, state_nbytes


def resume_history(flat: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The metrics rows saved in the F-server's part of a checkpoint."""
    return {k.removeprefix("metrics/"): v.numpy() for k, v in flat.items() if k.startswith("metrics/")}


def traffic_columns(totals: np.ndarray) -> dict:
    """The byte and message columns from the sum of every rank's counters ([wire, paper, messages] x kind x
    destination role)."""
    return {"comm_bytes": int(totals[1].sum()), "wire_bytes": int(totals[0].sum()),
            "paper_bytes_by_kind": totals[1].sum(axis=1), "wire_bytes_by_kind": totals[0].sum(axis=1),
            "messages_by_kind": totals[2].sum(axis=1)}


def no_checkpoint_columns(size: int) -> dict:
    """The checkpoint columns of a row, until a checkpoint after it is written (`Records.checkpoint`)."""
    return {"checkpoint_bytes_by_rank": np.zeros(size, dtype=np.int64), "checkpoint_seconds": 0.0}


class Records:
    """Rank 0's metrics file and checkpoints. `runs`: "sync" or "async" (which of ROW's columns a row has)."""

    def __init__(self, algo, log, history: dict | None, runs: str, unit: str):
        self.algo, self.cfg, self.log, self.runs, self.unit = algo, algo.cfg, log, runs, unit
        self.size = algo.world.transport.size
        self.metrics = open_metrics(algo, history)
        self.extra = [*algo.server_report_fields(), *algo.client_report_fields()]     # the algorithm's own
        self.last: dict | None = None           # the last row written

    def append(self, row: dict) -> None:
        self.metrics.append(ROW.check(row, self.runs, self.extra))
        self.last = row

    def amend_last(self, values: dict) -> None:
        """Figures of the last row written known only later (the checkpoint's cost, idle seconds after it)."""
        self.last.update(values)
        self.metrics.update_last(values)

    def checkpoint(self, round: int, gather, own: dict) -> None:
        """One checkpoint of every rank after `round` (the last row written): `gather()` -> the other ranks' states
        (`rank<r>`), `own` the F-server's; its size and seconds go into that row and the log."""
        began = time.perf_counter()
        ranks = gather()
        ranks["fserver"] = flatten_state({**own, "metrics": {k: torch.from_numpy(v)
                                                             for k, v in self.metrics.history().items()}})
        write_checkpoint(self.cfg.run_dir, round, ranks, {"config": to_yaml(self.cfg)}, self.cfg.checkpoint.keep)
        sizes = np.array([state_nbytes(ranks[f"rank{r}" if r else "fserver"][0]) for r in range(self.size)])
        self.amend_last({"checkpoint_bytes_by_rank": sizes, "checkpoint_seconds": time.perf_counter() - began})
        self.log(f"[mpisage] checkpoint after {self.unit} {round + 1}: {sizes.sum() / MIB:.1f} MiB (largest rank "
                 f"{int(sizes.argmax())}: {sizes.max() / MIB:.1f} MiB), gathered and written in "
                 f"{self.last['checkpoint_seconds']:.1f} s")

    def close(self) -> dict:
        self.metrics.close()
        return self.last or {}
