"""State that checkpoints itself.

A role's state is a dataclass (`ClientState`, `ServerState` and the algorithms' subclasses). `Stateful` gives it
`state_dict()` (nested dicts of tensors, from every field not marked `transient`) and `load_state_dict(flat,
prefix)` (the inverse, from a checkpoint's flat `prefix/a/b` tensors), so one generic pair writes and restores
every algorithm's state. Modules, optimisers, generators, tensors, numbers, dicts of those, and objects with their
own `state_dict`/`load_state_dict` are understood.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, corrupt, or of another model/config."""


def transient(**kwargs):
    """A dataclass field that is not part of the checkpoint (scratch state rebuilt every round)."""
    return dataclasses.field(metadata={"transient": True}, **kwargs)


def state_of(value):
    """The checkpointable form of one value (nested dicts of tensors and plain values)."""
    if isinstance(value, (nn.Module, torch.optim.Optimizer)) or hasattr(value, "state_dict"):
        return value.state_dict()
    if isinstance(value, torch.Generator):
        return value.get_state()
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool):
        raise TypeError("a bool state field is ambiguous; store an int")
    if isinstance(value, int):
        return torch.tensor([value], dtype=torch.int64)
    if isinstance(value, float):
        return torch.tensor([value], dtype=torch.float64)
    if isinstance(value, dict):
        return {k: state_of(v) for k, v in value.items()}
    raise TypeError(f"cannot checkpoint a {type(value).__name__}")


def load_value(value, flat: dict[str, torch.Tensor], key: str, device=None):
    """Restores `value` from `flat[key...]`; returns the restored value (in place where it can be)."""
    if isinstance(value, nn.Module):
        restore_module(value, flat, key)
    elif isinstance(value, torch.optim.Optimizer):
        restore_optimizer(value, flat, key)
    elif hasattr(value, "load_state_dict") and not isinstance(value, dict):
        value.load_state_dict(flat, key)
    elif isinstance(value, torch.Generator):
        value.set_state(_get(flat, key).clone())   # a view into a packed buffer crashes set_state
    elif isinstance(value, torch.Tensor):
        return _get(flat, key).clone().to(value.device)
    elif isinstance(value, int):
        return int(_get(flat, key)[0])
    elif isinstance(value, float):
        return float(_get(flat, key)[0])
    elif isinstance(value, dict):
        for k in list(value):
            value[k] = load_value(value[k], flat, f"{key}/{k}", device)
        # Tensors created on first use (e.g. a client's buffer after its first upload) come back as they were saved.
        if all(isinstance(v, torch.Tensor) for v in value.values()):
            head = key + "/"
            for name, t in flat.items():
                rest = name[len(head):] if name.startswith(head) else None
                if rest and "/" not in rest:
                    value[int(rest) if rest.lstrip("-").isdigit() else rest] = t.clone().to(device or "cpu")
    else:
        raise TypeError(f"cannot restore a {type(value).__name__}")
    return value


def _get(flat: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in flat:
        raise CheckpointError(f"checkpoint has no {key} (a different model or algorithm?)")
    return flat[key]


class Stateful:
    """For dataclasses: `state_dict()` of every field not marked transient (None fields are absent), and
    `load_state_dict(flat, prefix)`."""

    def state_dict(self) -> dict:
        return {f.name: state_of(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get("transient") and getattr(self, f.name) is not None}

    def load_state_dict(self, flat: dict[str, torch.Tensor], prefix: str, device=None) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata.get("transient") and value is not None:
                setattr(self, f.name, load_value(value, flat, f"{prefix}/{f.name}", device))


def restore_module(module: nn.Module, flat: dict[str, torch.Tensor], prefix: str) -> None:
    """Copies `prefix/<state_dict key>` entries into the module, in place."""
    target = module.state_dict()
    missing = [k for k in target if f"{prefix}/{k}" not in flat]
    if missing:
        raise CheckpointError(f"checkpoint has no {prefix}/{missing[0]} (a different model or algorithm?)")
    with torch.no_grad():
        for k, t in target.items():
            src = flat[f"{prefix}/{k}"]
            if src.shape != t.shape:
                raise CheckpointError(f"checkpoint {prefix}/{k} has shape {tuple(src.shape)}, the model {tuple(t.shape)}")
            t.copy_(src)


def restore_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor], prefix: str) -> None:
    """Rebuilds the per-parameter state from `prefix/state/<index>/<name>`; the hyper-parameters come from the
    current config (a resumed run must use the same, which the config check enforces)."""
    state: dict[int, dict] = {}
    head = f"{prefix}/state/"
    for key, t in flat.items():
        if key.startswith(head):
            index, name = key[len(head):].split("/", 1)
            state.setdefault(int(index), {})[name] = t.clone()
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
