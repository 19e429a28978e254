"""Multi-rank tests of the runtime and FSL-SAGE (mpirun -n 4: F-server, S-server, 2 client ranks hosting 3
clients, so one rank hosts two virtual clients). Every assertion runs on every rank."""
import os

import numpy as np
import pytest
from conftest import on_root, run_job, write_on_root

pytestmark = pytest.mark.mpi(min_size=4)

HEADER_BYTES = 14 * 8




def _rounds_and_weights(run_dir: str):
    """Rank 0 reads the metrics and the final checkpoint; returns (metrics dict, flat weights) on rank 0."""
    from mpisage.runtime.checkpoint import read_checkpoint
    from mpisage.runtime.metrics import read_rounds
    rounds = read_rounds(os.path.join(run_dir, "metrics.h5"))
    ckpt = sorted(f for f in os.listdir(run_dir) if f.startswith("checkpoint_round"))[-1]
    _, groups = read_checkpoint(os.path.join(run_dir, ckpt))
    # all model, optimiser, buffer and generator state (byte counters and clocks include timing: heartbeats, waits)
    weights = {f"{g}/{k}": v for g, ts in groups.items() for k, v in ts.items()
               if not k.startswith(("transport/", "clock/", "metrics/"))}
    return rounds, weights


def _job_on_fixture(shared_tmp: str, name: str, overrides: list[str]) -> str:
    """Runs a job on the 600/100-image Fashion-MNIST fixture; returns its run_dir."""
    from mpisage.data import write_fashion_mnist_fixture
    data = os.path.join(shared_tmp, "fmnist")
    write_on_root(write_fashion_mnist_fixture, data, 600, 100)
    run_dir = os.path.join(shared_tmp, name)
    run_job([f"dataset.root={data}", *overrides, f"run_dir={run_dir}"])
    return run_dir


def test_deterministic_runs_are_identical(shared_tmp):
    from mpisage.data import write_fashion_mnist_fixture
    data = os.path.join(shared_tmp, "fmnist")
    write_on_root(write_fashion_mnist_fixture, data, 600, 100)
    common = [f"dataset.root={data}", "num_clients=3", "rounds=3", "batch_size=32", "fsl.align_interval=2",
              "fsl.align_steps=5", "fsl.align_buffer_size=100", "runtime.deterministic=true", "seed=7",
              "checkpoint.interval=100"]
    run_a, run_b = os.path.join(shared_tmp, "a"), os.path.join(shared_tmp, "b")
    run_job(common + [f"run_dir={run_a}"])
    run_job(common + [f"run_dir={run_b}"])

    def compare():
        (ra, wa), (rb, wb) = _rounds_and_weights(run_a), _rounds_and_weights(run_b)
        identical_metrics = all(np.array_equal(ra[k], rb[k], equal_nan=True) for k in
                                ("test_acc", "test_loss", "comm_bytes", "server_train_loss", "client_local_loss",
                                 "align_loss", "paper_bytes_by_kind"))
        identical_weights = wa.keys() == wb.keys() and all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
        # the run really trained: accuracy moved and there are weights for every rank
        trained = len(ra["test_acc"]) == 3 and ra["test_acc"][-1] > 0.3 and any(k.startswith("rank3/") for k in wa)
        # blocking alignment (the paper's order): every client takes its aligned aux at step 0 of rounds 0 and 2
        switch = ra["aux_switch_step"]
        blocking = (switch[[0, 2]] == 0).all() and np.isnan(switch[1]).all() and switch.shape == (3, 3)
        # idle seconds by round: never negative, and together the waits the client ranks reported less their
        # start-up (so never more)
        idle, waits = ra["client_idle_seconds_by_rank"][:, 2:], ra["wait_seconds_by_rank"][:, 2:]
        blocking &= bool((idle >= 0).all() and (idle.sum(0) <= waits.sum(0) + 1e-9).all() and idle.sum() > 0)
        return identical_metrics, identical_weights, trained, blocking

    identical_metrics, identical_weights, trained, blocking = on_root(compare)
    assert blocking, "blocking alignment: a client did not take its aligned aux at step 0, or idle seconds are off"
    assert trained, "the deterministic run did not train (accuracy or checkpoint missing)"
    assert identical_metrics, "two deterministic runs with the same seed gave different metrics"
    assert identical_weights, "two deterministic runs with the same seed ended with different weights"


