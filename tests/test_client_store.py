"""The client store: a client's state comes back bit for bit through it (memory and disk), eviction writes the
least recently used client back, pinned clients are never evicted, and its checkpoint is the one the live
objects would have written, whatever the number of slots."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from mpisage.runtime.client_store import ClientStore, FieldView
from mpisage.runtime.state import flatten_state
from mpisage.runtime.stateful import Stateful


@dataclass
class Toy(Stateful):
    model: nn.Module = None
    optimizer: torch.optim.Optimizer = None
    generator: torch.Generator = None
    buffer: torch.Tensor | None = None       # made on first use


def make(cid: int) -> Toy:
    torch.manual_seed(0)                     # every client starts from the same weights
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    g = torch.Generator()
    g.manual_seed(100 + cid)
    return Toy(model, torch.optim.Adam(model.parameters(), lr=0.1), g)


def fresh(cid: int) -> dict:
    g = torch.Generator()
    g.manual_seed(100 + cid)
    return {"generator": g.get_state()}


def train(t: Toy, steps: int = 2) -> None:
    for _ in range(steps):
        x = torch.randn(5, 4, generator=t.generator)
        t.optimizer.zero_grad()
        t.model(x).square().sum().backward()
        t.optimizer.step()
    extra = torch.randn(2, 4, generator=t.generator)
    t.buffer = extra if t.buffer is None else torch.cat([t.buffer, extra])


def flat(t: Toy) -> dict:
    return flatten_state(t.state_dict())[0]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def reference(ids, schedule):
    """The same work on one live object per client."""
    live = {cid: make(cid) for cid in ids}
    for cid in schedule:
        train(live[cid])
    return live


SCHEDULE = [0, 1, 2, 3, 0, 2, 4, 1, 0]


@pytest.mark.parametrize("backend", ["memory", "disk"])
@pytest.mark.parametrize("slots", [1, 2, 5])
def test_round_trip_is_exact_and_checkpoint_matches_live_objects(backend, slots, tmp_path):
    ids = range(5)
    store = ClientStore(ids, make, slots=slots, backend=backend, directory=str(tmp_path), fresh=fresh)
    for cid in SCHEDULE:
        train(store[cid])
    live = reference(ids, SCHEDULE)
    for cid in ids:
        assert same(flat(store[cid]), flat(live[cid])), f"client {cid} differs after the store ({backend}, {slots})"
    assert len(store.live) == min(slots, 5)
    # the checkpoint: every client ever materialised, as the live objects would write it
    ckpt = flatten_state({"s": store.state_dict()})[0]
    expected = flatten_state({"s": {str(cid): live[cid].state_dict() for cid in ids}})[0]
    assert same(ckpt, expected)
    # restored into a store with another number of slots and backend, the clients go on identically
    other = ClientStore(ids, make, slots=1, backend="memory", fresh=fresh)
    other.load_state_dict(ckpt, "s")
    for cid in [3, 4, 0]:
        train(other[cid])
        train(live[cid])
    assert all(same(flat(other[cid]), flat(live[cid])) for cid in ids)


def test_untouched_clients_start_fresh_and_are_not_checkpointed():
    store = ClientStore(range(4), make, slots=1, fresh=fresh)
    train(store[2])
    assert same(flat(store[3]), flat(make(3)))       # from the shared initial state plus its own stream
    assert set(store.state_dict()) == {"2", "3"}
    assert store[1].buffer is None


def test_eviction_writes_back_the_least_recently_used():
    store = ClientStore(range(3), make, slots=2, fresh=fresh)
    train(store[0])
    weights0 = store[0].model[0].weight.detach().clone()
    train(store[1])
    store[1]                                     # 1 is now the most recent; 0 goes when 2 comes
    assert store.saves == 0
    obj = store[2]
    assert store.saves == 1 and store.live == [1, 2]
    assert not torch.equal(obj.model[0].weight, weights0)   # slot reused, reloaded with client 2's state
    assert torch.equal(store[0].model[0].weight, weights0)  # client 0 came back from the store


def test_pinned_clients_are_not_evicted():
    store = ClientStore(range(4), make, slots=1, fresh=fresh)
    with store.use([0, 1, 2]) as held:
        assert len({id(h) for h in held}) == 3
        store[3]
        assert {0, 1, 2} <= set(store.live)
        assert all(store[cid] is h for cid, h in zip([0, 1, 2], held))


def test_field_view_reads_and_makes_on_first_use():
    store = ClientStore(range(2), make, slots=1, fresh=fresh)
    view = FieldView(store, "buffer")
    assert 0 not in view
    view[0] = torch.ones(2, 4)
    store[1]
    assert torch.equal(view[0], torch.ones(2, 4)) and 1 not in view


def test_bad_backend_is_named():
    with pytest.raises(ValueError, match="backend 'tape'"):
        ClientStore(range(2), make, backend="tape")
