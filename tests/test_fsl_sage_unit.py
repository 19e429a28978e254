"""FSL-SAGE pieces that need no MPI: the S-server's alignment buffer and the alignment itself."""
import copy
import types

import torch
import torch.nn.functional as F

from mpisage.algorithms.fsl_sage import FslSage, one_client_server
from mpisage.config import Config, FslConfig
from mpisage.models import build_split


def _algo(buffer_size=10, steps=50):
    algo = FslSage.__new__(FslSage)   # the hooks under test need only the config
    algo.cfg = Config(fsl=FslConfig(align_buffer_size=buffer_size, align_steps=steps, align_threads=1,
                                    align_mode="blocking"))
    algo.label_smoothing = 0.0
    return algo


def _state(server=None, aux=None):
    opt = torch.optim.Adam(aux.parameters(), lr=1e-3) if aux is not None else None
    return one_client_server(server, aux, opt)


def test_buffer_keeps_exactly_the_last_n_uploaded_samples():
    algo, s, seen = _algo(10), _state(), []
    for b in [4, 4, 4, 13, 3, 7, 1]:
        z = torch.arange(len(seen), len(seen) + b, dtype=torch.float32).view(b, 1)
        seen += z.view(-1).long().tolist()
        algo._buffer(s, 0, z, z.view(-1).long())
        bz, by = algo.buffered(s, 0)
        assert sorted(by.tolist()) == seen[-10:]
        assert torch.equal(bz.view(-1).long(), by)        # samples and labels stay paired


def test_alignment_pulls_the_aux_gradient_towards_the_server_gradient():
    torch.manual_seed(0)
    split = build_split("cnn", in_channels=1, image_size=28, num_classes=10)
    algo, s = _algo(64, steps=60), _state(split.server, split.aux)
    z = split.client(torch.randn(64, 1, 28, 28)).detach()
    y = torch.randint(0, 10, (64,))
    algo._buffer(s, 0, z, y)

    def mismatch():
        zl = z.clone().requires_grad_(True)
        (g_true,) = torch.autograd.grad(F.cross_entropy(split.server(zl), y), zl)
        zl = z.clone().requires_grad_(True)
        (g_aux,) = torch.autograd.grad(F.cross_entropy(split.aux(zl), y), zl)
        return ((g_aux - g_true) ** 2).sum().item()

    before = mismatch()
    server_before = [p.clone() for p in split.server.parameters()]
    algo.align(s, 0)
    first, last = s.align_loss[0]
    # Measured: the default CNN aux plateaus near 0.8x of the initial mismatch (its pooled input cannot express
    # the conv server's gradient exactly); without double back-propagation the loss would not move at all.
    assert last < 0.9 * first and mismatch() < 0.9 * before
    # alignment reads the server's gradients but never changes its weights
    assert all(torch.equal(a, b) for a, b in zip(server_before, split.server.parameters()))


def test_an_alignment_round_aligns_every_client_once_all_first_uploads_are_in():
    """on_upload keeps each first upload's target and answers nobody until the last client's first upload, then
    sends every client its aux: the same aux as aligning each client at its own upload would give."""
    torch.manual_seed(0)
    split = build_split("cnn", in_channels=1, image_size=28, num_classes=10)
    algo = _algo(64, steps=5)
    algo.cfg.fsl.align_interval, algo.cfg.fsl.align_lr, algo.cfg.optim.grad_clip = 1, 1e-3, 0.0
    algo.cfg.client_store = types.SimpleNamespace(slots=3)      # every client live: alignment is gathered
    algo.world = types.SimpleNamespace(num_clients=3, num_client_ranks=3)
    uploads = [(split.client(torch.randn(16, 1, 28, 28)).detach(), torch.randint(0, 10, (16,))) for _ in range(3)]

    def server_state():
        from mpisage.algorithms.fsl_sage import AuxClient, FslSageServer
        from mpisage.runtime.client_store import ClientStore

        def make(cid):
            aux = copy.deepcopy(split.aux)
            return AuxClient(aux, torch.optim.Adam(aux.parameters(), lr=1e-3))
        server = copy.deepcopy(split.server)
        return FslSageServer(server, torch.optim.Adam(server.parameters(), lr=1e-3), torch.zeros(3, 3).numpy(),
                             clients=ClientStore(range(3), make, slots=3))

    gathered, one_by_one = server_state(), server_state()
    replies = [algo.on_upload(gathered, 0, cid, 0, z, y) for cid, (z, y) in enumerate(uploads)]
    assert replies[0] == [] and replies[1] == [] and [r[0] for r in replies[2]] == [0, 1, 2]
    for cid, (z, y) in enumerate(uploads):          # the per-client way: align each at its own upload
        algo.server_step(one_by_one, cid, z, y)
        algo._buffer(one_by_one, cid, z, y)
        algo.align(one_by_one, cid)
    for cid in range(3):
        for a, b in zip(gathered.aux[cid].parameters(), one_by_one.aux[cid].parameters()):
            assert torch.equal(a, b)
    assert not gathered.align_targets


