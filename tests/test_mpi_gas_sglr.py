"""Multi-rank runs of the two other systems: GAS (asynchronous) and SGLR (lockstep parallel split learning). Their
byte counters must match a hand count of one iteration, and their metrics and checkpoints are written like every
other method's. Inside the same runs, recorders on the S-server and the client ranks check the GAS paper's rules:
every GAS server batch holds all the real activations and, once every label has statistics, tops every label up to B, the running statistics
equal those of all activations concatenated, and what each SGLR client receives over MPI is the element-wise mean
of the slices (for the sampled receivers) or its own slice (for the rest), recomputed independently."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import on_root, run_job, write_on_root

from mpisage.runtime.transport import HEADER_BYTES, S_SERVER

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


def _record_sglr(monkeypatch):
    """S-server: for every iteration, the slices and their mean recomputed from the uploads through a copy of the
    model before its step. Clients: every gradient received, by (client, round, seq)."""
    from mpisage.runtime.protocol import ClientLink
    from mpisage.algorithms.sglr import Sglr
    from mpisage.runtime.transport import Kind
    expected, received = {}, {}
    on_upload, receive = Sglr.on_upload, ClientLink.receive

    def recording_upload(self, s, round, cid, seq, z, y):
        pending = dict(s.pending)
        last = cid not in pending and len(pending) + 1 == self.world.num_clients
        before = copy.deepcopy(s.model) if last else None
        replies = on_upload(self, s, round, cid, seq, z, y)
        if last:
            pending[cid] = (z, y)
            cids = sorted(pending)
            z_all = torch.cat([pending[c][0] for c in cids]).detach().clone().requires_grad_(True)
            logits, y_all = before(z_all), torch.cat([pending[c][1] for c in cids])
            if self.cfg.sglr.loss == "softmax_bce":     # the authors' criterion, independently: BCELoss after a softmax
                torch.nn.BCELoss()(logits.softmax(1), F.one_hot(y_all, logits.shape[1]).float()).backward()
            else:
                F.cross_entropy(logits, y_all).backward()
            expected[(round, seq)] = dict(zip(cids, z_all.grad.split([len(pending[c][1]) for c in cids])))
        return replies

    def recording_receive(self, kind, seq=None, **expect):
        tensor = receive(self, kind, seq, **expect)
        if kind == Kind.GRADIENT:
            received[(self.cid, self.round, seq)] = tensor.detach().clone()
        return tensor

    monkeypatch.setattr(Sglr, "on_upload", recording_upload)
    monkeypatch.setattr(ClientLink, "receive", recording_receive)
    return expected, received


def _gather_on_sserver(received: dict) -> dict:
    """Every client rank sends its received gradients to the S-server rank as raw arrays (keys, then values)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.Get_rank() > S_SERVER:
        keys = sorted(received)
        values = [received[k].double().flatten().numpy() for k in keys]
        comm.Send(np.array([len(keys)], dtype=np.int64), dest=S_SERVER)
        comm.Send(np.array(keys, dtype=np.int64).reshape(-1, 3), dest=S_SERVER)
        comm.Send(np.array([len(v) for v in values], dtype=np.int64), dest=S_SERVER)
        comm.Send(np.concatenate(values) if values else np.empty(0), dest=S_SERVER)
        return {}
    out = {}
    if comm.Get_rank() == S_SERVER:
        for rank in range(S_SERVER + 1, comm.Get_size()):
            n = np.empty(1, dtype=np.int64)
            comm.Recv(n, source=rank)
            keys, sizes = np.empty((n[0], 3), dtype=np.int64), np.empty(n[0], dtype=np.int64)
            comm.Recv(keys, source=rank)
            comm.Recv(sizes, source=rank)
            flat = np.empty(sizes.sum())
            comm.Recv(flat, source=rank)
            for key, part in zip(keys, np.split(flat, np.cumsum(sizes)[:-1])):
                out[tuple(int(k) for k in key)] = torch.from_numpy(part)
    return out


