"""Exact resume (multi-rank): N rounds in one go and N/2 + resume + N/2 end with the same metrics and weights, for
FSL-SAGE (resuming past a truncated newest checkpoint) and for a gradient-returning baseline (SplitFed v2, whose
metrics file is deleted before resuming: the checkpoint's copy of the rounds restores it)."""
import os

import numpy as np
import pytest
from conftest import on_root, run_job, write_on_root

pytestmark = pytest.mark.mpi(min_size=4)

COMPARED = ("test_acc", "test_loss", "comm_bytes", "server_train_loss", "client_local_loss", "paper_bytes_by_kind")
ALGORITHM_FIGURES = {"fsl_sage": ("align_loss",)}     # the S-server's report fields of the method's own




def _final_state(run_dir):
    from mpisage.runtime.checkpoint import list_checkpoints, read_checkpoint
    _, groups = read_checkpoint(list_checkpoints(run_dir)[-1])
    # the counters, clocks and saved metrics of a resumed run include its own start-up messages and timings
    return {f"{g}/{k}": v for g, ts in groups.items() for k, v in ts.items()
            if not k.startswith(("transport/", "clock/", "metrics/"))}


@pytest.mark.parametrize("method, truncate_newest", [("fsl_sage", True), ("sl_single_server", False)])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(method, truncate_newest, shared_tmp):
    from mpisage.data import write_fashion_mnist_fixture
    from mpisage.runtime.metrics import read_rounds
    data = os.path.join(shared_tmp, "fmnist")
    write_on_root(write_fashion_mnist_fixture, data, 300, 60)
    common = [f"algorithm={method}", f"dataset.root={data}", "num_clients=3", "batch_size=32", "fsl.align_interval=2",
              "fsl.align_steps=3", "fsl.align_buffer_size=100", "runtime.deterministic=true", "seed=5",
              "checkpoint.interval=1",
              "checkpoint.keep=3",
              "client_store.slots=1"]     # every rank's idle clients go through the store
    whole, parts = os.path.join(shared_tmp, "whole"), os.path.join(shared_tmp, "parts")
    run_job(common + ["rounds=4", f"run_dir={whole}"])
    run_job(common + ["rounds=2", f"run_dir={parts}"])          # "pre-empted" after 2 rounds
    if not truncate_newest:       # its metrics file lost: the checkpoint's copy of the rounds must take its place
        write_on_root(os.remove, os.path.join(parts, "metrics.h5"))
    if truncate_newest:                                         # and its newest checkpoint was cut short
        def truncate():
            from mpisage.runtime.checkpoint import list_checkpoints
            newest = list_checkpoints(parts)[-1]
            with open(newest, "r+b") as f:
                f.truncate(os.path.getsize(newest) // 2)
        write_on_root(truncate)
    run_job(common + ["rounds=4", f"run_dir={parts}", "resume=auto"])

    def compare():
        a, b = read_rounds(os.path.join(whole, "metrics.h5")), read_rounds(os.path.join(parts, "metrics.h5"))
        same_metrics = a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True)
                                                    for k in COMPARED + ALGORITHM_FIGURES.get(method, ()))
        wa, wb = _final_state(whole), _final_state(parts)
        same_weights = wa.keys() == wb.keys() and all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
        return [len(a["round"]), len(b["round"]), list(b["round"]) == [0, 1, 2, 3], same_metrics, same_weights,
                len(wa) > 20]

    n_whole, n_parts, rounds_in_order, same_metrics, same_weights, has_state = on_root(compare)
    assert n_whole == 4 and n_parts == 4 and rounds_in_order, "metrics after resume have gaps or duplicates"
    assert has_state
    assert same_metrics, f"{method}: resumed run's metrics differ from the uninterrupted run's"
    assert same_weights, f"{method}: resumed run's final weights and optimiser states differ"