def test_overlapped_alignment_switches_at_a_step_boundary_and_trains(shared_tmp):
    """fsl.align_mode=overlap, one client per client rank (gathered alignment): each client steps on its previous aux
    until the aligned one arrives and reports the step it switched at; the run trains like a blocking one."""
    run_dir = _job_on_fixture(shared_tmp, "overlap", [
        "num_clients=2", "rounds=3", "batch_size=16", "fsl.align_interval=2", "fsl.align_steps=20",
        "fsl.align_buffer_size=100",
        "fsl.align_mode=overlap", "checkpoint.interval=0"])

    def check():
        from mpisage.runtime.metrics import read_rounds
        r = read_rounds(os.path.join(run_dir, "metrics.h5"))
        switch, steps = r["aux_switch_step"], 300 // 16 + 1        # 300 samples per client: 19 steps a round
        aligned = switch[[0, 2]]
        return [len(r["test_acc"]), r["test_acc"][-1], ((aligned >= 0) & (aligned <= steps)).all(),
                aligned.max(), np.isnan(switch[1]).all(), (r["align_seconds"][[0, 2]] > 0).all(),
                r["align_seconds"][1]]

    rows, acc, in_range, latest, none_in_round_1, aligned_secs, secs_round_1 = on_root(check)
    assert rows == 3 and acc > 0.3
    assert in_range and none_in_round_1 and aligned_secs and secs_round_1 == 0
    # the aux cannot be there at step 0 (the S-server aligns once every first upload is in): someone stepped on
    # the old one first
    assert latest > 0


def test_a_slow_evaluation_does_not_hold_the_next_round(shared_tmp, monkeypatch):
    """Evaluation is off the critical path: with an evaluation slower than a round (every test batch sleeps), the
    S-server still reports each round as soon as its uploads are answered, so the F-server sends round r's averages
    before round r-1's evaluation is in (impossible when a report waits for the previous evaluation). Every row is
    still written, in order, and a checkpoint holds every row up to its round."""
    import time

    from mpisage.algorithms.evaluation import Evaluation
    step = Evaluation.step

    def slow_step(self):
        time.sleep(0.5)
        step(self)

    monkeypatch.setattr(Evaluation, "step", slow_step)     # 4 batches: 2 s per evaluation
    run_dir = _job_on_fixture(shared_tmp, "slow_eval", [
        "num_clients=3", "rounds=4", "batch_size=64", "fsl.align_interval=100", "fsl.align_steps=2",
        "fsl.align_buffer_size=64",
        "eval.batch_size=25", "checkpoint.interval=2"])

    def check():
        from mpisage.runtime.checkpoint import read_checkpoint
        from mpisage.runtime.metrics import read_rounds
        r = read_rounds(os.path.join(run_dir, "metrics.h5"))
        evaluated_at = r["wall_time"] + r["eval_lag_seconds"]
        _, groups = read_checkpoint(os.path.join(run_dir, "checkpoint_round000001.h5"), ["fserver"])
        return [list(r["round"]) == [0, 1, 2, 3], np.isfinite(r["test_acc"]).all(), (r["eval_lag_seconds"] >= 0).all(),
                (r["wall_time"][1:] < evaluated_at[:-1]).sum(),
                list(groups["fserver"]["metrics/round"].numpy()) == [0, 1]]

    rows_in_order, finite, lags_ok, overtaken, checkpointed = on_root(check)
    assert rows_in_order and finite and lags_ok, f"rows in order {rows_in_order}, finite {finite}, lags {lags_ok}"
    assert overtaken >= 1, "every round waited for the previous round's evaluation before its averages went out"
    assert checkpointed, "the checkpoint after round 2 does not hold exactly rows 0 and 1"


