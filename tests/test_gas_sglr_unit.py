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
from mpisage.config import Config, GasConfig, OptimConfig, SglrConfig


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
    algo.cfg = Config(batch_size=batch_size, gas=GasConfig(generative=generative, covariance="diag"))
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


def test_no_generation_until_every_label_has_statistics_and_the_ablation_generates_none():
    algo = _gas(batch_size=4)
    s = _buffered(algo, [[0, 0, 1, 1], [2, 2, 2, 1]])
    z, y = algo.server_batch(s)                 # label 3 has no statistics yet: no label is topped up
    assert torch.bincount(y, minlength=4).tolist() == [2, 3, 3, 0] and s.generated == 0
    s.buffer = _buffered(algo, [[3, 0, 0, 0]]).buffer
    z, y = algo.server_batch(s)                 # now every label has them: every label is topped up to B
    assert torch.bincount(y, minlength=4).tolist() == [4, 4, 4, 4] and s.generated == 16 - 4
    ablation = _gas(batch_size=4, generative=False)
    s = _buffered(ablation, [[0, 0, 1, 1], [1, 2, 2, 3]])
    z, y = ablation.server_batch(s)
    assert len(y) == 8 and s.generated == 0


def _exact_covariance(st: LabelStatistics, ridge: float) -> torch.Tensor:
    """The covariance that LabelStatistics.sample's formula draws from, from its pieces."""
    d = st.mean.numel()
    cov = torch.eye(d, dtype=torch.float64) * ridge * (st.weight - st.factor_weight) / st.weight
    if st.factor is not None:
        cov += st.factor.double() @ st.factor.double().T / st.weight
    cov += st.rows.T @ st.rows / st.weight
    return cov


def test_full_covariance_draws_follow_n_of_the_statistics_exactly_across_factor_renewals():
    g = torch.Generator().manual_seed(0)
    d, ridge, running = 6, 1e-3, {}
    mix = torch.randn(d, d, generator=g)
    seen, renewals = [], 0
    for step in range(12):
        z = torch.randn(7, d, generator=g) @ mix + step * 0.1
        w = torch.rand(7, generator=g) + step
        merge_statistics(running, z, torch.zeros(7, dtype=torch.int64), w, diagonal=False)
        seen.append((z, w))
        st = running[0]
        before = st.factor
        st.sample(3, ridge, g, max_rows=10)        # renews the factor whenever G holds more than 10 rows
        renewals += st.factor is not before
        # the draws' covariance, from the factor and the rows, is the statistics' covariance + ridge I
        target = st.scatter / st.weight + ridge * torch.eye(d, dtype=torch.float64)
        assert torch.allclose(_exact_covariance(st, ridge), target, rtol=1e-5, atol=1e-6), step
    assert renewals >= 3
    # the scatter read through all of it is still that of every activation concatenated
    z, w = (torch.cat(parts) for parts in zip(*seen))
    whole = LabelStatistics.of(z, w, diagonal=False)
    assert torch.allclose(running[0].scatter, whole.scatter, rtol=1e-10)
    # restored from its checkpointed scatter, it factorises before its first draw, and draws from the same law
    restored = LabelStatistics.from_scatter(running[0].weight, running[0].mean.clone(), running[0].scatter.clone())
    restored.sample(1, ridge, g)
    assert torch.allclose(_exact_covariance(restored, ridge),
                          running[0].scatter / running[0].weight + ridge * torch.eye(d, dtype=torch.float64),
                          rtol=1e-5, atol=1e-6)
    # and many draws have that mean and covariance
    draws = running[0].sample(200_000, ridge, g, max_rows=10**9).double()
    target = running[0].scatter / running[0].weight + ridge * torch.eye(d, dtype=torch.float64)
    assert torch.allclose(draws.mean(0), running[0].mean, atol=0.02 * target.diagonal().sqrt().max())
    assert torch.allclose(torch.cov(draws.T), target, rtol=0.03, atol=0.03 * target.diagonal().max())