def test_sglr_round_bytes_count_the_broadcast_mean_once_in_the_paper_figure_and_every_copy_on_the_wire(fmnist, shared_tmp, monkeypatch):
    from mpisage.runtime.transport import Kind
    expected, received = _record_sglr(monkeypatch)
    run_dir = os.path.join(shared_tmp, "sglr")
    run_job(["algorithm=sglr", f"dataset.root={fmnist}", "num_clients=4", "rounds=2", "batch_size=10",
             "sglr.avg=sampled", "sglr.avg_fraction=0.5", "eval.samples=20", f"run_dir={run_dir}"])

    def check():
        from mpisage.runtime.metrics import read_rounds
        r = read_rounds(os.path.join(run_dir, "metrics.h5"))
        paper, wire, msgs = r["paper_bytes_by_kind"], r["wire_bytes_by_kind"], r["messages_by_kind"]
        per_round = np.diff(np.concatenate([[0], r["comm_bytes"]]))
        return [*per_round, *paper[-1, [Kind.ACTIVATION, Kind.GRADIENT, Kind.CLIENT_MODEL]],
                msgs[-1, Kind.GRADIENT], msgs[-1, Kind.EVAL], np.isfinite(r["test_acc"]).all(),
                os.path.exists(os.path.join(run_dir, "checkpoint_round000001.h5")), wire[-1, Kind.GRADIENT]]

    got = on_root(check)
    # one iteration: each of 4 clients uploads a batch of 10; 2 of them (phi = 0.5) get the one broadcast mean, in
    # the paper figure once, and 2 their own slice: 3 gradient payloads in the paper figure, 4 messages on the wire
    batch = 10 * CNN_ACT
    one_iteration = (4 + 3) * batch
    assert list(got[:2]) == [4 * one_iteration] * 2           # 4 iterations (40 samples, batch 10) per round
    assert list(got[2:5]) == [2 * 4 * 4 * batch, 2 * 4 * 3 * batch, 0]   # client models never travel
    assert got[5] == 2 * 4 * 4                # one gradient message per client per iteration, mean or own
    assert got[6] >= 2 * 4 and got[7] and got[8]
    assert got[9] == got[5] * (batch + HEADER_BYTES)           # the wire figure: every copy, with its header

    gathered = _gather_on_sserver(received)

    def check_gradients():
        means_per_iteration, receiver_sets, not_full_mean = [], set(), False
        for (round, seq), slices in expected.items():
            got = {cid: gathered[(cid, round, seq)].view_as(own).to(own.dtype) for cid, own in slices.items()}
            receivers = sorted(cid for cid, own in slices.items() if not torch.allclose(got[cid], own, atol=1e-9))
            if receivers:     # eq. 15: the mean over the receivers' slices only, the same tensor to each of them
                mean = torch.stack([slices[c] for c in receivers]).mean(0)
                for cid in receivers:
                    assert torch.allclose(got[cid], mean, atol=1e-9), f"client {cid} got neither its slice nor " \
                                                                      f"the receivers' mean at {round}/{seq}"
                not_full_mean |= not torch.allclose(mean, torch.stack(list(slices.values())).mean(0), atol=1e-9)
            means_per_iteration.append(len(receivers))
            receiver_sets.add(tuple(receivers))
        return [len(expected), len(gathered), min(means_per_iteration), max(means_per_iteration), len(receiver_sets),
                not_full_mean]

    iterations, gradients, fewest, most, distinct_sets, not_full_mean = on_root(check_gradients, root=S_SERVER)
    assert iterations == 2 * 4 and gradients == 2 * 4 * 4      # 2 rounds x 4 iterations, 4 clients each
    assert fewest == most == 2             # phi = 0.5 of 4 clients get the mean in every iteration ...
    assert distinct_sets > 1 and not_full_mean   # ... sampled afresh each iteration, and not the mean of all 4


