"""GAS and SGLR pieces that need no MPI: the weighted statistics merge, the generated top-up of the server batch,
SGLR's averaged gradient, and the straggler clock's pieces."""
import copy
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpisage.algorithms.asynchronous import client_profiles, count_macs
from mpisage.algorithms.gas import Gas, GasServer, LabelStatistics, merge_statistics
from mpisage.algorithms.sglr import Sglr, SglrServer


@pytest.mark.parametrize("diagonal", [False, True])
def test_merging_statistics_equals_the_statistics_of_the_concatenated_data(diagonal):
    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g), torch.rand(n, generator=g) + .1)
              for n in (7, 12, 4)]
    running = {}
    for z, y, w in chunks:
        merge_statistics(running, z, y, w, diagonal)
    z, y, w = (torch.cat(parts) for parts in zip(*chunks))
    for label in range(3):
        whole = LabelStatistics.of(z[y == label], w[y == label], diagonal)
        assert running[label].weight == pytest.approx(whole.weight)
        assert torch.allclose(running[label].mean, whole.mean, atol=1e-12)
        assert torch.allclose(running[label].scatter, whole.scatter, atol=1e-10)
    # the scatter is the weighted one: W * covariance of a weighted sample
    rows = y == 0
    centred = z[rows].double() - running[0].mean
    expected = (w[rows].double()[:, None] * centred).T @ centred
    assert torch.allclose(running[0].scatter, expected.diagonal() if diagonal else expected, atol=1e-10)


def _gas(batch_size=8, generative=True, num_classes=4):
    algo = Gas.__new__(Gas)      # the hooks under test need only the config and the class count
    algo.cfg = types.SimpleNamespace(batch_size=batch_size, generative=generative, covariance="diag")
    algo.world = types.SimpleNamespace(data=types.SimpleNamespace(num_classes=num_classes))
    return algo


def _buffered(algo, labels_per_batch, shape=(2, 3, 3)):
    s = GasServer(None, None, None, generator=torch.Generator().manual_seed(1))
    for i, labels in enumerate(labels_per_batch):
        y = torch.tensor(labels)
        s.buffer.append((torch.randn(len(y), *shape) + y.view(-1, 1, 1, 1), y, float(i + 1)))
    return s


def test_generation_tops_every_label_up_to_b_and_keeps_every_real_activation():
    algo = _gas(batch_size=8)
    s = _buffered(algo, [[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 1, 1, 2, 2, 2]])
    real_z = torch.cat([b[0] for b in s.buffer])
    real_y = torch.cat([b[1] for b in s.buffer])
    z, y = algo.server_batch(s)
    assert torch.equal(z[:len(real_z)], real_z) and torch.equal(y[:len(real_y)], real_y)
    counts = torch.bincount(y, minlength=4).tolist()
    assert counts == [max(8, int((real_y == c).sum())) for c in range(4)] == [8, 8, 8, 8]
    assert s.generated == len(y) - len(real_y) == 32 - 16
    # generated activations follow their label's statistics (label c is centred near c here)
    for c in range(4):
        assert abs(z[len(real_z):][y[len(real_y):] == c].mean().item() - c) < 1.0


def test_a_label_never_seen_gets_no_generated_samples_and_the_ablation_generates_none():
    algo = _gas(batch_size=4)
    z, y = algo.server_batch(_buffered(algo, [[0, 0, 1, 1]]))
    assert torch.bincount(y, minlength=4).tolist() == [4, 4, 0, 0]
    ablation = _gas(batch_size=4, generative=False)
    s = _buffered(ablation, [[0, 0, 1, 1], [1, 2, 2, 2]])
    z, y = ablation.server_batch(s)
    assert len(y) == 8 and s.generated == 0


def _sglr(mode, fraction, m=3, rounds=10):
    algo = Sglr.__new__(Sglr)
    algo.cfg = types.SimpleNamespace(split_avg=mode, split_avg_fraction=fraction, rounds=rounds, lr_decay_at=None,
                                     grad_clip=0.0)
    algo.world = types.SimpleNamespace(num_clients=m)
    algo.server_lr = 0.1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4))
    s = SglrServer(model, torch.optim.SGD(model.parameters(), lr=0.1), np.zeros((m, 3)),
                   generator=torch.Generator().manual_seed(3))
    return algo, s


