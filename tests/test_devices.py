"""The device map, CUDA-aware MPI detection and the payload paths, on one rank (MPI_COMM_SELF). GPU-only checks
skip without CUDA."""
import ctypes
import json

import pytest
import torch
from mpi4py import MPI

from mpisage.config import ConfigError, DeviceConfig, load_config
from mpisage.runtime.devices import (
    CUDA_AWARE_ENV,
    configure_devices,
    cuda_aware_setting,
    decide_payload_path,
    device_for,
    needs_self_check,
)
from mpisage.runtime.transport import Kind, StagingPool, Transport, query_mpi_cuda_support

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda(i):
    return torch.device("cuda", i)


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()


# ---------------------------------------------------------------------------------------------------- device map
def test_fserver_is_always_on_the_cpu():
    for devices in (DeviceConfig(sserver="cuda", clients="cuda"), DeviceConfig(sserver="cuda:1", clients="auto")):
        assert device_for(0, 0, 4, devices) == CPU


def test_sserver_device():
    assert device_for(1, 1, 0, DeviceConfig(sserver="auto")) == CPU           # auto falls back to the CPU
    assert device_for(1, 1, 2, DeviceConfig(sserver="auto")) == cuda(1)       # round-robin by node-local rank
    assert device_for(1, 5, 2, DeviceConfig(sserver="cuda")) == cuda(1)
    assert device_for(1, 1, 4, DeviceConfig(sserver="cuda:3")) == cuda(3)    # named explicitly
    assert device_for(1, 1, 4, DeviceConfig(sserver="cpu")) == CPU


def test_clients_round_robin_by_node_local_rank():
    devices = DeviceConfig(sserver="cpu", clients="cuda")
    # two nodes of 5 ranks, 2 GPUs each: node-local ranks, not global ranks, pick the GPU
    local_ranks = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    got = [device_for(r, lr, 2, devices) for r, lr in enumerate(local_ranks)]
    assert got[:2] == [CPU, CPU]
    assert got[2:] == [cuda(0), cuda(1), cuda(0), cuda(0), cuda(1), cuda(0), cuda(1), cuda(0)]
    # several ranks share one GPU
    assert {device_for(r, r, 1, devices) for r in range(2, 9)} == {cuda(0)}
    assert device_for(3, 3, 0, DeviceConfig(clients="auto")) == CPU
    assert device_for(3, 3, 2, DeviceConfig(clients="auto")) == cuda(1)
    assert device_for(3, 3, 2, DeviceConfig(clients="cpu")) == CPU


@pytest.mark.parametrize("rank, devices, gpus, key, fix", [
    (1, DeviceConfig(sserver="cuda"), 0, "device.sserver=cuda", "device.sserver=auto"),
    (1, DeviceConfig(sserver="cuda:2"), 2, "device.sserver=cuda:2", "cuda:0..cuda:1"),
    (4, DeviceConfig(clients="cuda"), 0, "device.clients=cuda", "device.clients=cpu"),
])
def test_asking_for_a_missing_gpu_names_the_key_and_the_fix(rank, devices, gpus, key, fix):
    with pytest.raises(ConfigError) as e:
        device_for(rank, rank, gpus, devices)
    assert key in str(e.value) and fix in str(e.value) and f"rank {rank}" in str(e.value)


# ---------------------------------------------------------------------------------------- CUDA-aware detection
def test_library_query_matches_the_loaded_libmpi():
    """The answer comes from MPIX_Query_cuda_support of the libmpi this process loaded (found here a second way,
    through /proc/self/maps); the pip MPICH here is not built for CUDA."""
    answer = query_mpi_cuda_support()
    version = MPI.Get_library_version()
    if "MPICH" in version or "Open MPI" in version:
        assert answer in (0, 1)
    with open("/proc/self/maps") as f:
        libmpi = sorted({line.split()[-1] for line in f if "/libmpi" in line and ".so" in line})
    if not libmpi:
        pytest.skip("no libmpi shared library mapped (a static MPI)")
    query = ctypes.CDLL(libmpi[0]).MPIX_Query_cuda_support
    query.restype = ctypes.c_int
    assert answer == query()
    if "MPICH" in version and not torch.cuda.is_available():
        assert answer == 0, "a CPU-only machine's MPICH claims CUDA support"


def test_environment_overrides_the_config():
    assert cuda_aware_setting(DeviceConfig(cuda_aware="auto"), {}) == ("auto", "device.cuda_aware=auto")
    assert cuda_aware_setting(DeviceConfig(cuda_aware="no"), {CUDA_AWARE_ENV: "1"}) == ("yes", "MPISAGE_CUDA_AWARE=1")
    assert cuda_aware_setting(DeviceConfig(cuda_aware="yes"), {CUDA_AWARE_ENV: "0"}) == ("no", "MPISAGE_CUDA_AWARE=0")
    with pytest.raises(ConfigError, match="MPISAGE_CUDA_AWARE='true' is not allowed: 1 .* or 0"):
        cuda_aware_setting(DeviceConfig(), {CUDA_AWARE_ENV: "true"})