def _sglr(mode, fraction, m=3, rounds=10, loss="ce"):
    algo = Sglr.__new__(Sglr)
    algo.cfg = Config(rounds=rounds, optim=OptimConfig(lr_decay_at=None, grad_clip=0.0),
                      sglr=SglrConfig(avg=mode, avg_fraction=fraction, loss=loss))
    algo.world = types.SimpleNamespace(num_clients=m)
    algo.server_lr = 0.1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4))
    s = SglrServer(model, torch.optim.SGD(model.parameters(), lr=0.1), np.zeros((m, 3)),
                   generator=torch.Generator().manual_seed(3))
    return algo, s


def _one_iteration(algo, s, round, criterion=None):
    """Feeds every client's batch (in a scrambled order) and returns the replies and, recomputed independently
    through the model before its step, every client's slice of the gradient."""
    m = algo.world.num_clients
    before, seen = copy.deepcopy(s.model), s.train_stats[:, 2].copy()
    zs = [torch.randn(5, 6) for _ in range(m)]
    ys = [torch.randint(0, 4, (5,)) for _ in range(m)]
    order = list(range(1, m)) + [0]
    for cid in order[:-1]:
        assert algo.on_upload(s, round, cid, 0, zs[cid], ys[cid]) == []
    replies = algo.on_upload(s, round, order[-1], 0, zs[order[-1]], ys[order[-1]])   # the last: one step, all replies
    z_all = torch.cat(zs).requires_grad_(True)
    logits, y_all = before(z_all), torch.cat(ys)
    loss = criterion(logits, y_all) if criterion else F.cross_entropy(logits, y_all)
    loss.backward()
    assert not all(torch.equal(a, b) for a, b in zip(before.parameters(), s.model.parameters()))  # one step taken
    assert (s.train_stats[:, 2] - seen).tolist() == [5] * m
    return replies, z_all.grad.split(5)


@pytest.mark.parametrize("mode,fraction,round,receivers", [
    ("sampled", 0.5, 0, 2), ("sampled", 1.0, 0, 4), ("phased", 0.5, 4, 4), ("phased", 0.5, 5, 0),
    ("phased_final", 0.3, 6, 0), ("phased_final", 0.3, 7, 4), ("none", 0.5, 0, 0)])
def test_sglr_sends_the_mean_of_the_receivers_slices_to_the_receivers_and_own_slices_to_the_rest(
        mode, fraction, round, receivers):
    algo, s = _sglr(mode, fraction, m=4, rounds=10)
    replies, slices = _one_iteration(algo, s, round)
    assert sorted(r[0] for r in replies) == [0, 1, 2, 3] and all(len(r) == 4 for r in replies)
    own = [cid for cid, _, g, _ in replies if torch.allclose(g, slices[cid], atol=1e-7)]
    mean_set = sorted(set(range(4)) - set(own))
    assert len(mean_set) == receivers
    if receivers:
        # eq. 15: the mean over the receivers' slices only (not over all C), one tensor for all of them
        mean = torch.stack([slices[c] for c in mean_set]).mean(0)
        sent = [g for cid, _, g, _ in replies if cid in mean_set]
        assert all(torch.allclose(g, mean, atol=1e-7) for g in sent) and all(g is sent[0] for g in sent)
        if receivers < 4:
            assert not torch.allclose(mean, torch.stack(slices).mean(0), atol=1e-4)
    # the paper figure counts the broadcast once and every unicast slice once; the wire counts every message
    assert sum(paper for *_, paper in replies) == 4 - receivers + (1 if receivers else 0)


def test_sglr_samples_a_new_active_set_every_iteration():
    algo, s = _sglr("sampled", 0.5, m=4)
    sets = set()
    for _ in range(6):
        replies, slices = _one_iteration(algo, s, 0)
        sets.add(tuple(cid for cid, _, g, _ in replies if not torch.allclose(g, slices[cid], atol=1e-7)))
    assert len(sets) > 1 and all(len(x) == 2 for x in sets)