def test_buffer_grows_only_as_samples_come_and_then_rings():
    algo, s = _algo(10), _state()
    algo._buffer(s, 0, torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64))
    assert s.buffer_z[0].shape == (3, 2) and s.buffer_fill[0].tolist() == [3, 3]
    algo._buffer(s, 0, torch.ones(9, 2), torch.ones(9, dtype=torch.int64))
    assert s.buffer_z[0].shape == (10, 2) and s.buffer_fill[0].tolist() == [10, 2]
    assert s.buffer_y[0].sum().item() == 9       # the 2 oldest zeros were overwritten, one remains


def test_server_state_checkpoint_is_the_same_whatever_the_store_keeps_live(tmp_path):
    """Buffers and alignments of three clients, interleaved, through a one-slot disk store and an all-live memory
    store: the same S-server checkpoint."""
    from mpisage.algorithms.fsl_sage import AuxClient, FslSageServer
    from mpisage.runtime.client_store import ClientStore
    from mpisage.runtime.state import flatten_state

    def run(slots, backend):
        torch.manual_seed(0)
        split = build_split("cnn", in_channels=1, image_size=28, num_classes=10)

        def make(cid):
            aux = copy.deepcopy(split.aux)
            return AuxClient(aux, torch.optim.Adam(aux.parameters(), lr=1e-3))
        algo = _algo(12, steps=3)
        s = FslSageServer(split.server, None, None, clients=ClientStore(range(3), make, slots=slots, backend=backend,
                                                                        directory=str(tmp_path)))
        g = torch.Generator().manual_seed(1)
        for cid in [0, 1, 2, 1, 0, 1]:
            z = split.client(torch.randn(5, 1, 28, 28, generator=g)).detach()
            with algo.aux_of(s, [cid]):
                algo._buffer(s, cid, z, torch.randint(0, 10, (5,), generator=g))
                algo.align(s, cid)
        return flatten_state(s.state_dict())[0]

    a, b = run(1, "disk"), run(3, "memory")
    assert a.keys() == b.keys() and len(a) > 30
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["clients/1/buffer_fill"].tolist() == [12, 3]      # 15 samples through a ring of 12


def test_alignment_rounds_gather_only_with_one_client_per_rank_and_every_aux_live():
    """A rank runs its clients one after another: with two clients on a rank the second's first upload comes only
    after the first has its aux, so gathering would wait forever; too few live slots cannot hold every aux."""
    algo = _algo()
    algo.cfg.fsl.align_interval = 10

    def gathers(clients, ranks, slots):
        algo.cfg.client_store = types.SimpleNamespace(slots=slots)
        algo.world = types.SimpleNamespace(num_clients=clients, num_client_ranks=ranks)
        return algo.gathers_first_uploads(0), algo.gathers_first_uploads(5)

    assert gathers(4, 4, None) == (True, False)       # the default job: one client per rank, one slot each
    assert gathers(8, 4, 100) == (False, False)       # two clients per rank
    assert gathers(4, 4, 2) == (False, False)         # not every aux live


def test_align_threads_zero_takes_the_cores_the_waiting_clients_leave():
    """fsl.align_threads=0: every core the S-server may use while clients wait (blocking), one while they compute
    (overlap); a number is taken as it is."""
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    algo = _algo()
    for threads, mode, want in ((0, "blocking", cores), (0, "overlap", 1), (3, "blocking", 3), (2, "overlap", 2)):
        algo.cfg.fsl.align_threads, algo.cfg.fsl.align_mode = threads, mode
        assert algo.align_threads() == want