def test_self_check_only_when_someone_says_mpi_is_cuda_aware():
    assert needs_self_check(True, "auto", 1) and needs_self_check(True, "yes", 0)
    assert needs_self_check(True, "yes", None)
    assert not needs_self_check(True, "auto", 0) and not needs_self_check(True, "auto", None)
    assert not needs_self_check(True, "no", 1) and not needs_self_check(False, "yes", 1)


def test_payload_path_decision():
    src = "device.cuda_aware=auto"
    assert decide_payload_path(False, "auto", src, 0, None)[0] == "host"
    path, rec = decide_payload_path(False, "auto", src, 1, None)
    assert path == "host" and rec.aware and "no rank computes on a GPU" in rec.how
    path, rec = decide_payload_path(True, "auto", src, 0, None)
    assert (path, rec.aware) == ("staged", False) and "MPIX_Query_cuda_support() = 0" in rec.how
    path, rec = decide_payload_path(True, "auto", src, None, None)
    assert path == "staged" and "MPISAGE_CUDA_AWARE=1" in rec.how
    assert decide_payload_path(True, "auto", src, 1, True)[0] == "direct"
    path, rec = decide_payload_path(True, "auto", src, 1, False)       # the library says yes, the check says no
    assert (path, rec.aware, rec.self_check) == ("staged", False, False)
    assert decide_payload_path(True, "no", "MPISAGE_CUDA_AWARE=0", 1, None)[0] == "staged"
    path, rec = decide_payload_path(True, "yes", "MPISAGE_CUDA_AWARE=1", 0, True)
    assert (path, rec.aware, rec.source) == ("direct", True, "MPISAGE_CUDA_AWARE=1")
    with pytest.raises(ConfigError, match="unset MPISAGE_CUDA_AWARE or set it to 0"):
        decide_payload_path(True, "yes", "MPISAGE_CUDA_AWARE=1", 0, False)
    with pytest.raises(ConfigError, match="device.cuda_aware=auto or no"):
        decide_payload_path(True, "yes", "device.cuda_aware=yes", 0, False)


def test_configure_devices_records_the_decision(monkeypatch):
    import mpisage.runtime.environment as env
    monkeypatch.setattr(env, "git_revision", lambda: "test")
    monkeypatch.delenv(CUDA_AWARE_ENV, raising=False)
    t = Transport(MPI.COMM_SELF, timeout_s=30)
    assert configure_devices(load_config(None, []), t) == CPU      # rank 0 is the F-server
    assert t.payload_path == "host" and t.devices == ["cpu"]
    assert t.cuda_awareness.library == query_mpi_cuda_support() and t.cuda_awareness.self_check is None
    record = json.loads(env.environment(MPI.COMM_SELF, transport=t))
    assert record["payload_path"] == "host" and record["devices"] == ["cpu"]
    assert record["cuda_aware"]["how"] == t.cuda_awareness.how and record["cuda_aware"]["source"] == \
        "device.cuda_aware=auto"
    monkeypatch.setenv(CUDA_AWARE_ENV, "1")
    cfg = load_config(None, [])
    cfg.device.cuda_aware = "no"
    configure_devices(cfg, t)
    assert t.cuda_awareness.source == "MPISAGE_CUDA_AWARE=1" and t.cuda_awareness.aware
    monkeypatch.setenv(CUDA_AWARE_ENV, "2")
    with pytest.raises(ConfigError, match="MPISAGE_CUDA_AWARE='2'"):
        configure_devices(load_config(None, []), t)
    # without a transport the record says nothing was decided
    record = json.loads(env.environment(MPI.COMM_SELF))
    assert record["payload_path"] is None and "not decided" in record["cuda_aware"]["how"]


# ------------------------------------------------------------------------------------------------- staging pool
def test_staging_pool_reuses_buffers_only_once_released():
    pool = StagingPool()
    assert pool.pinned == torch.cuda.is_available()
    a = pool.acquire(1000, torch.float32)
    b = pool.acquire(1000, torch.float32)
    assert a.data_ptr() != b.data_ptr() and pool.allocated == 2 and pool.in_use == 2
    assert a.shape == (1000,) and a.dtype == torch.float32 and a.is_pinned() == pool.pinned
    pool.release(a)
    again = pool.acquire(1000, torch.float32)
    assert again is a and pool.allocated == 2
    other = pool.acquire(1000, torch.bfloat16)        # another dtype is another pool
    assert other is not b and other.dtype == torch.bfloat16 and pool.allocated == 3
    pool.release(again)
    with pytest.raises(ValueError, match="released twice"):
        pool.release(again)
    with pytest.raises(ValueError, match="did not hand out"):
        pool.release(torch.empty(3))


