"""Wire formats (mpisage.runtime.wire): the codec's error bounds and byte counts per format, and the transport applying
it to activations and gradients on one rank (MPI_COMM_SELF) over the host and staged paths, plus the GPU paths
where a GPU is present."""
import math

import numpy as np

import pytest
import torch
from mpi4py import MPI

from mpisage.runtime import wire
from mpisage.config import ConfigError, load_config
from mpisage.runtime.transport import HEADER_BYTES, WIRE_CODE_BASE, Kind, ProtocolError, Transport

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FORMATS = ("bfloat16", "float16", "int8")
BYTES_PER_ELEMENT = {"bfloat16": 2, "float16": 2, "int8": 1}


def _batch(device="cpu"):
    """Activation-like data: 6 samples whose magnitudes differ by orders (as gradients of fitted and misfitted
    samples do), one all-zero sample, values of both signs."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 3, 3, generator=g) * torch.tensor([1e-6, 1e-2, 1.0, 30.0, 1e3, 0.0]).view(6, 1, 1, 1)
    return x.to(device)


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_error_is_within_the_format_bound(name):
    fmt = wire.WIRE_FORMATS[name]
    x = _batch()
    payload = wire.encode(x, fmt)
    back = wire.decode(payload, fmt, tuple(x.shape))
    assert back.dtype == torch.float32 and back.shape == x.shape
    err = (back.double() - x.double()).abs()
    assert (err <= wire.error_bound(x, fmt)).all(), f"{name}: error above its bound"
    assert payload.numel() * payload.element_size() == fmt.payload_nbytes(tuple(x.shape))
    assert torch.equal(back[5], torch.zeros_like(back[5])), "an all-zero sample must come back exactly zero"


def test_the_bounds_are_the_documented_ones():
    """bf16 relative 2^-8; int8 half a step of each sample's own scale (max|x| / 127)."""
    x = _batch()
    bf16 = wire.error_bound(x, wire.WIRE_FORMATS["bfloat16"])
    assert torch.allclose(bf16, x.abs().double() * 2.0 ** -8)
    int8 = wire.error_bound(x, wire.WIRE_FORMATS["int8"])
    for i in range(5):
        half_step = x[i].abs().max().item() / 127 / 2
        assert half_step <= int8[i].max().item() <= half_step * (1 + 1e-4)   # plus a few float32 ulps
    # the per-sample scale: the smallest sample keeps its resolution (a shared scale would round it to zero)
    back = wire.decode(wire.encode(x, wire.WIRE_FORMATS["int8"]), wire.WIRE_FORMATS["int8"], tuple(x.shape))
    assert (back[0] != 0).any() and torch.allclose(back[0], x[0], rtol=0, atol=x[0].abs().max().item() / 127)


@pytest.mark.parametrize("shape", [(64, 128, 4, 4), (16, 10), (7,), (), (0, 3), (3, 0)])
def test_closed_form_bytes_per_format(shape):
    numel = math.prod(shape)
    rows = shape[0] if shape else 1
    expected = {"bfloat16": 2 * numel, "float16": 2 * numel, "int8": numel + 4 * rows}
    for name, fmt in wire.WIRE_FORMATS.items():
        x = torch.randn(shape)
        assert fmt.payload_nbytes(shape) == expected[name]
        payload = wire.encode(x, fmt)
        assert payload.numel() * payload.element_size() == expected[name]
        assert wire.decode(payload, fmt, shape).shape == x.shape
    # a ResNet-18 activation batch: bf16 halves it, int8 quarters it plus one scale per sample
    assert wire.WIRE_FORMATS["bfloat16"].payload_nbytes((16, 128, 4, 4)) * 2 == 16 * 2048 * 4
    assert wire.WIRE_FORMATS["int8"].payload_nbytes((16, 128, 4, 4)) == 16 * 2048 + 16 * 4


def test_encoding_is_deterministic():
    for fmt in wire.WIRE_FORMATS.values():
        x = _batch()
        assert torch.equal(wire.encode(x, fmt), wire.encode(x.clone(), fmt))


def test_unknown_values_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"wire\.activations='fp8'.*float32, bfloat16, float16, int8"):
        load_config(None, ["wire.activations=fp8"])
    with pytest.raises(ConfigError, match=r"wire\.gradients='int4'"):
        load_config(None, ["wire.gradients=int4"])
    with pytest.raises(ValueError, match=r"wire\.gradients='half'"):
        Transport(MPI.COMM_SELF).set_wire_formats("float32", "half")
    cfg = load_config(None, ["wire.activations=bfloat16", "wire.gradients=int8"])
    assert (cfg.wire.activations, cfg.wire.gradients) == ("bfloat16", "int8")
    assert load_config(None, []).wire.activations == "float32"


# ------------------------------------------------------------------------------------------------ transport
def _transport(stage: bool, activations="float32", gradients="float32", device="cpu") -> Transport:
    t = Transport(MPI.COMM_SELF, timeout_s=30, stage_host_tensors=stage)
    if device != "cpu":
        t.payload_path = "staged" if stage else "direct"
    t.set_wire_formats(activations, gradients)
    return t


def _round_trip(t: Transport, kind: Kind, x: torch.Tensor, device="cpu", **expect) -> torch.Tensor:
    t.send(0, kind, x, round=3, client=1, seq=0)
    got = t.recv(kind, 0, round=3, client=1, seq=0, device=device, **expect).tensor
    t.flush()
    return got


