"""Multi-rank checks of the device map and the payload paths (mpirun -n 4: F-server, S-server, 2 client ranks).
Every rank asserts; each test works on its own duplicated communicator. GPU-only checks skip without CUDA."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.mpi(min_size=4)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()


def failures_anywhere(comm, failed: bool) -> int:
    """How many ranks failed a check, known to every rank (so every rank can assert on it)."""
    total = np.zeros(1, dtype=np.int64)
    comm.Allreduce(np.array([int(failed)], dtype=np.int64), total)
    return int(total[0])


def made_by(rank: int) -> list[torch.Tensor]:
    """Tensors a rank sends, a function of the rank only, so the receiver can rebuild them: several dtypes and
    shapes, every bf16 bit pattern (NaNs included), a non-contiguous view, an empty and a 2 MiB payload."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(3, 5, generator=g),
            torch.randint(-2 ** 15, 2 ** 15, (64, 3), generator=g, dtype=torch.int16).view(torch.bfloat16),
            torch.randint(-2 ** 62, 2 ** 62, (2, 3, 4), generator=g),
            torch.arange(6.0).view(2, 3).t() * (rank + 1),
            torch.zeros(0, 7),
            torch.rand(512, 1024, generator=g)]


def ring_exchange(transport, device="cpu") -> bool:
    """Each rank sends its tensors to the next rank and checks, bit for bit, what it gets from the previous one."""
    rank, size = transport.rank, transport.size
    from mpisage.runtime.transport import Kind
    for seq, x in enumerate(made_by(rank)):
        transport.send((rank + 1) % size, Kind.ACTIVATION, x.to(device), round=0, client=rank, seq=seq)
    ok = True
    prev = (rank - 1) % size
    for seq, want in enumerate(made_by(prev)):
        got = transport.recv(Kind.ACTIVATION, prev, round=0, client=prev, seq=seq, device=device).tensor
        ok &= got.device.type == torch.device(device).type and got.dtype == want.dtype and got.shape == want.shape
        ok &= raw(got) == raw(want)
    transport.flush()
    return ok


def test_staged_path_is_bit_identical_and_counts_the_same_bytes():
    from mpi4py import MPI

    from mpisage.runtime.transport import Transport
    comm_host, comm_staged = MPI.COMM_WORLD.Dup(), MPI.COMM_WORLD.Dup()
    host = Transport(comm_host, timeout_s=120)
    staged = Transport(comm_staged, timeout_s=120, stage_host_tensors=True)
    staged.payload_path = "staged"
    host_ok, staged_ok = ring_exchange(host), ring_exchange(staged)
    same_counters = np.array_equal(host.counters(), staged.counters()) and host.counters().sum() > 0
    pool_used = staged.staging.allocated >= len(made_by(0)) and staged.staging.in_use == 0
    comm_host.Free()
    comm_staged.Free()
    assert failures_anywhere(MPI.COMM_WORLD, not host_ok) == 0, "the host path corrupted a payload"
    assert failures_anywhere(MPI.COMM_WORLD, not staged_ok) == 0, "the staged path corrupted a payload"
    assert failures_anywhere(MPI.COMM_WORLD, not same_counters) == 0, "byte counters differ between host and staged"
    assert failures_anywhere(MPI.COMM_WORLD, not pool_used) == 0, "the staged path did not go through the pool"
    assert host.staging.allocated == 0


def test_device_map_over_the_job():
    from mpi4py import MPI

    from mpisage.config import load_config
    from mpisage.runtime.devices import device_map, select_device
    comm = MPI.COMM_WORLD.Dup()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local = np.empty(comm.Get_size(), dtype=np.int64)
    comm.Allgather(np.array([node.Get_rank()], dtype=np.int64), local)
    node.Free()
    cpu = torch.device("cpu")
    # the default config on this machine: the F-server on the CPU, the rest on whatever this node has
    default = load_config(None, [])
    mine = select_device(default, comm)
    found = device_map(default, comm)
    gpus = torch.cuda.device_count()
    expected = [cpu, torch.device("cuda", local[1] % gpus) if gpus else cpu, cpu, cpu]
    # two fake GPUs per node, clients asking for them: round-robin by node-local rank
    fake = device_map(load_config(None, ["device.clients=cuda"]), comm, num_gpus=2)
    expected_fake = [cpu] + [torch.device("cuda", int(lr) % 2) for lr in local[1:]]
    checks = [mine == found[comm.Get_rank()], found == expected, fake == expected_fake]
    comm.Free()
    assert failures_anywhere(MPI.COMM_WORLD, not all(checks)) == 0, f"device maps {found} / {fake}"