def test_sglr_phased_final_sends_everyone_the_mean_of_all_slices_in_the_final_half_with_softmax_bce(
        fmnist, shared_tmp, monkeypatch):
    from mpisage.runtime.transport import Kind
    expected, received = _record_sglr(monkeypatch)
    run_dir = os.path.join(shared_tmp, "sglr_final")
    run_job(["algorithm=sglr", f"dataset.root={fmnist}", "num_clients=4", "rounds=2", "batch_size=10",
             "sglr.avg=phased_final", "sglr.avg_fraction=0.5", "sglr.loss=softmax_bce", "eval.samples=20",
             "checkpoint.interval=0", f"run_dir={run_dir}"])

    def check():
        from mpisage.runtime.metrics import read_rounds
        r = read_rounds(os.path.join(run_dir, "metrics.h5"))
        return [r["paper_bytes_by_kind"][-1, Kind.GRADIENT], r["messages_by_kind"][-1, Kind.GRADIENT]]

    paper, messages = on_root(check)
    batch = 10 * CNN_ACT
    # round 0: 4 iterations x 4 own slices; round 1 (the final half): 4 iterations x one broadcast mean
    assert paper == (4 * 4 + 4 * 1) * batch and messages == 2 * 4 * 4
    gathered = _gather_on_sserver(received)

    def check_gradients():
        kinds = []
        for (round, seq), slices in expected.items():
            mean = torch.stack(list(slices.values())).mean(0)
            for cid, own in slices.items():
                got = gathered[(cid, round, seq)].view_as(own).to(own.dtype)
                is_own = torch.allclose(got, own, rtol=1e-4, atol=1e-9)
                is_mean = torch.allclose(got, mean, rtol=1e-4, atol=1e-9)
                assert is_own != is_mean, f"client {cid} at {round}/{seq}: own {is_own}, mean {is_mean}"
                kinds.append((round, is_mean))
        return [len(kinds), kinds.count((0, False)), kinds.count((1, True))]

    count, own_in_round0, mean_in_round1 = on_root(check_gradients, root=S_SERVER)
    assert count == 2 * 4 * 4 and own_in_round0 == mean_in_round1 == 4 * 4


def _record_gas(monkeypatch):
    """S-server: the buffer (real activations, labels, weights) and the batch of every server step, the server
    state itself (for its final statistics), and its figures right after a resume restored it."""
    from mpisage.algorithms.gas import Gas
    steps, servers, restored = [], [], []
    from mpisage.algorithms.gas import GasServer
    server_batch, make_server, restore_server = Gas.server_batch, Gas.make_server, GasServer.load_state_dict

    def recording_batch(self, s):
        real = [(z.clone(), y.clone(), w) for z, y, w in s.buffer]
        z, y = server_batch(self, s)
        steps.append((real, z.clone(), y.clone()))
        return z, y

    def recording_server(self):
        servers.append(make_server(self))
        return servers[-1]

    def recording_restore(s, flat, prefix, device=None):
        restore_server(s, flat, prefix, device)
        restored.append(_server_figures(s))

    monkeypatch.setattr(Gas, "server_batch", recording_batch)
    monkeypatch.setattr(Gas, "make_server", recording_server)
    monkeypatch.setattr(GasServer, "load_state_dict", recording_restore)
    return steps, servers, restored


