"""The named report schemas (runtime/protocol.py) and the self-checkpointing state dataclasses (runtime/stateful.py),
without MPI."""
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn as nn

from mpisage.algorithms.base import ServerState
from mpisage.runtime.protocol import COUNTERS_SHAPE, Schema, sserver_round_report
from mpisage.runtime.state import flatten_state
from mpisage.runtime.stateful import CheckpointError, transient
from mpisage.runtime.transport import ProtocolError


def test_a_schema_packs_and_unpacks_by_name():
    schema = sserver_round_report(3, {"align_loss": (3, 2)})
    values = {"counters": np.arange(np.prod(COUNTERS_SHAPE)).reshape(COUNTERS_SHAPE), "wait_seconds": 1.5,
              "busy_seconds": 2.5, "round_seconds": 3.5, "train_stats": np.arange(9.0).reshape(3, 3),
              "align_loss": np.full((3, 2), np.nan), "resident_bytes": 123.0}
    payload = schema.pack(values)
    assert payload.dtype == torch.float64 and payload.numel() == schema.size == 81 + 3 + 9 + 6 + 1
    out = schema.unpack(payload)
    assert out["counters"].dtype == np.int64 and np.array_equal(out["counters"], values["counters"])
    assert out["wait_seconds"] == 1.5 and out["resident_bytes"] == 123.0
    assert np.array_equal(out["train_stats"], values["train_stats"]) and np.isnan(out["align_loss"]).all()


def test_a_schema_refuses_missing_unknown_and_misshapen_fields():
    schema = Schema.of("t", a=1, b=(2,))
    with pytest.raises(KeyError, match="missing fields \\['b'\\]"):
        schema.pack({"a": 1.0})
    with pytest.raises(KeyError, match="unknown fields \\['c'\\]"):
        schema.pack({"a": 1.0, "b": [1, 2], "c": 3})
    with pytest.raises(ValueError, match="field b has shape"):
        schema.pack({"a": 1.0, "b": [1, 2, 3]})
    with pytest.raises(ProtocolError, match="has 4 values, the schema 3"):
        schema.unpack(torch.zeros(4, dtype=torch.float64))


@dataclass
class _Server(ServerState):
    extra_models: dict[int, nn.Module] = field(default_factory=dict)
    buffers: dict[int, torch.Tensor] = field(default_factory=dict)      # created on first use
    generator: torch.Generator = None
    steps: int = 0
    scratch: list = transient(default_factory=list)


def _server(seed: int) -> _Server:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    s = _Server(model, torch.optim.Adam(model.parameters(), lr=0.1), None,
                extra_models={0: nn.Linear(2, 2), 1: nn.Linear(2, 2)}, generator=torch.Generator().manual_seed(seed))
    return s


def test_state_round_trips_through_a_flat_checkpoint_including_entries_made_on_first_use():
    a = _server(0)
    loss = a.model(torch.randn(4, 3)).sum()
    loss.backward()
    a.optimizer.step()                                   # Adam state exists now
    a.buffers[1] = torch.arange(6.0).view(2, 3)          # a client that has uploaded
    a.steps = 7
    a.generator.manual_seed(99)
    a.scratch.append("not saved")
    flat, _ = flatten_state({"server": a.state_dict()})
    assert not any("scratch" in k or "train_stats" in k for k in flat)

    b = _server(1)                                       # different weights, empty buffers, no Adam state
    b.load_state_dict(flat, "server")
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert all(torch.equal(a.extra_models[i].weight, b.extra_models[i].weight) for i in (0, 1))
    assert torch.equal(b.optimizer.state_dict()["state"][0]["exp_avg"], a.optimizer.state_dict()["state"][0]["exp_avg"])
    assert set(b.buffers) == {1} and torch.equal(b.buffers[1], a.buffers[1])
    assert b.steps == 7 and torch.equal(b.generator.get_state(), a.generator.get_state())
    assert b.scratch == []


def test_a_checkpoint_of_another_model_is_refused_naming_the_tensor():
    flat, _ = flatten_state({"server": _server(0).state_dict()})
    del flat["server/extra_models/1/weight"]
    with pytest.raises(CheckpointError, match="server/extra_models/1/weight"):
        _server(1).load_state_dict(flat, "server")
