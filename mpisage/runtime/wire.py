"""Wire formats for activations and gradients: fewer bytes per message at a bounded rounding error.

`wire.activations` and `wire.gradients` (config) pick one format per message kind for the whole job. The sender
encodes a float32 tensor into a flat payload (`encode`), the receiver decodes it back to float32 before anything
uses it (`decode`), so algorithms never see the wire format. Encoding runs where the tensor lives (on its GPU
when it is on one), then the payload goes over the usual host, staged or direct path.

Formats:
- float32: the tensor as it is (4 B per element).
- bfloat16: round to nearest even, 2 B per element; relative error <= 2^-8 (8 significant bits), float32's range.
- float16: 2 B per element; relative error <= 2^-11 inside [2^-14, 65504]; larger values do not fit, and
  are refused at the sender (use bfloat16 for such data) instead of arriving as inf.
- int8: symmetric, one float32 scale per sample (per index of dim 0): q = round(x / s), s = max|x_sample| / 127,
  1 B per element + 4 B per sample; absolute error <= s / 2 per element. Per sample, not per channel, because the
  samples of a batch differ most (a well-fitted sample's gradient is orders of magnitude smaller than a
  misclassified one's: a shared scale would round it to zero), and because the overhead is 4 B per sample, under
  0.2 % of a ResNet-18 activation (2,048 elements); a per-channel scale would not follow the per-sample spread.
  The payload is the int8 values followed by the float32 scales, as raw bytes; the scales count as payload.

Non-finite values are refused at the sender before encoding (int8 would turn a NaN into a silent number), with
the message kind, client and round named.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FORMATS = ("float32", "bfloat16", "float16", "int8")
INT8_LEVELS = 127          # symmetric: -127..127, so +x and -x round alike
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class WireFormat:
    """One wire format: its payload size, codec, error bound and range check, all in one object."""
    name: str
    code: int                    # header dtype code (see mpisage.runtime.transport.WIRE_CODE_BASE)
    element_dtype: torch.dtype   # what the payload buffer holds

    def payload_nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes on the wire for a float32 tensor of `shape` in this format (the closed form)."""
        return math.prod(shape) * torch.empty(0, dtype=self.element_dtype).element_size()

    def payload_numel(self, shape: tuple[int, ...]) -> int:
        """Elements of `element_dtype` in the payload buffer."""
        return self.payload_nbytes(shape) // torch.empty(0, dtype=self.element_dtype).element_size()

    def check(self, t: torch.Tensor, what: str) -> None:
        """Refuses what the format cannot carry faithfully (non-finite values, in any format)."""
        if not torch.isfinite(t).all():
            raise FloatingPointError(f"non-finite values in {what}: refused before {self.name} encoding")

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class FloatFormat(WireFormat):
    """A narrower float: relative error `relative_error`, values up to `max_abs` (None: float32's range), and
    below its normal range half its smallest subnormal step (`subnormal_error`)."""
    relative_error: float = 0.0
    max_abs: float | None = None
    subnormal_error: float = 0.0

    def check(self, t: torch.Tensor, what: str) -> None:
        super().check(t, what)
        if self.max_abs is not None and t.numel() and t.abs().max().item() > self.max_abs:
            raise FloatingPointError(f"{what} holds |x| = {t.abs().max().item():.4g}, beyond {self.name}'s "
                                     f"{self.max_abs:g}: set the wire key to bfloat16 (float32's range) or float32")

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().contiguous().view(-1).to(self.element_dtype)

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return payload.view(-1).to(torch.float32).view(shape)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().abs().to(torch.float64)
        if not self.subnormal_error:
            return a * self.relative_error
        return torch.maximum(a * self.relative_error, torch.full_like(a, self.subnormal_error))


@dataclass(frozen=True)
class Int8Format(WireFormat):
    """Symmetric int8 with one float32 scale per sample: the int8 values then the scales, as raw bytes."""

    def payload_nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) + 4 * _rows(shape)

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        rows = _per_sample(t.detach().contiguous())
        scale = rows.abs().amax(dim=1) / INT8_LEVELS if rows.shape[1] else rows.new_zeros(rows.shape[0])
        # an all-zero sample has scale 0: divide by 1 instead (its values are 0 either way)
        q = torch.round(rows / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1))
        q = q.clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
        return torch.cat([q.view(-1).view(torch.uint8), scale.to(torch.float32).view(torch.uint8)])

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        flat = payload.view(-1)
        q = _per_sample(flat[:numel].view(torch.int8).to(torch.float32).view(shape))
        scale = flat[numel:].clone().view(torch.float32)   # a copy: the scales start at any byte offset
        return (q * scale.unsqueeze(1)).view(shape)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        rows = _per_sample(x.detach().abs().to(torch.float64))
        half_step = rows.amax(dim=1, keepdim=True) / INT8_LEVELS / 2 if rows.shape[1] else rows[:, :1]
        # plus float32 rounding of the scale, the division and the product (a few ulps of |x|)
        return (half_step * (1 + 2.0 ** -20) + rows * 2.0 ** -22).reshape(x.shape)


WIRE_FORMATS = {
    "bfloat16": FloatFormat("bfloat16", 0, torch.bfloat16, relative_error=2.0 ** -8),
    "float16": FloatFormat("float16", 1, torch.float16, relative_error=2.0 ** -11, max_abs=FLOAT16_MAX,
                           subnormal_error=2.0 ** -25),
    "int8": Int8Format("int8", 2, torch.uint8),     # int8 values then float32 scales, as raw bytes
}


def _rows(shape: tuple[int, ...]) -> int:
    """Samples of an int8 payload: the size of dim 0 (a 0-d tensor is one sample)."""
    return shape[0] if len(shape) else 1


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    """[samples, elements per sample] view (an empty batch too, where reshape(0, -1) is ambiguous)."""
    rows = _rows(tuple(x.shape))
    return x.reshape(rows, x.numel() // rows if rows else 0)


# the codec by format, as functions (the transport and the tests call these)
def check_finite(t: torch.Tensor, fmt: WireFormat, what: str) -> None:
    """Refuses a tensor the format cannot carry faithfully. `what` names the message (kind, client, round)."""
    fmt.check(t, what)


def encode(t: torch.Tensor, fmt: WireFormat) -> torch.Tensor:
    """A float32 tensor -> the flat payload of `fmt` (on the tensor's device)."""
    return fmt.encode(t)


def decode(payload: torch.Tensor, fmt: WireFormat, shape: tuple[int, ...]) -> torch.Tensor:
    """A payload of `fmt` -> the float32 tensor of `shape` (on the payload's device)."""
    return fmt.decode(payload, shape)


def error_bound(x: torch.Tensor, fmt: WireFormat) -> torch.Tensor:
    """Per-element bound on |decode(encode(x)) - x| for float32 `x` (the tests hold the codec to it)."""
    return fmt.error_bound(x)


def parse(kind_key: str, value: str) -> WireFormat | None:
    """A config value -> its format (None: float32, nothing to encode). Unknown values are refused naming the key."""
    if value not in FORMATS:
        raise ValueError(f"config {kind_key}={value!r} is not allowed: one of {', '.join(FORMATS)}")
    return WIRE_FORMATS.get(value)