def test_gas_answers_every_activation_counts_every_model_and_resumes(fmnist, shared_tmp, monkeypatch):
    from mpisage.algorithms.gas import LabelStatistics
    from mpisage.runtime.transport import Kind
    steps, servers, restored = _record_gas(monkeypatch)
    run_dir = os.path.join(shared_tmp, "gas")
    # Every client active (C = K): a finished client has no inactive one to hand over to and goes again itself.
    run_job(["algorithm=gas", "model=alexnet", f"dataset.root={fmnist}", "num_clients=4",
             "asynchronous.active_clients=4",
             "asynchronous.local_iters=2", "rounds=3", "batch_size=8", "optim.name=sgd", "optim.lr=0.01",
             "gas.covariance=diag",
             "eval.samples=20", f"run_dir={run_dir}"])

    def check():
        from mpisage.runtime.metrics import read_rounds
        r = read_rounds(os.path.join(run_dir, "metrics.h5"))
        paper, msgs = r["paper_bytes_by_kind"][-1], r["messages_by_kind"][-1]
        return [len(r["round"]), paper[Kind.ACTIVATION], paper[Kind.GRADIENT], msgs[Kind.ACTIVATION],
                paper[Kind.CLIENT_MODEL], msgs[Kind.CLIENT_MODEL], r["participations_by_client"][-1].sum(),
                r["generated_samples"][-1], np.all(np.diff(r["simulated_time"]) >= 0), np.isfinite(r["test_acc"]).all(),
                any(f.startswith("checkpoint_") for f in os.listdir(run_dir))]

    got = on_root(check)
    rows, act, grad, act_msgs, model, model_msgs, participations, generated, clock_ok, finite, ckpt = got
    assert rows == 3
    assert act == grad == act_msgs * 8 * ALEX_ACT          # every activation (a full batch of 8) answered once
    assert act_msgs >= 3 * 4 * 2                           # 3 updates x Q_c = 4 models x E = 2 iterations
    assert model == model_msgs * ALEX_CLIENT               # starts and returns, each one client model
    assert model_msgs >= 4 + participations and participations >= 3 * 4
    assert generated > 0 and clock_ok and finite and ckpt

    def check_server_batches():
        seen, whole, tops = set(), [], 0
        for real, z, y in steps:
            real_z, real_y = torch.cat([r[0] for r in real]), torch.cat([r[1] for r in real])
            assert torch.equal(z[:len(real_z)], real_z) and torch.equal(y[:len(real_y)], real_y), "real ones lost"
            seen |= set(real_y.tolist())
            for label in range(10):
                n_real = int((real_y == label).sum())
                # B = 8, and only once EVERY label has statistics (before that, no label is topped up)
                want = max(8, n_real) if len(seen) == 10 else n_real
                assert int((y == label).sum()) == want, f"label {label}: {int((y == label).sum())} != {want}"
                tops += want > n_real
            whole += [(r[0].flatten(1), r[1], torch.full((len(r[1]),), r[2])) for r in real]
        z, y, w = (torch.cat(parts) for parts in zip(*whole))
        stats = servers[0].statistics
        for label in seen:
            rows = y == label
            truth = LabelStatistics.of(z[rows], w[rows], diagonal=True)
            assert stats[label].weight == pytest.approx(truth.weight, rel=1e-12)
            assert torch.allclose(stats[label].mean, truth.mean, rtol=1e-9, atol=1e-12)
            assert torch.allclose(stats[label].scatter, truth.scatter, rtol=1e-9, atol=1e-12)
        generated_here = sum(len(y) - sum(len(r[1]) for r in real) for real, z, y in steps)
        left_in_buffer = sum(len(b[1]) for b in servers[0].buffer)   # a step not yet due at the stop
        return [len(steps), len(seen), tops, generated_here == servers[0].generated, len(z) + left_in_buffer]

    n_steps, labels_seen, tops, generated_agrees, n_real = on_root(check_server_batches, root=S_SERVER)
    assert n_steps >= 3 and labels_seen == 10 and tops > 0 and generated_agrees
    assert n_real == act_msgs * 8              # every activation the S-server answered is buffered or was stepped on

    # Resumed from the checkpoint of the stop, the run continues: updates 4 and 5 follow 1..3 in the same metrics,
    # every counter and clock goes on from where it was, and the S-server gets back its statistics and buffer.
    before = on_root(lambda: _gas_progress(run_dir))
    at_stop = on_root(lambda: _server_figures(servers[0]), root=S_SERVER)
    run_job(["algorithm=gas", "model=alexnet", f"dataset.root={fmnist}", "num_clients=4",
             "asynchronous.active_clients=4",
             "asynchronous.local_iters=2", "rounds=5", "batch_size=8", "optim.name=sgd", "optim.lr=0.01",
             "gas.covariance=diag",
             "eval.samples=20", f"run_dir={run_dir}", "resume=auto"])
    after = on_root(lambda: _gas_progress(run_dir))
    on_resume = on_root(lambda: restored[0], root=S_SERVER)
    at_end = on_root(lambda: _server_figures(servers[1]), root=S_SERVER)
    assert list(after[:6]) == [0, 1, 2, 3, 4, -1]               # rounds: no gap, no repeat
    assert after[6] and after[7]                                # bytes, participations, clocks never go back
    assert after[8] > before[8] and after[9] > before[9]        # more bytes and participations than before
    assert list(on_resume) == list(at_stop)                     # buffer, steps, generated, statistics weight
    assert at_end[1] > at_stop[1] and at_end[3] > at_stop[3]    # and the server went on stepping
    # resumed once more with nothing left to do: every rank returns at once and the metrics stay as they are
    run_job(["algorithm=gas", "model=alexnet", f"dataset.root={fmnist}", "num_clients=4",
             "asynchronous.active_clients=4",
             "asynchronous.local_iters=2", "rounds=5", "batch_size=8", "optim.name=sgd", "optim.lr=0.01",
             "gas.covariance=diag",
             "eval.samples=20", f"run_dir={run_dir}", "resume=auto"])
    assert list(on_root(lambda: _gas_progress(run_dir))) == list(after)