def test_sglr_softmax_bce_is_the_authors_bce_after_a_softmax():
    algo, s = _sglr("none", 0.5, m=3, loss="softmax_bce")
    bce = nn.BCELoss()       # the authors' criterion on probabilities, mean over samples and classes

    def criterion(logits, y):
        return bce(logits.softmax(1), F.one_hot(y, 4).float())
    replies, slices = _one_iteration(algo, s, 0, criterion)
    assert all(torch.allclose(g, slices[cid], atol=1e-8) for cid, _, g, _ in replies)
    # and it is not cross-entropy's gradient
    algo_ce, s_ce = _sglr("none", 0.5, m=3)
    replies_ce, _ = _one_iteration(algo_ce, s_ce, 0)
    assert not torch.allclose(replies_ce[0][2], replies[0][2], atol=1e-6)


def test_straggler_profiles_and_macs():
    profiles = client_profiles(50, seed=0)
    assert all(1e9 <= p.flops <= 1e10 for p in profiles)
    # 10 MHz of bandwidth at 0.1-1 km gives tens to hundreds of Mbit/s; nearer clients are faster
    assert all(1e6 < p.uplink < 1e9 for p in profiles)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    assert count_macs(conv, torch.zeros(1, 3, 4, 4)) == 8 * 4 * 4 * 3 * 9 + 8 * 4 * 4 * 5


def _reference_clock(pass_s, act_s, model_s, first, replacements, local_iters, n_steps):
    """The straggler clock written out as the GAS paper words it, one client iteration at a time: the active client
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


def test_niidbench_dirichlet_split_unequal_sizes_every_sample_once_and_seeded():
    from mpisage.data import label_histograms, partition
    labels = np.random.default_rng(0).integers(0, 10, 6000)
    parts = partition(labels, 20, "dirichlet_niidbench", alpha=0.1, seed=5)
    every = np.concatenate(parts)
    assert len(parts) == 20 and all(p.dtype == np.int64 for p in parts)
    assert np.array_equal(np.sort(every), np.arange(len(labels)))      # every sample, exactly once
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 10 and sizes.max() > 2 * sizes.min()          # NIID-Bench's floor; unequal sizes
    # Dir(0.1): each client is dominated by few classes
    hist = label_histograms(labels, parts, 10)
    assert np.median(hist.max(1) / hist.sum(1)) > 0.5
    again = partition(labels, 20, "dirichlet_niidbench", alpha=0.1, seed=5)
    other = partition(labels, 20, "dirichlet_niidbench", alpha=0.1, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(parts, other))
    # a huge alpha gives every client about N / m of every class: the split tends to the equal one
    near_iid = partition(labels, 20, "dirichlet_niidbench", alpha=1e5, seed=5)
    assert all(abs(len(p) - 300) <= 20 for p in near_iid)


def test_niidbench_dirichlet_split_refuses_more_clients_than_its_floor_allows():
    from mpisage.data import partition
    with pytest.raises(ValueError, match="at least 10 samples.*lower num_clients"):
        partition(np.arange(100) % 10, 11, "dirichlet_niidbench", alpha=0.5)


@pytest.mark.parametrize("name", ["sglr", "gas", "fed_buff", "ca2fl"])
def test_image_only_methods_refuse_a_language_modelling_dataset(name):
    from mpisage.algorithms import REGISTRY
    from mpisage.config import ConfigError
    world = types.SimpleNamespace(is_token_task=True, data=types.SimpleNamespace(name="e2e"))
    with pytest.raises(ConfigError, match=f"{name} is defined for image classification; e2e"):
        REGISTRY[name](world)


def test_the_clock_charges_an_activation_upload_as_it_travels():
    from mpisage.algorithms.asynchronous import upload_bits
    shape = (32, 64, 7, 7)                   # GAS's AlexNet split at B = 32: 3,136 values per sample
    assert upload_bits(shape, "float32") == 32 * 32 * 3136
    assert upload_bits(shape, "bfloat16") == upload_bits(shape, "float16") == 16 * 32 * 3136
    assert upload_bits(shape, "int8") == 8 * 32 * 3136 + 32 * 32      # and one float32 scale per sample
