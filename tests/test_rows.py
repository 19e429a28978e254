"""The rules that live in one place each: the metrics row's columns, the stop rule, the scheduler's draw-and-replace,
the report tags a receiver tells reports apart by."""
import numpy as np
import pytest
import torch

from mpisage.algorithms.asynchronous import ClientPool
from mpisage.roles.records import no_checkpoint_columns, traffic_columns
from mpisage.runtime.metrics import MIB, ROW, run_finished
from mpisage.runtime.protocol import (CLIENT_ROUND, EVAL_RESULT, FINAL_CLIENT_REPORT, RANK_REPORT, RANK_ROUND,
                                      async_sserver_report, client_round_report, sserver_round_report)


def _row(runs: str) -> dict:
    return dict.fromkeys(ROW.names(runs), 0.0)


def test_a_row_must_have_every_declared_column_of_its_kind_and_nothing_else():
    for runs in ("sync", "async"):
        assert ROW.check(_row(runs), runs) is not None
    assert "simulated_time" in ROW.names("async") and "simulated_time" not in ROW.names("sync")
    assert "wire_bytes_by_link" in ROW.names("sync") and "wire_bytes_by_link" not in ROW.names("async")
    missing = _row("sync")
    del missing["comm_bytes"]
    with pytest.raises(KeyError, match="missing columns \\['comm_bytes'\\]"):
        ROW.check(missing, "sync")
    with pytest.raises(KeyError, match="undeclared columns \\['new_figure'\\]"):
        ROW.check({**_row("async"), "new_figure": 1}, "async")
    # an algorithm's own report fields need no declaration
    assert ROW.check({**_row("async"), "server_steps": 3}, "async", ["server_steps"])
    assert "| `comm_bytes` | all |" in ROW.markdown()


def test_the_shared_column_helpers_fill_declared_columns_only():
    totals = np.arange(3 * 9 * 3).reshape(3, 9, 3)
    traffic = traffic_columns(totals)
    assert traffic["comm_bytes"] == totals[1].sum() and traffic["wire_bytes"] == totals[0].sum()
    assert traffic["messages_by_kind"].tolist() == totals[2].sum(axis=1).tolist()
    assert set(traffic) | set(no_checkpoint_columns(4)) <= set(ROW.names("sync")) & set(ROW.names("async"))


def test_the_stop_rule_is_rounds_done_or_the_budget_reached():
    assert run_finished(10, 0, rounds=10, comm_threshold_mb=1)
    assert not run_finished(9, MIB - 1, rounds=10, comm_threshold_mb=1)
    assert run_finished(3, MIB, rounds=10, comm_threshold_mb=1)


def test_the_pool_draws_inactive_clients_and_gives_the_finished_one_back():
    pool = ClientPool(5, torch.Generator().manual_seed(0))
    active = [pool.draw() for _ in range(3)]
    assert len(set(active)) == 3 and sorted(active + pool.inactive) == list(range(5))
    finished = active[0]
    replacement = pool.replace(finished)
    assert replacement != finished and replacement not in active and finished in pool.inactive
    full = ClientPool(2, torch.Generator().manual_seed(0))
    first, second = full.draw(), full.draw()
    assert full.replace(first) == first and full.inactive == []     # C = K: the finished client goes again


def test_every_report_says_which_one_it_is():
    tags = [s.tag for s in (EVAL_RESULT, CLIENT_ROUND, RANK_REPORT, FINAL_CLIENT_REPORT,
                            sserver_round_report(2, {}), async_sserver_report({}))]
    assert 0 not in tags and len(set(tags)) == len(tags)
    assert client_round_report({"x": 1}).tag == CLIENT_ROUND.tag and RANK_ROUND.tag == RANK_REPORT.tag