def _server_figures(s) -> list:
    return [len(s.buffer), s.steps, s.generated, sum(st.weight for st in s.statistics.values())]


def _gas_progress(run_dir: str) -> list:
    from mpisage.runtime.metrics import read_rounds
    r = read_rounds(os.path.join(run_dir, "metrics.h5"))
    monotone = all(np.all(np.diff(r[key], axis=0) >= 0) for key in ("comm_bytes", "wire_bytes", "wall_time",
                                                                     "simulated_time", "participations_by_client"))
    rounds = list(r["round"]) + [-1] * (6 - len(r["round"]))
    return [*rounds[:6], monotone, bool(np.all(np.diff(r["server_steps"]) >= 0)), r["comm_bytes"][-1],
            r["participations_by_client"][-1].sum()]


def test_gas_simulated_schedule_serves_in_clock_order_and_repeats_exactly(fmnist, shared_tmp, monkeypatch):
    """Injected speeds (client 0 far faster than the rest): the S-server answers activations in the order of the
    straggler clock (the schedule, recomputed from the speeds), the fast client participates most, every
    participation starts from a fresh optimiser, and a second run with the same seed is the same run."""
    from mpi4py import MPI

    import mpisage.algorithms.asynchronous as asynchronous
    from mpisage.algorithms.gas import Gas
    rank = MPI.COMM_WORLD.Get_rank()
    speeds = [(1e10, 5e8), (1.2e9, 2e7), (2e9, 1e7), (1.5e9, 3e7)]
    monkeypatch.setattr(asynchronous, "client_profiles",
                        lambda m, seed: [asynchronous.ClientProfile(*speeds[c % 4]) for c in range(m)])
    served, optimiser_states, schedules = [], [], []
    on_activation, client_iteration = Gas.on_activation, asynchronous.AsyncAlgorithm.client_iteration
    simulated_schedule = asynchronous.AsyncAlgorithm.simulated_schedule

    def recording_activation(self, s, cid, progress, z, y):
        served[-1].append((cid, progress))
        return on_activation(self, s, cid, progress, z, y)

    def recording_iteration(self, c, link, k, x, y):
        optimiser_states.append((k, len(c.optimizer.state)))
        return client_iteration(self, c, link, k, x, y)

    def recording_schedule(self, updates, start_round=0):
        schedules.append(simulated_schedule(self, updates, start_round))
        return schedules[-1]

    monkeypatch.setattr(Gas, "on_activation", recording_activation)
    monkeypatch.setattr(asynchronous.AsyncAlgorithm, "client_iteration", recording_iteration)
    monkeypatch.setattr(asynchronous.AsyncAlgorithm, "simulated_schedule", recording_schedule)
    runs = [os.path.join(shared_tmp, f"gas_simulated{i}") for i in range(2)]
    for run_dir in runs:
        served.append([])
        run_job(["algorithm=gas", "model=alexnet", f"dataset.root={fmnist}", "num_clients=4",
                 "asynchronous.active_clients=2",
                 "asynchronous.local_iters=2", "rounds=3", "batch_size=8", "optim.name=sgd", "optim.lr=0.01",
                 "gas.covariance=diag",
                 "eval.samples=20", f"run_dir={run_dir}"])

    # every participation's first iteration starts with no optimiser state; its second has momentum
    if rank > S_SERVER:
        assert optimiser_states and {n for k, n in optimiser_states if k == 0} == {0}
        assert all(n > 0 for k, n in optimiser_states if k == 1)

    def check_order():
        schedule = schedules[0]
        expected = [(st.client, st.version * 2 + st.seq + 1) for st in schedule.steps]   # n = tE + e
        return [served[0] == expected, served[1] == served[0], len(served[0]),
                all(len(s.steps) == len(schedule.steps) for s in schedules)]

    in_order, repeated, n_served, same_schedule = on_root(check_order, root=S_SERVER)
    assert in_order and repeated and same_schedule and n_served >= 3 * 2 * 2

    def check_metrics():
        from mpisage.runtime.metrics import read_rounds
        a, b = (read_rounds(os.path.join(d, "metrics.h5")) for d in runs)
        # everything the schedule fixes; byte counters in a row are the ranks' latest reports when the row is
        # recorded (a wall-clock cut), so they are not compared here
        differ = [k for k in ("test_acc", "test_loss", "simulated_time", "participations_by_client", "server_steps",
                              "generated_samples") if not np.array_equal(a[k], b[k])]
        same = not differ
        if differ:
            print("differ between the two runs:", {k: (a[k].tolist(), b[k].tolist()) for k in differ}, flush=True)
        schedule = schedules[0]
        counts = a["participations_by_client"][-1]
        return [same, np.allclose(a["simulated_time"], schedule.update_times, rtol=1e-12),
                np.array_equal(counts, schedule.participations(4)), counts[0] == counts.max() > np.median(counts)]

    assert all(on_root(check_metrics))