def test_a_staged_send_buffer_is_not_reused_before_its_send_completes():
    """Two 4 MiB self-sends nobody has received yet (MPI completes them only when matched): each needs its own
    buffer; once received and flushed, both go back and a third send reuses one."""
    t = Transport(MPI.COMM_SELF, timeout_s=30, stage_host_tensors=True)
    first, second = torch.full((1 << 20,), 1.5), torch.full((1 << 20,), -2.0)
    t.send(0, Kind.ACTIVATION, first, round=0, seq=0)
    t.send(0, Kind.ACTIVATION, second, round=0, seq=1)
    assert t.staging.in_use == 2 and t.staging.allocated == 2
    assert torch.equal(t.recv(Kind.ACTIVATION, 0, round=0, seq=0).tensor, first)
    assert torch.equal(t.recv(Kind.ACTIVATION, 0, round=0, seq=1).tensor, second)
    t.flush()
    assert t.staging.in_use == 0
    allocated = t.staging.allocated       # 3: the receives staged too, while both send buffers were in flight
    t.send(0, Kind.ACTIVATION, second * 3, round=1)
    assert t.staging.allocated == allocated, "a free buffer of the same size and dtype was not reused"
    assert torch.equal(t.recv(Kind.ACTIVATION, 0, round=1).tensor, second * 3)
    t.flush()


def _payloads():
    g = torch.Generator().manual_seed(3)
    any_bits = torch.randint(-2 ** 15, 2 ** 15, (7, 3), generator=g, dtype=torch.int16)
    return [torch.randn(4, 5, generator=g), any_bits.view(torch.bfloat16),   # every bf16 bit pattern, NaNs too
            torch.randint(-2 ** 62, 2 ** 62, (2, 3, 4), generator=g), torch.tensor(7.25, dtype=torch.float64),
            torch.zeros(0, 3), torch.rand(3, 4, generator=g) > 0.5, torch.arange(12.0).view(3, 4).t()]


@pytest.mark.parametrize("stage", [False, True])
def test_payloads_arrive_bit_identical_on_both_host_paths(stage):
    t = Transport(MPI.COMM_SELF, timeout_s=30, stage_host_tensors=stage)
    sent = _payloads()
    for i, x in enumerate(sent):
        t.send(0, Kind.GRADIENT, x, round=0, seq=i)
        got = t.recv(Kind.GRADIENT, 0, round=0, seq=i).tensor
        assert got.dtype == x.dtype and got.shape == x.shape and raw(got) == raw(x)
    t.flush()
    assert (t.staging.allocated > 0) == stage and t.staging.in_use == 0


@pytest.mark.parametrize("stage", [False, True])
def test_self_check_passes_on_the_cpu(stage):
    t = Transport(MPI.COMM_SELF, timeout_s=30, stage_host_tensors=stage)
    assert t.check_payload_path(CPU)
    assert t.wire_bytes.sum() == 0, "the self-check must not count as job traffic"


def test_unknown_payload_path_is_refused():
    t = Transport(MPI.COMM_SELF)
    with pytest.raises(ValueError, match="host, staged, direct"):
        t.payload_path = "gpu"


# ------------------------------------------------------------------------------------------------ GPU only
@needs_cuda
def test_gpu_tensors_are_staged_through_pinned_buffers():
    t = Transport(MPI.COMM_SELF, timeout_s=60)
    t.payload_path = "staged"
    for i, x in enumerate(_payloads()):
        x = x.cuda()
        t.send(0, Kind.ACTIVATION, x, round=0, seq=i)
        got = t.recv(Kind.ACTIVATION, 0, round=0, seq=i, device="cuda").tensor
        assert got.is_cuda and raw(got) == raw(x)
    t.flush()
    buffer = t.staging.acquire(20, torch.float32)       # one of those sizes: a buffer that went through MPI
    assert t.staging.pinned and buffer.is_pinned()
    assert t.check_payload_path(torch.device("cuda", 0))


@needs_cuda
@pytest.mark.skipif(query_mpi_cuda_support() != 1, reason="the MPI library is not CUDA-aware")
def test_gpu_tensors_go_direct_on_a_cuda_aware_mpi():
    t = Transport(MPI.COMM_SELF, timeout_s=60)
    t.payload_path = "direct"
    assert t.check_payload_path(torch.device("cuda", 0))
    x = torch.randn(256, 33, device="cuda")
    t.send(0, Kind.ACTIVATION, x, round=0)
    got = t.recv(Kind.ACTIVATION, 0, round=0, device="cuda").tensor
    t.flush()
    assert raw(got) == raw(x) and t.staging.allocated == 0