def test_a_missing_gpu_on_one_rank_stops_every_rank_with_the_same_error():
    from mpi4py import MPI

    from mpisage.config import ConfigError, load_config
    from mpisage.runtime.devices import device_map
    comm = MPI.COMM_WORLD.Dup()
    cfg = load_config(None, ["device.clients=cuda", "device.sserver=cpu"])
    message = ""
    try:
        device_map(cfg, comm, num_gpus=0 if comm.Get_rank() == 3 else 1)
    except ConfigError as e:
        message = str(e)
    comm.Free()
    right = "device.clients=cuda" in message and "rank 3" in message and "device.clients=auto" in message
    assert failures_anywhere(MPI.COMM_WORLD, not right) == 0, f"rank got {message!r}"


def test_configure_devices_agrees_on_one_path(monkeypatch):
    from mpi4py import MPI

    from mpisage.config import ConfigError, load_config
    from mpisage.runtime.devices import CUDA_AWARE_ENV, configure_devices
    from mpisage.runtime.transport import Transport
    monkeypatch.delenv(CUDA_AWARE_ENV, raising=False)
    comm = MPI.COMM_WORLD.Dup()
    t = Transport(comm, timeout_s=120)
    device = configure_devices(load_config(None, ["device.sserver=cpu"]), t)
    # the decision, encoded, must be the same on every rank
    code = np.array([["host", "staged", "direct"].index(t.payload_path), int(t.cuda_awareness.aware),
                     -1 if t.cuda_awareness.library is None else t.cuda_awareness.library], dtype=np.int64)
    lowest, highest = np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64)
    comm.Allreduce(code, lowest, op=MPI.MIN)
    comm.Allreduce(code, highest, op=MPI.MAX)
    gpus_wanted = torch.cuda.is_available()       # device.clients=cpu by default: only the S-server could use one
    ok = device == torch.device("cpu") and np.array_equal(lowest, highest) and t.devices == ["cpu"] * t.size
    ok &= t.payload_path == ("host" if not gpus_wanted else t.payload_path)
    # the self-check ring over all four ranks, on the path chosen and on the staged path
    ok &= t.check_payload_path(device)
    t.stage_host_tensors, t.payload_path = True, "staged"
    ok &= t.check_payload_path(device)
    # ranks that disagree about MPISAGE_CUDA_AWARE: every rank stops with the same error
    if comm.Get_rank() == 2:
        monkeypatch.setenv(CUDA_AWARE_ENV, "1")
    try:
        configure_devices(load_config(None, []), Transport(comm, timeout_s=120))
        ok = False
    except ConfigError as e:
        ok &= "disagree" in str(e) and CUDA_AWARE_ENV in str(e)
    comm.Free()
    assert failures_anywhere(MPI.COMM_WORLD, not ok) == 0


# ------------------------------------------------------------------------------------------------ GPU only
@needs_cuda
def test_gpu_ranks_share_gpus_and_exchange_device_tensors():
    """Every rank but the F-server on a GPU (several per GPU when there are fewer GPUs than ranks); device tensors
    go round the ring on the path the job chose, then on the staged path, bit-identical."""
    from mpi4py import MPI

    from mpisage.config import load_config
    from mpisage.runtime.devices import configure_devices
    from mpisage.runtime.transport import Transport
    comm = MPI.COMM_WORLD.Dup()
    t = Transport(comm, timeout_s=300)
    device = configure_devices(load_config(None, ["device.sserver=cuda", "device.clients=cuda"]), t)
    rank = comm.Get_rank()
    ok = (device.type == "cpu") == (rank == 0) and t.payload_path in ("staged", "direct")
    ok &= ring_exchange(t, device)
    t.payload_path = "staged"
    ok &= ring_exchange(t, device) and t.staging.pinned
    comm.Free()
    assert failures_anywhere(MPI.COMM_WORLD, not ok) == 0
