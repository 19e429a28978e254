"""Model state <-> one contiguous byte payload, and federated averaging.

Both ends of a model transfer build the same architecture, so the layout (names, dtypes, shapes, in state_dict
order) is known on both sides and only raw bytes cross the wire: the payload of a model message is exactly
params + buffers, the size the FSL-SAGE reference counts. Named states of unknown layout (checkpoints) carry a
JSON manifest instead; JSON is parsed, never unpickled.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn as nn


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def pack_state(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """All tensors of a state_dict, in order, as one uint8 tensor (on CPU)."""
    parts = [t.detach().to("cpu").contiguous().view(-1).view(torch.uint8) for t in state.values()]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def _typed(buf: torch.Tensor, offset: int, n: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """bytes [offset, offset+n) of `buf` as a tensor: a view when aligned for `dtype`, else a copy."""
    raw = buf[offset:offset + n]
    if offset % torch.empty(0, dtype=dtype).element_size():
        raw = raw.clone()
    return raw.view(dtype).view(shape)


def unpack_state(buf: torch.Tensor, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `pack_state` for a state laid out like `template` (views into `buf`)."""
    expected = state_nbytes(template)
    if buf.dtype != torch.uint8 or buf.numel() != expected:
        raise ValueError(f"model payload has {buf.numel()} bytes, the model needs {expected}")
    out, offset = {}, 0
    for name, t in template.items():
        n = t.numel() * t.element_size()
        out[name] = _typed(buf, offset, n, t.dtype, t.shape)
        offset += n
    return out


def load_packed(module: nn.Module, buf: torch.Tensor) -> None:
    """Copies a packed state into `module` in place (device and dtype of the module's tensors are kept)."""
    target = module.state_dict()
    with torch.no_grad():
        for name, value in unpack_state(buf, target).items():
            target[name].copy_(value)


def fedavg(packed: list[torch.Tensor], weights: list[float], template: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weighted average of packed states over the WHOLE state_dict (BN running statistics included).
    Sums in float64 in the given (canonical) order; integer buffers (num_batches_tracked) are rounded."""
    return fedavg_states((unpack_state(p, template) for p in packed), weights, template)


def fedavg_states(states, weights: list[float], template: dict[str, torch.Tensor]) -> torch.Tensor:
    """`fedavg` over an iterable of state_dicts, consumed one at a time (so they need not all exist at once), with
    the same arithmetic: the result is bit-identical."""
    acc = RunningAverage(template, weights)
    for s in states:
        acc.add(s)
    return acc.packed()


class RunningAverage:
    """`fedavg` one state at a time, in the order given (float64 sums, so only one state need exist at once)."""

    def __init__(self, template: dict[str, torch.Tensor], weights: list[float]):
        self.template, self.weights, self.total = template, list(weights), float(sum(weights))
        self.acc = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in template.items()}
        self.count = 0

    def add(self, state: dict[str, torch.Tensor] | torch.Tensor) -> None:
        """Adds the next state (a state_dict, or one packed like the template)."""
        if isinstance(state, torch.Tensor):
            state = unpack_state(state, self.template)
        w = self.weights[self.count]
        for name in self.template:
            self.acc[name] += state[name].detach().to("cpu", torch.float64) * (w / self.total)
        self.count += 1

    def packed(self) -> torch.Tensor:
        if self.count != len(self.weights):
            raise ValueError(f"averaged {self.count} states of {len(self.weights)}")
        return pack_state({name: a.round().to(t.dtype) if not t.dtype.is_floating_point else a.to(t.dtype)
                           for (name, t), a in zip(self.template.items(), self.acc.values())})


# ---------------------------------------------------------------- named states (checkpoints)
def flatten_state(obj, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Nested dicts/lists of tensors and plain values (e.g. an optimizer state_dict) -> flat
    {path: tensor} plus a JSON-able dict {path: value} of the non-tensor leaves."""
    tensors, plain = {}, {}
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            t, p = flatten_state(v, f"{prefix}/{k}" if prefix else str(k))
            tensors.update(t)
            plain.update(p)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            t, p = flatten_state(v, f"{prefix}/{i}")
            tensors.update(t)
            plain.update(p)
    else:
        plain[prefix] = obj
    return tensors, plain


def named_manifest(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> torch.Tensor:
    """The UTF-8 JSON manifest (names, dtypes, shapes, offsets, meta) of `pack_state(tensors)`; it depends on the
    tensors' shapes and dtypes only, not on their values."""
    entries, offset = [], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        entries.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, n])
        offset += n
    manifest = json.dumps({"tensors": entries, "meta": meta or {}}).encode()
    return torch.frombuffer(bytearray(manifest), dtype=torch.uint8)


def pack_named(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(manifest, payload): the manifest of `named_manifest` and the raw bytes."""
    return named_manifest(tensors, meta), pack_state(tensors)


def unpack_named(manifest: torch.Tensor, payload: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    info = json.loads(bytes(manifest.numpy()).decode())
    out = {}
    for name, dtype, shape, offset, n in info["tensors"]:
        if offset + n > payload.numel():
            raise ValueError(f"named state entry {name!r} runs past the payload ({offset + n} > {payload.numel()})")
        out[name] = _typed(payload, offset, n, getattr(torch, dtype), shape)
    return out, info["meta"]


def numpy_of(t: torch.Tensor) -> np.ndarray:
    """A numpy view for HDF5 (bf16 has no numpy type: stored as raw uint16 bits)."""
    t = t.detach().cpu()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