def test_fed_buff_moves_whole_models_only_and_averages_every_qc_returns(fmnist, shared_tmp):
    """FedBuff on GAS's scheduler: no activation or gradient ever travels; every start and every return carries the
    client AND the server part (the same number of each); every global update is one metrics row on a simulated
    clock that never goes back (two updates may share a time: an update is dated by the latest return so far)."""
    from mpisage.runtime.transport import Kind
    common = [f"dataset.root={fmnist}", "num_clients=4", "asynchronous.active_clients=2",
              "asynchronous.model_buffer=2", "asynchronous.local_iters=3",
              "rounds=3", "batch_size=8", "optim.name=sgd", "optim.lr=0.01", "eval.samples=40", "model=alexnet"]
    run_dir = os.path.join(shared_tmp, "fed_buff")
    run_job(["algorithm=fed_buff", f"run_dir={run_dir}", *common])

    def check():
        from mpisage.models import build_split, state_bytes
        from mpisage.runtime.metrics import read_rounds
        split = build_split("alexnet", in_channels=1, image_size=28, num_classes=10)
        fb = read_rounds(os.path.join(run_dir, "metrics.h5"))
        paper = fb["paper_bytes_by_kind"][-1]
        client_msgs = paper[Kind.CLIENT_MODEL] / state_bytes(split.client)
        server_msgs = paper[Kind.SERVER_MODEL] / state_bytes(split.server)
        returned = fb["participations_by_client"][-1].sum()
        return [paper[Kind.ACTIVATION], paper[Kind.GRADIENT], client_msgs, server_msgs, returned,
                len(fb["round"]), np.isfinite(fb["test_acc"]).all(),
                (np.diff(fb["simulated_time"]) >= 0).all() and fb["simulated_time"][-1] > fb["simulated_time"][0]]

    act, grad, client_msgs, server_msgs, returned, rows, finite, forward = on_root(check)
    assert act == 0 and grad == 0, "FedBuff sent activations or gradients"
    assert client_msgs == server_msgs and client_msgs == int(client_msgs), (client_msgs, server_msgs)
    assert returned >= 3 * 2 and client_msgs >= 2 * returned, "every return and every start carries the model"
    assert rows == 3 and finite and forward