@pytest.mark.parametrize("stage", [False, True])
@pytest.mark.parametrize("name", FORMATS)
def test_transport_sends_the_format_and_returns_float32(name, stage):
    """Both kinds: the receiver gets float32 (its dtype/shape expectations hold) within the format's bound; the
    paper figure counts the payload actually sent; labels and models are untouched."""
    fmt = wire.WIRE_FORMATS[name]
    t = _transport(stage, name, name)
    x = _batch()
    for kind in (Kind.ACTIVATION, Kind.GRADIENT):
        got = _round_trip(t, kind, x, dtype=torch.float32, shape=tuple(x.shape))
        assert got.dtype == torch.float32 and ((got.double() - x.double()).abs() <= wire.error_bound(x, fmt)).all()
        assert t.paper_bytes[kind, 0] == fmt.payload_nbytes(tuple(x.shape))
        assert t.wire_bytes[kind, 0] == HEADER_BYTES + fmt.payload_nbytes(tuple(x.shape))
    model = torch.randn(10)
    assert torch.equal(_round_trip(t, Kind.CLIENT_MODEL, model), model)
    assert t.paper_bytes[Kind.CLIENT_MODEL, 0] == 40
    labels = torch.arange(6)
    assert torch.equal(_round_trip(t, Kind.LABELS, labels), labels)
    assert (t.staging.allocated > 0) == stage and t.staging.in_use == 0


def test_the_header_records_the_wire_format():
    """A receiver configured otherwise (a rank with other wire.* keys) gets a ProtocolError naming both formats."""
    sender = _transport(False, "int8")
    x = _batch()
    sender.send(0, Kind.ACTIVATION, x, round=0)
    plain = Transport(MPI.COMM_SELF, timeout_s=30)
    with pytest.raises(ProtocolError, match="wire format int8, this job uses float32 for ACTIVATION"):
        plain.recv(Kind.ACTIVATION, 0, round=0)
    plain.send(0, Kind.ACTIVATION, x, round=1)
    with pytest.raises(ProtocolError, match="wire format float32, this job uses int8 for ACTIVATION"):
        sender.recv(Kind.ACTIVATION, 0, round=1)
    # nothing left hanging: drain the two payloads the refused receives left behind
    for _ in range(2):
        MPI.COMM_SELF.Recv(bytearray(x.numel() * 4), source=0, tag=2 * int(Kind.ACTIVATION) + 1)
    # the raw header: dtype field = the format's code, shape = the float32 tensor's, bytes = the int8 payload's
    sender.send(0, Kind.ACTIVATION, x, round=2)
    header = np.empty(14, dtype=np.int64)
    MPI.COMM_SELF.Recv(header, source=0, tag=2 * int(Kind.ACTIVATION))
    assert header[6] == WIRE_CODE_BASE + wire.WIRE_FORMATS["int8"].code and header[7] == 4
    assert tuple(header[8:12]) == tuple(x.shape) and header[-1] == x.numel() + 4 * 6
    MPI.COMM_SELF.Recv(bytearray(x.numel() * 4), source=0, tag=2 * int(Kind.ACTIVATION) + 1)
    sender.flush()
    plain.flush()


def test_non_float32_tensors_go_as_they_are():
    """Only float32 is encoded: an int64 or float64 tensor on a wire kind keeps its dtype and bits."""
    t = _transport(False, "int8", "bfloat16")
    for x in (torch.arange(6).view(2, 3), torch.randn(3, dtype=torch.float64)):
        got = _round_trip(t, Kind.GRADIENT, x)
        assert got.dtype == x.dtype and torch.equal(got, x)


@pytest.mark.parametrize("name", FORMATS)
def test_non_finite_values_are_refused_before_encoding(name):
    """A NaN must not become a silent number in int8 (nor anything else): the sender refuses, naming the message."""
    t = _transport(False, name, name)
    for bad in (float("nan"), float("inf")):
        x = _batch()
        x[2, 1, 0, 0] = bad
        with pytest.raises(FloatingPointError, match="non-finite values in the GRADIENT of client 4 in round 9"):
            t.send(0, Kind.GRADIENT, x, round=9, client=4)
    assert t.wire_bytes.sum() == 0 and not t._pending, "a refused tensor was sent or counted"


def test_float16_refuses_values_beyond_its_range():
    t = _transport(False, "float16")
    with pytest.raises(FloatingPointError, match="beyond float16's 65504.*bfloat16"):
        t.send(0, Kind.ACTIVATION, torch.tensor([1.0, 7e4]), round=0, client=0)


# ------------------------------------------------------------------------------------------------ GPU only
@needs_cuda
@pytest.mark.parametrize("stage", [True, False])
@pytest.mark.parametrize("name", FORMATS)
def test_gpu_payloads_are_encoded_on_the_device(name, stage):
    from mpisage.runtime.transport import query_mpi_cuda_support
    if not stage and query_mpi_cuda_support() != 1:
        pytest.skip("the MPI library is not CUDA-aware")
    fmt = wire.WIRE_FORMATS[name]
    t = _transport(stage, name, name, device="cuda")
    x = _batch("cuda")
    got = _round_trip(t, Kind.ACTIVATION, x, device="cuda", dtype=torch.float32)
    assert got.is_cuda and ((got.double() - x.double()).abs() <= wire.error_bound(x, fmt)).all()
    cpu = wire.decode(wire.encode(x.cpu(), fmt), fmt, tuple(x.shape))
    assert torch.equal(got.cpu(), cpu), "the GPU encoding differs from the CPU one"
    assert t.paper_bytes[Kind.ACTIVATION, 0] == fmt.payload_nbytes(tuple(x.shape))
