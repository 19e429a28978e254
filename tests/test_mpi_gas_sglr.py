"""Multi-rank runs of the two other systems: GAS (asynchronous) and SGLR (lockstep parallel split learning). Their
byte counters must match a hand count of one iteration, and their metrics and checkpoints are written like every
other method's."""
import os

import numpy as np
import pytest
from conftest import on_root, run_job, write_on_root

pytestmark = pytest.mark.mpi(min_size=4)

CNN_ACT = 16 * 14 * 14 * 4        # smashed bytes per Fashion-MNIST sample, default CNN
ALEX_ACT = 64 * 7 * 7 * 4         # AlexNet-style split
ALEX_CLIENT = 75_264              # its client model, bytes


@pytest.fixture
def fmnist(shared_tmp):
    from mpisage.data import write_fashion_mnist_fixture
    root = os.path.join(shared_tmp, "fmnist")
    write_on_root(write_fashion_mnist_fixture, root, 160, 40)
    return root


def test_sglr_round_bytes_are_every_clients_batches_up_and_one_gradient_each_down(fmnist, shared_tmp):
    from mpisage.transport import Kind
    run_dir = os.path.join(shared_tmp, "sglr")
    run_job(["algorithm=sglr", f"dataset.root={fmnist}", "num_clients=4", "rounds=2", "batch_size=10",
             "split_avg=sampled", "split_avg_fraction=0.5", "eval_samples=20", f"run_dir={run_dir}"])

    def check():
        from mpisage.metrics import read_rounds
        r = read_rounds(os.path.join(run_dir, "metrics.h5"))
        paper, msgs = r["paper_bytes_by_kind"], r["messages_by_kind"]
        per_round = np.diff(np.concatenate([[0], r["comm_bytes"]]))
        return [*per_round, *paper[-1, [Kind.ACTIVATION, Kind.GRADIENT, Kind.CLIENT_MODEL]],
                msgs[-1, Kind.GRADIENT], msgs[-1, Kind.EVAL], np.isfinite(r["test_acc"]).all(),
                os.path.exists(os.path.join(run_dir, "checkpoint_round000001.h5"))]

    got = on_root(check)
    # one iteration: each of 4 clients uploads a batch of 10 and gets one gradient of the same size back
    one_iteration = 4 * 10 * CNN_ACT
    assert list(got[:2]) == [2 * 4 * one_iteration] * 2       # 4 iterations (40 samples, batch 10) per round
    assert list(got[2:5]) == [2 * 4 * one_iteration, 2 * 4 * one_iteration, 0]   # client models never travel
    assert got[5] == 2 * 4 * 4                # one gradient message per client per iteration, mean or own
    assert got[6] >= 2 * 4 and got[7] and got[8]


def test_gas_answers_every_activation_and_counts_every_model(fmnist, shared_tmp):
    from mpisage.transport import Kind
    run_dir = os.path.join(shared_tmp, "gas")
    run_job(["algorithm=gas", "model=alexnet", f"dataset.root={fmnist}", "num_clients=4", "active_clients=2",
             "local_iters=2", "rounds=3", "batch_size=8", "optimizer=sgd", "lr=0.01", "covariance=diag",
             "eval_samples=20", f"run_dir={run_dir}"])

    def check():
        from mpisage.metrics import read_rounds
        r = read_rounds(os.path.join(run_dir, "metrics.h5"))
        paper, msgs = r["paper_bytes_by_kind"][-1], r["messages_by_kind"][-1]
        return [len(r["round"]), paper[Kind.ACTIVATION], paper[Kind.GRADIENT], msgs[Kind.ACTIVATION],
                paper[Kind.CLIENT_MODEL], msgs[Kind.CLIENT_MODEL], r["participations"][-1].sum(),
                r["generated_samples"][-1], np.all(np.diff(r["simulated_time"]) >= 0), np.isfinite(r["test_acc"]).all(),
                any(f.startswith("checkpoint_") for f in os.listdir(run_dir))]

    got = on_root(check)
    rows, act, grad, act_msgs, model, model_msgs, participations, generated, clock_ok, finite, ckpt = got
    assert rows == 3
    assert act == grad == act_msgs * 8 * ALEX_ACT          # every activation (a full batch of 8) answered once
    assert act_msgs >= 3 * 2 * 2                           # 3 updates x Q_c = 2 models x E = 2 iterations
    assert model == model_msgs * ALEX_CLIENT               # starts and returns, each one client model
    assert model_msgs >= 2 + participations and participations >= 3 * 2
    assert generated > 0 and clock_ok and finite and ckpt