def test_gas_checkpoints_mid_run_at_the_schedules_cut_and_resumes_from_it(fmnist, shared_tmp):
    """checkpoint.interval=2 of 6 updates: checkpoints after updates 2 and 4 while the run goes on, each cut where
    the update completes (the S-server's step count and the F-server's participations in it are those of the
    update's metrics row, not of later); resumed from the first, the run completes without a gap; the same in
    arrival order (the client ranks paused at the update). A budget stop
    that comes after the ranks sent their state for a later cut, and FedBuff (an S-server that only evaluates),
    finish too. CA2FL's cache of client updates is checkpointed at the cut and resumed exactly (two resumptions from
    one cut are the same run), and its bytes per update are those of whole models at every start and return."""
    from mpisage.runtime.checkpoint import list_checkpoints, read_checkpoint
    common = ["model=alexnet", f"dataset.root={fmnist}", "num_clients=4", "asynchronous.active_clients=2",
              "asynchronous.local_iters=2",
              "batch_size=8", "optim.name=sgd", "optim.lr=0.01", "gas.covariance=diag", "eval.samples=20",
              "checkpoint.keep=10"]
    run_dir, resumed = os.path.join(shared_tmp, "gas_cuts"), os.path.join(shared_tmp, "gas_cuts_resumed")
    run_job(["algorithm=gas", "rounds=6", "checkpoint.interval=2", f"run_dir={run_dir}", *common])

    def check_cuts():
        import shutil

        from mpisage.runtime.metrics import read_rounds
        r = read_rounds(os.path.join(run_dir, "metrics.h5"))
        files = list_checkpoints(run_dir)
        out = [[int(read_checkpoint(f, [])[0]["round"]) for f in files] == [1, 3, 5]]
        for path, update in zip(files, (1, 3)):
            _, state = read_checkpoint(path, ["fserver", "rank1"])
            out += [int(state["rank1"]["server/steps"]) == r["server_steps"][update],
                    np.array_equal(state["fserver"]["schedule/participations"].numpy(),
                                   r["participations_by_client"][update]),
                    len(state["fserver"]["metrics/round"]) == update + 1,
                    r["checkpoint_bytes_by_rank"][update].min() > 0]
        out.append(r["checkpoint_bytes_by_rank"][[0, 2, 4]].max() == 0)     # no checkpoint after those updates
        os.makedirs(resumed)
        shutil.copy(files[0], resumed)
        return out

    assert all(on_root(check_cuts))
    run_job(["algorithm=gas", "rounds=6", "checkpoint.interval=2", f"run_dir={resumed}", "resume=auto", *common])
    assert list(on_root(lambda: _gas_progress(resumed)))[:7] == [0, 1, 2, 3, 4, 5, True]

    # arrival order: the F-server pauses the client ranks at the update and lets them go on after writing
    arrival, arrival_resumed = (os.path.join(shared_tmp, f"gas_arrival{i}") for i in range(2))
    run_job(["algorithm=gas", "asynchronous.schedule=arrival", "rounds=5", "checkpoint.interval=2",
             f"run_dir={arrival}",
             *common])

    def check_arrival():
        import shutil
        files = list_checkpoints(arrival)
        os.makedirs(arrival_resumed)
        shutil.copy(files[0], arrival_resumed)
        _, state = read_checkpoint(files[0], ["fserver"])
        return [int(read_checkpoint(f, [])[0]["round"]) for f in files] + [len(state["fserver"]["metrics/round"])]

    assert list(on_root(check_arrival)) == [1, 3, 4, 2]
    run_job(["algorithm=gas", "asynchronous.schedule=arrival", "rounds=5", "checkpoint.interval=2",
             f"run_dir={arrival_resumed}", "resume=auto", *common])
    assert list(on_root(lambda: _gas_progress(arrival_resumed)))[:6] == [0, 1, 2, 3, 4, -1]

    stopped = os.path.join(shared_tmp, "gas_budget")
    run_job(["algorithm=gas", "rounds=50", "checkpoint.interval=1", "comm_threshold_mb=4", f"run_dir={stopped}",
             *common])
    fed_buff = os.path.join(shared_tmp, "fed_buff_cuts")
    run_job(["algorithm=fed_buff", "rounds=3", "checkpoint.interval=1", f"run_dir={fed_buff}", *common])

    def check_stops():
        from mpisage.runtime.metrics import read_rounds
        r = read_rounds(os.path.join(stopped, "metrics.h5"))
        last = [int(read_checkpoint(list_checkpoints(d)[-1], [])[0]["round"]) for d in (stopped, fed_buff)]
        return [1 <= len(r["round"]) < 50, last[0] == r["round"][-1], last[1] == 2,
                len(list_checkpoints(fed_buff)) == 3]

    assert all(on_root(check_stops))

    # CA2FL: its per-client cache of updates and their running sum are in every mid-run checkpoint; two runs resumed
    # from the same cut are the same run (the simulated schedule), and the restored cache is carried on (one update
    # after the cut: two returns, so a client cached at the cut keeps its update, which the resumed run must carry)
    ca2fl = os.path.join(shared_tmp, "ca2fl_cuts")
    run_job(["algorithm=ca2fl", "rounds=3", "checkpoint.interval=2", f"run_dir={ca2fl}", *common])
    again = [os.path.join(shared_tmp, f"ca2fl_resumed{i}") for i in range(2)]
    assert all(on_root(lambda: _ca2fl_cut(ca2fl, again)))
    for d in again:
        run_job(["algorithm=ca2fl", "rounds=3", "checkpoint.interval=2", f"run_dir={d}", "resume=auto", *common])
    assert all(on_root(lambda: _ca2fl_resumed(ca2fl, again)))