@pytest.mark.parametrize("wire", ["float32", "bfloat16", "int8"])
def test_resnet18_round_bytes_match_closed_form(wire, shared_tmp):
    """The FSL-SAGE paper's accounting: per round, every uploaded smashed batch (numel x 4 B, ragged last batch at its size) +
    2 x client model per client; plus one aux model per client in alignment rounds. Labels and headers are
    wire-only. Checked to the byte on the ResNet-18 split with a CIFAR-10 fixture. With wire.activations a batch
    costs 2 B per element (bfloat16) or 1 B per element + a 4 B scale per sample (int8)."""
    from mpisage.data import write_cifar10_fixture
    data = os.path.join(shared_tmp, "cifar")
    write_on_root(write_cifar10_fixture, data, 120, 20, n_batches=3)
    run_dir = os.path.join(shared_tmp, f"resnet-{wire}")
    client_b, aux_b = 2_740_048, 8_419_408
    act_per_sample = {"float32": 128 * 4 * 4 * 4, "bfloat16": 128 * 4 * 4 * 2, "int8": 128 * 4 * 4 + 4}[wire]
    uploaded_samples = 3 * (16 + 8)
    base = uploaded_samples * act_per_sample + 3 * 2 * client_b
    expected = [base + 3 * aux_b, base, base + 3 * aux_b]          # rounds 0 and 2 align (l = 2)
    # 4 rounds asked for, but a budget just above the first two rounds' load: the run must stop after round 3
    budget_mib = (sum(expected[:2]) + 1) / 2 ** 20
    # 3 clients x 40 samples, batch 16 -> steps of 16, 16, 8; Q=2 uploads steps 0 and 2 -> 16 + 8 samples
    run_job([f"dataset.root={data}", "dataset=cifar10", "model=resnet18", "num_clients=3", "rounds=4",
             "batch_size=16", "fsl.server_update_interval=2", "fsl.align_interval=2", "fsl.align_steps=1",
             f"comm_threshold_mb={budget_mib}", f"run_dir={run_dir}", "eval.batch_size=20",
             "checkpoint.interval=100", f"wire.activations={wire}"])

    def check():
        from mpisage.runtime.metrics import read_rounds
        from mpisage.runtime.transport import Kind
        r = read_rounds(os.path.join(run_dir, "metrics.h5"))
        per_round = np.diff(np.concatenate([[0], r["comm_bytes"]]))
        wire, paper, msgs = r["wire_bytes_by_kind"][-1], r["paper_bytes_by_kind"][-1], r["messages_by_kind"][-1]
        # the wire figure is the paper figure plus headers on the same kinds plus everything else, by kind
        paper_kinds = [Kind.ACTIVATION, Kind.GRADIENT, Kind.CLIENT_MODEL, Kind.AUX_MODEL, Kind.SERVER_MODEL]
        explained = all(wire[k] == paper[k] + HEADER_BYTES * msgs[k] for k in paper_kinds)
        labels_ok = wire[Kind.LABELS] == 3 * uploaded_samples * 8 + HEADER_BYTES * msgs[Kind.LABELS]
        other_wire_only = all(paper[k] == 0 for k in (Kind.LABELS, Kind.CONTROL, Kind.EVAL, Kind.CHECKPOINT))
        return list(per_round) + [r["wire_bytes"][-1] >= r["comm_bytes"][-1] + wire[Kind.LABELS],
                                  explained, labels_ok, other_wire_only,
                                  msgs[Kind.ACTIVATION] == 3 * 3 * 2, msgs[Kind.AUX_MODEL] == 3 * 2,
                                  r["comm_bytes"][-1], sum(paper)]

    got = on_root(check)
    assert len(got) == 11, f"the run did {len(got) - 8} rounds; the budget should stop it after 3"
    assert list(got[:3]) == expected, f"paper bytes per round {got[:3]} != closed form {expected}"
    assert got[3], "wire figure smaller than paper figure + labels"
    assert got[4], "wire bytes of a paper kind are not its payload + headers"
    assert got[5], "label wire bytes are not 8 B per uploaded sample + headers"
    assert got[6], "a wire-only kind was counted in the paper figure"
    assert got[7] and got[8], "unexpected number of activation or aux-model messages"
    assert got[9] == got[10], "comm_bytes is not the sum of the per-kind paper counters"


def test_transport_validates_headers():
    """A message whose header does not match what the receiver expects is a ProtocolError naming the sender and
    kind; well-formed tensors of every dtype arrive bit-exact and are counted at the send."""
    import torch
    from mpi4py import MPI

    from mpisage.runtime.transport import HEADER_BYTES as HB
    from mpisage.runtime.transport import Kind, ProtocolError, Transport
    comm = MPI.COMM_WORLD.Dup()
    t = Transport(comm, timeout_s=60)
    rank = comm.Get_rank()
    errors = []
    tensors = [torch.arange(15.0).view(3, 5), (torch.arange(4.0) / 3).to(torch.bfloat16), torch.arange(6).view(2, 3),
               torch.arange(6.0).view(2, 3).t()]   # the last is non-contiguous: must arrive in logical order
    if rank == 2:
        for i, x in enumerate(tensors):
            t.send(1, Kind.ACTIVATION, x, round=0, client=0, seq=i)
        t.send(1, Kind.GRADIENT, torch.zeros(2), round=5, client=0)          # wrong round for the receiver
        comm.Isend(np.zeros(3, dtype=np.int64), dest=1, tag=2 * int(Kind.EVAL)).Wait()   # garbage header
        t.flush()
        counted = t.wire_bytes[Kind.ACTIVATION, 1] == sum(HB + x.numel() * x.element_size() for x in tensors)
        errors.append(0.0 if counted else 1.0)
    elif rank == 1:
        for i, x in enumerate(tensors):
            msg = t.recv(Kind.ACTIVATION, 2, round=0, seq=i, clients_of=lambda r: [0])
            ok = msg.tensor.dtype == x.dtype and msg.tensor.shape == x.shape and torch.equal(msg.tensor, x)
            errors.append(0.0 if ok else 1.0)
        for kind, want in ((Kind.GRADIENT, "round is 5, expected 0"), (Kind.EVAL, "not an mpisage header")):
            try:
                t.recv(kind, 2, round=0)
                errors.append(1.0)
            except ProtocolError as e:
                errors.append(0.0 if (want in str(e) and "rank 2" in str(e) and kind.name in str(e)) else 1.0)
    counts = np.array([float(sum(errors))])
    total = np.zeros(1)
    comm.Allreduce(counts, total)
    comm.Free()
    assert total[0] == 0, "transport validation or round trip failed on some rank"
