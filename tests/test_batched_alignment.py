"""The batched alignment (one vmap over stacked auxiliary models) against the per-client loop it replaces.

Tolerance. In float64 the two agree to rtol 1e-9 / atol 1e-12: the only difference is the order of the sums inside
the batched (grouped) convolutions, about 1e-16 relative per operation, and a few Adam steps cannot grow that to
1e-9 (measured: below 1e-14). A float32 case checks the production dtype with rtol/atol 1e-4: Adam divides each
gradient by its own running RMS, so a rounding difference in a gradient component near zero moves that weight by
up to lr per step; 1e-4 is a tenth of one such step (lr = 1e-3) and far below the weights' own scale."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpisage.algorithms import alignment
from mpisage.algorithms.alignment import align_clients, align_one, batch_obstacle, true_gradients
from mpisage.algorithms.fsl_sage import FslSage, FslSageServer
from mpisage.config import Config, FslConfig
from mpisage.models import build_split

TIGHT = dict(rtol=1e-9, atol=1e-12)


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _resnet16(aux="default"):
    # The SGLR ResNet-16 split at 16x16 inputs: smashed [32, 8, 8]; its default aux is a BasicBlock with BatchNorm.
    return build_split("resnet16", in_channels=1, image_size=16, num_classes=10, aux=aux)


def _clients(split, fills, make_opt=lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.0), shape=(32, 8, 8)):
    auxes = [copy.deepcopy(split.aux) for _ in fills]
    for i, aux in enumerate(auxes[1:], 1):      # different weights per client, as after earlier alignments
        with torch.no_grad():
            for p in aux.parameters():
                p.add_(0.01 * i * torch.randn_like(p))
    opts = [make_opt(a.parameters()) for a in auxes]
    zs = [torch.randn(n, *shape) for n in fills]
    ys = [torch.randint(0, 10, (n,)) for n in fills]
    targets = [true_gradients(split.server, z, y, F.cross_entropy) for z, y in zip(zs, ys)]
    return auxes, opts, zs, ys, targets


def _run_both(auxes, opts, zs, ys, targets, steps):
    ref_auxes, ref_opts = copy.deepcopy((auxes, opts))      # one deepcopy keeps each optimiser tied to its module
    ref = [align_one(a, o, z, y, g, steps, F.cross_entropy)
           for a, o, z, y, g in zip(ref_auxes, ref_opts, zs, ys, targets)]
    got = align_clients(auxes, opts, zs, ys, targets, steps, F.cross_entropy)
    return (ref_auxes, ref_opts, ref), (auxes, opts, got)


def _assert_same(ref, got, **tol):
    (ref_auxes, ref_opts, ref_losses), (auxes, opts, losses) = ref, got
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **tol)
    for a, b in zip(ref_auxes, auxes):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for k in sa:       # parameters and buffers: BatchNorm running statistics and num_batches_tracked
            torch.testing.assert_close(sb[k], sa[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
    for oa, ob in zip(ref_opts, opts):
        sa, sb = oa.state_dict(), ob.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        assert sorted(sa["state"]) == sorted(sb["state"])
        for i, st in sa["state"].items():
            assert list(st) == list(sb["state"][i])
            for k in st:
                assert st[k].dtype == sb["state"][i][k].dtype and st[k].device == sb["state"][i][k].device
                torch.testing.assert_close(sb["state"][i][k], st[k], **tol)


def _spy_groups(monkeypatch):
    sizes = []
    real = alignment._align_group

    def spy(auxes, *args):
        sizes.append(len(auxes))
        return real(auxes, *args)
    monkeypatch.setattr(alignment, "_align_group", spy)
    return sizes


def test_equal_fills_with_batchnorm_match_the_loop(float64, monkeypatch):
    torch.manual_seed(0)
    split = _resnet16()
    auxes, opts, zs, ys, targets = _clients(split, [6, 6, 6])
    before = [copy.deepcopy(a.state_dict()) for a in auxes]
    sizes = _spy_groups(monkeypatch)
    ref, got = _run_both(auxes, opts, zs, ys, targets, steps=4)
    assert sizes == [3]                                # one vmap over all three clients
    _assert_same(ref, got, **TIGHT)
    # the comparison covers BatchNorm in train mode: running statistics moved, once per step
    bn = "0.0.bn1"
    assert not torch.equal(auxes[0].state_dict()[f"{bn}.running_mean"], before[0][f"{bn}.running_mean"])
    assert int(auxes[0].state_dict()[f"{bn}.num_batches_tracked"]) == 4
    assert all(row[-1] < row[0] for row in got[2])    # and alignment did reduce each client's mismatch


def test_ragged_fills_are_grouped_by_fill(float64, monkeypatch):
    torch.manual_seed(1)
    split = _resnet16()
    auxes, opts, zs, ys, targets = _clients(split, [6, 4, 6, 4, 3])
    sizes = _spy_groups(monkeypatch)
    ref, got = _run_both(auxes, opts, zs, ys, targets, steps=3)
    assert sorted(sizes) == [2, 2]                     # the lone 3-sample client takes the loop
    _assert_same(ref, got, **TIGHT)


@pytest.mark.parametrize("kind", ["adam", "adamw_decay"])
def test_differing_adam_step_counts(float64, kind):
    torch.manual_seed(2)
    split = _resnet16()
    make = ((lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.0)) if kind == "adam"
            else (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05)))
    auxes, opts, zs, ys, targets = _clients(split, [5, 5, 5], make)
    # client 0 fresh (no Adam state), client 1 after 1 earlier step, client 2 after 3 (as after a resume)
    for i, earlier in enumerate([0, 1, 3]):
        align_one(auxes[i], opts[i], zs[i], ys[i], targets[i], earlier, F.cross_entropy)
    ref, got = _run_both(auxes, opts, zs, ys, targets, steps=3)
    _assert_same(ref, got, **TIGHT)
    assert [int(o.state_dict()["state"][0]["step"]) for o in opts] == [3, 4, 6]


def test_float32_matches_the_loop_within_rounding():
    torch.manual_seed(3)
    split = _resnet16()
    auxes, opts, zs, ys, targets = _clients(split, [8, 8])
    ref, got = _run_both(auxes, opts, zs, ys, targets, steps=3)
    _assert_same(ref, got, rtol=1e-4, atol=1e-4)


def test_cnn_aux_without_batchnorm(float64):
    torch.manual_seed(4)
    split = build_split("cnn", in_channels=1, image_size=28, num_classes=10)    # avgpool + MLP aux
    auxes, opts, zs, ys, targets = _clients(split, [5, 5, 5], shape=(16, 14, 14))
    ref, got = _run_both(auxes, opts, zs, ys, targets, steps=3)
    _assert_same(ref, got, **TIGHT)


def test_randomised_or_non_adam_aux_keeps_the_loop():
    split = _resnet16()
    assert batch_obstacle(split.aux, torch.optim.Adam(split.aux.parameters())) is None
    assert "SGD" in batch_obstacle(split.aux, torch.optim.SGD(split.aux.parameters(), lr=0.1))
    dropped = nn.Sequential(nn.Dropout(0.1), split.aux)
    assert "Dropout" in batch_obstacle(dropped, torch.optim.Adam(dropped.parameters()))
    opt = torch.optim.Adam(split.aux.parameters())
    first = next(split.aux.parameters())
    opt.state[first] = {"step": torch.tensor(2.0), "exp_avg": torch.zeros_like(first),
                        "exp_avg_sq": torch.zeros_like(first)}     # a parameter Adam once stepped alone
    assert "different Adam step counts" in batch_obstacle(split.aux, opt)


def test_zero_steps_leave_everything_untouched():
    torch.manual_seed(7)
    auxes, opts, zs, ys, targets = _clients(_resnet16(), [4, 4])
    before = [copy.deepcopy(a.state_dict()) for a in auxes]
    assert align_clients(auxes, opts, zs, ys, targets, 0, F.cross_entropy) == [[], []]
    assert all(not o.state for o in opts)
    for a, b in zip(auxes, before):
        assert all(torch.equal(t, b[k]) for k, t in a.state_dict().items())


def _server(model, clients: int = 3) -> FslSageServer:
    """An S-server state whose clients' aux state is all live (the test assigns each client's aux and Adam)."""
    from mpisage.algorithms.fsl_sage import AuxClient
    from mpisage.runtime.client_store import ClientStore
    return FslSageServer(model, None, None, clients=ClientStore(range(clients), lambda cid: AuxClient(),
                                                                slots=clients))


def _algo(buffer_size, steps, mode="blocking"):
    algo = FslSage.__new__(FslSage)    # the hooks under test need only the config
    algo.cfg = Config(fsl=FslConfig(align_buffer_size=buffer_size, align_steps=steps, align_threads=1,
                                    align_mode=mode))
    algo.label_smoothing = 0.0
    return algo


def test_align_many_equals_align_client_by_client(float64, monkeypatch):
    """FslSage.align_many (targets one after another, aux steps batched) against FslSage.align per client: the
    same alignment losses, aux models, aux optimisers and server (its BatchNorm statistics included)."""
    torch.manual_seed(5)
    split = _resnet16()
    algo = _algo(buffer_size=6, steps=3)
    states = [_server(copy.deepcopy(split.server)) for _ in range(2)]
    for cid in range(3):
        z, y = torch.randn(6 if cid else 4, 32, 8, 8), torch.randint(0, 10, (6 if cid else 4,))
        aux = copy.deepcopy(split.aux)
        for s in states:
            algo._buffer(s, cid, z, y)
            s.aux[cid] = copy.deepcopy(aux)
            s.aux_optimizer[cid] = torch.optim.Adam(s.aux[cid].parameters(), lr=1e-3)
    one, many = states
    last_one = {cid: algo.align(one, cid) for cid in range(3)}
    sizes = _spy_groups(monkeypatch)
    last_many = algo.align_many(many, range(3), batched=True)
    assert sizes == [2]                  # clients 1 and 2 (6 samples) batched, client 0 (4 samples) on the loop
    assert last_many == pytest.approx(last_one, rel=1e-9)
    assert one.align_loss.keys() == many.align_loss.keys() == {0, 1, 2}
    for cid in range(3):
        assert many.align_loss[cid] == pytest.approx(one.align_loss[cid], rel=1e-9)
        _assert_same(([one.aux[cid]], [one.aux_optimizer[cid]], []),
                     ([many.aux[cid]], [many.aux_optimizer[cid]], []), **TIGHT)
    for k, t in one.model.state_dict().items():
        torch.testing.assert_close(many.model.state_dict()[k], t, **TIGHT)


def test_targets_kept_at_each_first_upload_give_the_per_client_alignment(float64):
    """The S-server's intended use: the target of each client at its first upload (the server moves between
    uploads), the aux steps of all of them later, batched; equal to aligning each client at its upload."""
    torch.manual_seed(6)
    split = _resnet16()
    algo = _algo(buffer_size=6, steps=2)
    states = [_server(copy.deepcopy(split.server)) for _ in range(2)]
    uploads = [(torch.randn(6, 32, 8, 8), torch.randint(0, 10, (6,))) for _ in range(3)]
    for s in states:
        for cid, (z, y) in enumerate(uploads):
            s.aux[cid] = copy.deepcopy(split.aux)
            s.aux_optimizer[cid] = torch.optim.Adam(s.aux[cid].parameters(), lr=1e-3)
    now, deferred = states
    for cid, (z, y) in enumerate(uploads):
        for s in states:
            with torch.no_grad():      # stands in for the server step on this upload
                for p in s.model.parameters():
                    p.mul_(1.05)
            algo._buffer(s, cid, z, y)
        algo.align(now, cid)
        algo.keep_align_target(deferred, cid)
    kept_first = deferred.align_targets[0][2].clone()
    algo.align_many(deferred, range(3), batched=True)
    assert not deferred.align_targets            # every kept target was used once
    for cid in range(3):
        assert deferred.align_loss[cid] == pytest.approx(now.align_loss[cid], rel=1e-9)
        _assert_same(([now.aux[cid]], [now.aux_optimizer[cid]], []),
                     ([deferred.aux[cid]], [deferred.aux_optimizer[cid]], []), **TIGHT)
    # the kept targets matter: client 0's target on the server as it is after the last upload differs
    assert not torch.allclose(kept_first, true_gradients(deferred.model, *algo.buffered(deferred, 0), F.cross_entropy))


def test_overlap_aligns_on_the_buffer_as_it_was_at_the_first_upload(float64):
    """fsl.align_mode=overlap: a client keeps uploading while its alignment waits; an upload that overwrites its (full)
    ring in place must not change what it is aligned on. Equal to aligning at the first upload; and the ring did
    change, so aligning on the live buffer would differ."""
    torch.manual_seed(7)
    split = _resnet16()
    algo = _algo(buffer_size=6, steps=2, mode="overlap")
    now, deferred = (_server(copy.deepcopy(split.server), clients=1) for _ in range(2))
    for s in (now, deferred):
        s.aux[0] = copy.deepcopy(split.aux)
        s.aux_optimizer[0] = torch.optim.Adam(s.aux[0].parameters(), lr=1e-3)
    first, later = ((torch.randn(6, 32, 8, 8), torch.randint(0, 10, (6,))) for _ in range(2))
    for s in (now, deferred):
        algo._buffer(s, 0, *first)
    algo.align(now, 0)
    algo.keep_align_target(deferred, 0)
    algo._buffer(deferred, 0, *later)             # the client's next upload, before the alignment runs
    assert torch.equal(algo.buffered(deferred, 0)[0], later[0])
    algo.align_many(deferred, [0])
    assert deferred.align_loss[0] == pytest.approx(now.align_loss[0], rel=1e-9)
    _assert_same(([now.aux[0]], [now.aux_optimizer[0]], []), ([deferred.aux[0]], [deferred.aux_optimizer[0]], []),
                 **TIGHT)
