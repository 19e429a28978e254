"""Packing model states into one payload, FedAvg over whole state_dicts, named states and checkpoints."""
import os

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

from mpisage.runtime.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from mpisage.runtime.state import fedavg, flatten_state, load_packed, pack_named, pack_state, unpack_named, unpack_state


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Linear(2, 3))


def test_pack_round_trip_counts_params_and_buffers():
    a, b = _net(0), _net(1)
    buf = pack_state(a.state_dict())
    assert buf.numel() == sum(t.numel() * t.element_size() for t in a.state_dict().values())
    load_packed(b, buf)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    with pytest.raises(ValueError, match="bytes"):
        unpack_state(buf[:-1], a.state_dict())


def test_fedavg_is_weighted_over_the_whole_state_dict():
    nets = [_net(s) for s in range(3)]
    for i, n in enumerate(nets):           # BN statistics and counters differ per client
        n[1].running_mean.fill_(float(i))
        n[1].num_batches_tracked.fill_(10 * i)
    weights = [1.0, 2.0, 5.0]
    avg = unpack_state(fedavg([pack_state(n.state_dict()) for n in nets], weights, nets[0].state_dict()),
                       nets[0].state_dict())
    w = np.array(weights) / sum(weights)
    expect_w = sum(wi * n[0].weight.detach().double() for wi, n in zip(w, nets)).float()
    assert torch.allclose(avg["0.weight"], expect_w, atol=1e-7)
    assert torch.allclose(avg["1.running_mean"], torch.full((3,), float(w @ np.arange(3))))
    assert avg["1.num_batches_tracked"].dtype == torch.int64
    assert avg["1.num_batches_tracked"].item() == round(float(w @ (10 * np.arange(3))))


def test_named_state_round_trip_handles_misaligned_int64():
    opt_state = {"a": torch.ones(3, dtype=torch.uint8), "b": {"c": torch.arange(4), "lr": 0.1},
                 "d": [torch.randn(2).to(torch.bfloat16)]}
    tensors, plain = flatten_state(opt_state)
    manifest, payload = pack_named(tensors, plain)
    out, meta = unpack_named(manifest, payload)
    assert meta == {"b/lr": 0.1}
    assert torch.equal(out["b/c"], torch.arange(4)) and torch.equal(out["d/0"], opt_state["d"][0])


def test_checkpoint_is_atomic_checksummed_and_pruned(tmp_path):
    run = str(tmp_path)
    groups = {"rank1": flatten_state({"w": torch.arange(10.0), "n": torch.tensor(3)})}
    paths = [write_checkpoint(run, r, groups, {"config": "x"}, keep=2) for r in range(3)]
    assert sorted(os.listdir(run)) == [os.path.basename(p) for p in paths[1:]]   # last 2 kept, no .tmp left
    attrs, got = read_checkpoint(paths[-1])
    assert attrs["round"] == 2 and torch.equal(got["rank1"]["w"], torch.arange(10.0))
    with h5py.File(paths[-1], "r+") as f:          # flip data behind the checksum's back
        f["rank1/w"][3] = 99.0
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(paths[-1])
    size = os.path.getsize(paths[-2])
    with open(paths[-2], "r+b") as f:               # truncated mid-file
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(paths[-2])


def test_a_checkpoint_from_before_a_new_setting_resumes_at_its_default():
    """A key the checkpoint's config lacks (added since) counts as its default; any other value is a difference."""
    from omegaconf import OmegaConf

    from mpisage.config import load_config, to_yaml
    from mpisage.runtime.checkpoint import config_differences
    old = OmegaConf.create(to_yaml(load_config(None, [])))
    del old["fsl"]["align_mode"]           # as written before align_mode existed
    del old["client_store"]["backend"]     # a nested one too
    stored = OmegaConf.to_yaml(old)
    assert config_differences(stored, load_config(None, [])) == []
    assert config_differences(stored, load_config(None, ["fsl.align_mode=overlap"])) == [
        "fsl.align_mode: checkpoint 'blocking', now 'overlap'"]
    assert config_differences(stored, load_config(None, ["client_store.backend=disk", "optim.lr=0.5"])) == [
        "optim.lr: checkpoint 0.001, now 0.5"]         # the store's layout may change on resume; the rate may not
    threads = OmegaConf.create(to_yaml(load_config(None, ["fsl.align_threads=1"])))
    assert config_differences(OmegaConf.to_yaml(threads), load_config(None, [])) == []   # a thread count