@pytest.mark.parametrize("mode,fraction,receivers", [("phased", 0.5, 3), ("sampled", 0.34, 1), ("none", 0.5, 0)])
def test_sglr_sends_the_mean_of_the_slices_to_its_receivers_and_own_slices_to_the_rest(mode, fraction, receivers):
    algo, s = _sglr(mode, fraction)
    before = copy.deepcopy(s.model)
    zs = [torch.randn(5, 6) for _ in range(3)]
    ys = [torch.randint(0, 4, (5,)) for _ in range(3)]
    assert algo.on_upload(s, 0, 2, 0, zs[2], ys[2]) == [] and algo.on_upload(s, 0, 0, 0, zs[0], ys[0]) == []
    replies = algo.on_upload(s, 0, 1, 0, zs[1], ys[1])        # the last client's batch: one step, every reply
    # the true per-slice gradients of the concatenated mean loss, through the model before its step
    z_all = torch.cat(zs).requires_grad_(True)
    F.cross_entropy(before(z_all), torch.cat(ys)).backward()
    slices = z_all.grad.split(5)
    mean = torch.stack(slices).mean(0)
    assert sorted(r[0] for r in replies) == [0, 1, 2]
    got_mean = [cid for cid, _, g in replies if torch.allclose(g, mean, atol=1e-7)]
    got_own = [cid for cid, _, g in replies if torch.allclose(g, slices[cid], atol=1e-7)]
    assert len(got_mean) == receivers and sorted(got_mean + got_own) == [0, 1, 2]
    assert not all(torch.equal(a, b) for a, b in zip(before.parameters(), s.model.parameters()))  # one step taken
    assert s.train_stats[:, 2].tolist() == [5, 5, 5]


def test_straggler_profiles_and_macs():
    profiles = client_profiles(50, seed=0)
    assert all(1e9 <= p.flops <= 1e10 for p in profiles)
    # 10 MHz of bandwidth at 0.1-1 km gives tens to hundreds of Mbit/s; nearer clients are faster
    assert all(1e6 < p.uplink < 1e9 for p in profiles)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    assert count_macs(conv, torch.zeros(1, 3, 4, 4)) == 8 * 4 * 4 * 3 * 9 + 8 * 4 * 4 * 5


def _reference_clock(pass_s, act_s, model_s, first, replacements, local_iters, n_steps):
    """The straggler clock written out as the spec words it, one client iteration at a time: the active client
    whose clock is earliest acts; its clock advances by backward + forward + upload, or, after its last iteration,
    by backward + model upload, and its replacement inherits that clock. Returns [(time, client)]."""
    clock = {c: pass_s[c] + act_s[c] for c in first}
    done = dict.fromkeys(first, 0)
    out, drawn = [], iter(replacements)
    while len(out) < n_steps:
        cid = min(clock, key=lambda c: clock[c])
        out.append((clock[cid], cid))
        done[cid] += 1
        if done[cid] < local_iters:
            clock[cid] += 2 * pass_s[cid] + act_s[cid]
            continue
        back = clock.pop(cid) + pass_s[cid] + model_s[cid]
        del done[cid]
        nxt = next(drawn, None)             # None: the last update, the run ends
        if nxt is not None:
            clock[nxt], done[nxt] = back + pass_s[nxt] + act_s[nxt], 0
    return out


def test_the_simulated_schedule_is_the_earliest_clock_first_and_fast_clients_go_more_often():
    from mpisage.algorithms.asynchronous import simulate_schedule
    rng = np.random.default_rng(0)
    k, c, e = 8, 3, 4
    pass_s, act_s, model_s = rng.uniform(0.1, 1, k), rng.uniform(0.1, 1, k), rng.uniform(0.5, 2, k)
    pass_s[0], act_s[0] = 0.01, 0.01                       # one client far faster than the rest
    s = simulate_schedule(pass_s, act_s, model_s, c, c, e, 30, torch.Generator().manual_seed(0))
    times = [st.time for st in s.steps]
    assert times == sorted(times)                          # served in simulated-time order
    assert len(s.update_times) == 30 and np.all(np.diff(s.update_times) >= 0)
    replacements = [st.replacement for st in s.steps if st.replacement >= 0]
    ref = _reference_clock(pass_s, act_s, model_s, s.first_clients, replacements, e, len(s.steps))
    assert [st.client for st in s.steps] == [r[1] for r in ref]
    assert [st.time for st in s.steps] == pytest.approx([r[0] for r in ref], rel=1e-12)
    # the Q_c-th returned model makes an update, at the latest return so far
    returns = [st for st in s.steps if not np.isnan(st.returned)]
    assert [st.update for st in returns[c - 1::c]] == list(range(30))
    assert s.update_times[0] == max(st.returned for st in returns[:c])
    counts = s.participations(k)
    assert counts.sum() == 30 * c and counts[0] == counts.max() > np.median(counts)
    again = simulate_schedule(pass_s, act_s, model_s, c, c, e, 30, torch.Generator().manual_seed(0))
    assert again == s                                      # a pure function of speeds and seed


def test_compute_time_is_per_sample_without_the_batch_factor():
    from mpisage.algorithms.asynchronous import ClientProfile
    p = ClientProfile(flops=1e9, uplink=1e8)
    # the authors' AlexNet figures: 5,603,328 MACs per image, 131,072 activation bits per image, batch 32
    assert p.iteration_seconds(5_603_328, 32 * 131_072) == pytest.approx(2 * 5_603_328 / 1e9 + 32 * 131_072 / 1e8)