def _ca2fl_state(path: str) -> dict:
    """The F-server's CA2FL state in a checkpoint: {client id: cached update} and the cache's running sum."""
    from mpisage.runtime.checkpoint import read_checkpoint
    _, state = read_checkpoint(path, ["fserver"])
    flat = state["fserver"]
    cache = {int(k.split("/")[2].removeprefix("client")): v for k, v in flat.items()
             if k.startswith("algorithm/cache/client") and k.endswith("/client")}
    return {"cache": cache, "sum": flat["algorithm/cache_sum/client"], "global": flat["client/packed"]}


def _ca2fl_cut(run_dir: str, resumed: list[str]) -> list:
    """CA2FL's checkpoint at the first cut holds a cached update for exactly the clients that had returned a model
    by then, and their sum; bytes per update: every start and every return carries the whole model (closed form)."""
    import shutil

    from mpisage.models import build_split, state_bytes
    from mpisage.runtime.checkpoint import list_checkpoints
    from mpisage.runtime.metrics import read_rounds
    from mpisage.runtime.transport import Kind
    r = read_rounds(os.path.join(run_dir, "metrics.h5"))
    files = list_checkpoints(run_dir)
    cut = _ca2fl_state(files[0])
    returned = r["participations_by_client"]
    total = sum(cut["cache"].values())
    split = build_split("alexnet", in_channels=1, image_size=28, num_classes=10)
    paper, returns = r["paper_bytes_by_kind"][-1], int(returned[-1].sum())
    starts = 2 + returns - 1          # C first starts, then a replacement per return but the run's last
    for d in resumed:
        os.makedirs(d)
        shutil.copy(files[0], d)
    return [len(files) == 2, sorted(cut["cache"]) == sorted(np.flatnonzero(returned[1]).tolist()),
            torch.allclose(cut["sum"], total.double(), atol=1e-9, rtol=0),
            returns == 3 * 2, paper[Kind.ACTIVATION] == 0 and paper[Kind.GRADIENT] == 0,
            paper[Kind.CLIENT_MODEL] == (starts + returns) * state_bytes(split.client),
            paper[Kind.SERVER_MODEL] == (starts + returns) * state_bytes(split.server)]


def _ca2fl_resumed(run_dir: str, resumed: list[str]) -> list:
    """The two resumed runs are the same run (rows and final state, to the bit); a client that returned no model after
    the cut keeps the cached update of the checkpoint; the cache's sum is that of its updates."""
    from mpisage.runtime.checkpoint import list_checkpoints
    from mpisage.runtime.metrics import read_rounds
    a, b = (read_rounds(os.path.join(d, "metrics.h5")) for d in resumed)
    same_rows = all(np.array_equal(a[k], b[k]) for k in ("round", "test_acc", "test_loss", "simulated_time",
                                                         "participations_by_client"))
    cut = _ca2fl_state(list_checkpoints(run_dir)[0])
    ends = [_ca2fl_state(list_checkpoints(d)[-1]) for d in resumed]
    same_state = (torch.equal(ends[0]["sum"], ends[1]["sum"]) and torch.equal(ends[0]["global"], ends[1]["global"])
                  and ends[0]["cache"].keys() == ends[1]["cache"].keys()
                  and all(torch.equal(v, ends[1]["cache"][c]) for c, v in ends[0]["cache"].items()))
    after = a["participations_by_client"][-1] - a["participations_by_client"][1]     # returns since the cut
    kept = [c for c in cut["cache"] if after[c] == 0]          # cached at the cut, no return since
    carried = all(c in ends[0]["cache"] and torch.equal(cut["cache"][c], ends[0]["cache"][c]) for c in kept)
    consistent = torch.allclose(ends[0]["sum"], sum(ends[0]["cache"].values()).double(), atol=1e-9, rtol=0)
    return [list(a["round"]) == [0, 1, 2], same_rows, same_state, len(kept) > 0, carried, consistent]
