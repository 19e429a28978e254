"""CA2FL's server step without MPI: the calibrated update against a hand computation on a tiny model (fresh clients,
a stale client, a client twice in one buffer), and its cache through a checkpoint and back, in memory and on disk."""
import types

import pytest
import torch
import torch.nn as nn

from mpisage.algorithms.ca2fl import Ca2fl
from mpisage.config import AsynchronousConfig, Ca2flConfig, ClientStoreConfig, Config
from mpisage.runtime.state import flatten_state, pack_state, unpack_state
from mpisage.runtime.transport import Kind

N = 3        # clients
ETA = 0.5    # the global learning rate (a power of two: the hand computation is exact)


def _ca2fl(backend="memory", tmp_path=None):
    algo = Ca2fl.__new__(Ca2fl)      # the F-server step needs only the config and the client count
    algo.cfg = Config(ca2fl=Ca2flConfig(global_lr=ETA), asynchronous=AsynchronousConfig(model_weighting="equal"),
                      client_store=ClientStoreConfig(backend=backend, directory=str(tmp_path) if tmp_path else None))
    algo.world = types.SimpleNamespace(num_clients=N, device="cpu", num_samples=lambda cid: 1)
    algo.global_lr, algo._cache, algo.cache_sum = ETA, None, {}
    return algo


def _template():
    return nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))


def _state(value: float, batches: int = 0) -> dict[str, torch.Tensor]:
    """A state of the template whose floating entries are `value` + a per-entry offset (all exact in float32)."""
    out = {}
    for i, (name, t) in enumerate(_template().state_dict().items()):
        out[name] = (torch.full(t.shape, float(batches), dtype=t.dtype) if not t.is_floating_point()
                     else torch.full(t.shape, value + 0.25 * i) + 0.125 * torch.arange(t.numel()).view(t.shape))
    return out


def _step(algo, current, returns, template):
    """One global update: `returns` = [(client, start state, returned state)]."""
    cids = [c for c, _, _ in returns]
    packed = algo.global_update(Kind.CLIENT_MODEL, pack_state(current), [pack_state(r) for _, _, r in returns],
                                [pack_state(s) for _, s, _ in returns], cids, template)
    return {k: v.clone() for k, v in unpack_state(packed, template.state_dict()).items()}


def _hand(x, h_mean, terms, m):
    """x + eta (h_t + (1/M) sum(terms)) for every floating entry (the CA2FL step, written out)."""
    return {k: x[k] + ETA * (h_mean[k] + sum(t[k] for t in terms) / m) for k in x if x[k].is_floating_point()}


def _sub(a, b):
    return {k: a[k] - b[k] for k in a if a[k].is_floating_point()}


def test_the_calibrated_update_matches_a_hand_computation_with_a_stale_client_and_a_repeated_one():
    algo, template = _ca2fl(), _template()
    x0 = _state(1.0)
    zero = {k: torch.zeros_like(v) for k, v in _sub(x0, x0).items()}
    # update 1: clients 0 and 1, both from x0; the cache is empty, so v = the mean of their updates
    r0, r1 = _state(1.5, batches=3), _state(0.25, batches=5)
    x1 = _step(algo, x0, [(0, x0, r0), (1, x0, r1)], template)
    d0, d1 = _sub(r0, x0), _sub(r1, x0)
    expected = _hand(x0, zero, [d0, d1], 2)
    for k, v in expected.items():
        assert torch.equal(x1[k], v), k
    assert int(x1["1.num_batches_tracked"]) == 4          # integer buffers: FedBuff's average (3 and 5)
    # update 2: client 2 fresh from x1; client 0 STALE, from x0 again: it counts by the change of its cached update
    r2, r0b = _state(3.0), _state(2.0)
    h1 = {k: (d0[k] + d1[k]) / N for k in d0}
    x2 = _step(algo, x1, [(2, x1, r2), (0, x0, r0b)], template)
    d2, d0b = _sub(r2, x1), _sub(r0b, x0)
    expected = _hand(x1, h1, [d2, _sub(d0b, d0)], 2)
    for k, v in expected.items():
        assert torch.allclose(x2[k], v, atol=1e-6, rtol=0), k
    # update 3: client 1 twice in one buffer: the second time it is calibrated against its first return
    ra, rb = _state(-1.0), _state(0.5)
    h2 = {k: (d0b[k] + d1[k] + d2[k]) / N for k in d0}
    x3 = _step(algo, x2, [(1, x2, ra), (1, x2, rb)], template)
    da, db = _sub(ra, x2), _sub(rb, x2)
    expected = _hand(x2, h2, [_sub(da, d1), _sub(db, da)], 2)
    for k, v in expected.items():
        assert torch.allclose(x3[k], v, atol=1e-6, rtol=0), k
    # the cache holds every client's latest update, and its running sum is their sum
    cache = {c: algo.cache[c].client for c in range(N)}
    for c, d in ((0, d0b), (1, db), (2, d2)):
        assert torch.allclose(cache[c], torch.cat([v.reshape(-1) for v in d.values()]), atol=1e-6, rtol=0)
    assert torch.allclose(algo.cache_sum["client"], sum(v.double() for v in cache.values()), atol=1e-9, rtol=0)


@pytest.mark.parametrize("backend", ["memory", "disk"])
def test_the_cache_survives_a_checkpoint_bit_for_bit(backend, tmp_path):
    """fserver_state -> flat checkpoint tensors -> load_fserver_state in a fresh object: the next update is the same
    to the bit, and only clients that returned a model take room in the store."""
    template = _template()
    first, x0 = _ca2fl(backend, tmp_path), _state(1.0)
    x1 = _step(first, x0, [(0, x0, _state(1.5)), (2, x0, _state(0.75))], template)
    flat, _ = flatten_state(first.fserver_state())
    flat = {f"algorithm/{k}": v.clone() for k, v in flat.items()}
    assert sorted({k.split("/")[2] for k in flat if k.startswith("algorithm/cache/")}) == ["client0", "client2"]
    resumed = _ca2fl(backend, tmp_path)
    resumed.load_fserver_state(flat, "algorithm")
    nxt = [(1, x1, _state(2.5)), (0, x0, _state(-0.5))]       # client 0 stale: its cached update matters
    a, b = _step(first, x1, nxt, template), _step(resumed, x1, nxt, template)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(first.cache_sum["client"], resumed.cache_sum["client"])
    fresh = _ca2fl(backend, tmp_path)                          # without the cache the same returns give another model
    fresh_x = _step(fresh, x1, nxt, template)
    assert not all(torch.equal(a[k], fresh_x[k]) for k in a)


def test_a_nonpositive_global_learning_rate_is_refused_by_name():
    from mpisage.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="ca2fl.global_lr=0.0 is not allowed: must be > 0"):
        load_config(None, ["algorithm=ca2fl", "ca2fl.global_lr=0"])
