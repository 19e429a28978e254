"""Per-client state kept compact while idle, materialised into a few reusable slots while in use.

A job with hundreds or thousands of virtual clients cannot keep a live model and optimiser per client: live
objects cost their full size plus allocator overhead, on the GPU when there is one. A `ClientStore` holds every
client's state as packed bytes (one contiguous CPU buffer per client, `backend="memory"`) or in a file on node-local
disk (`backend="disk"`: the process keeps only offsets; the page cache, not the process, holds what is hot), and
keeps at most `slots` live objects (built by `make`, a `Stateful` dataclass such as `ClientState`), least recently
used first out. Asking for a client that is not live writes the least recently used slot's state back to the store
and loads the client's state into that slot's object, in place (module weights, optimiser state, random stream,
tensors), so no module is ever rebuilt after the first `slots`. A client never materialised has its initial state,
which is shared: the state of the first object built plus `fresh(cid)` (its own random stream, say).

Loading and saving go through the same `Stateful` state_dict / load_state_dict as checkpoints, so a client that
goes through the store comes back bit for bit, and `state_dict()` (every client ever materialised, keyed
`key(cid)`) is the checkpoint the live objects would have written.

A reference to a live object is valid until the next client is asked for: code that works on several clients at
once takes them inside `with store.use(cids):`, which pins them (the store grows past `slots` rather than evict a
pinned client).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from mpisage.runtime.state import flatten_state, pack_state
from mpisage.runtime.stateful import Stateful, load_value

BACKENDS = ("memory", "disk")


class FieldView(Mapping):
    """`store[cid].<name>` as a mapping (cid -> value), for code written against per-client dicts; `cid in view`
    says whether that client's value exists (a tensor made on first use)."""

    def __init__(self, store: "ClientStore", name: str):
        self.store, self.name = store, name

    def __getitem__(self, cid):
        value = getattr(self.store[cid], self.name)
        if value is None:
            raise KeyError(cid)
        return value

    def __setitem__(self, cid, value) -> None:
        setattr(self.store[cid], self.name, value)

    def __contains__(self, cid) -> bool:
        return cid in self.store and getattr(self.store[cid], self.name) is not None

    def __iter__(self):
        return (cid for cid in self.store.ids if cid in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ClientStore(Mapping):
    def __init__(self, ids: Sequence[int], make: Callable[[int], Stateful], *, slots: int = 2,
                 backend: str = "memory", directory: str | None = None,
                 fresh: Callable[[int], dict[str, torch.Tensor]] | None = None,
                 bind: Callable[[Stateful, int], None] | None = None, key: Callable[[int], str] = str,
                 device=None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown client store backend {backend!r}; allowed: {BACKENDS}")
        if slots < 1:
            raise ValueError(f"client store slots={slots}: must be >= 1")
        self.ids = list(ids)
        self._known = set(self.ids)
        self.make, self.fresh, self.bind, self.key = make, fresh, bind, key
        self.slots, self.backend = slots, backend
        self.device = torch.device(device or "cpu")     # where tensors made on first use live when loaded
        self._live: OrderedDict[int, Stateful] = OrderedDict()     # least recently used first
        self._pins: dict[int, int] = {}
        self._entries: dict[int, tuple] = {}        # cid -> (layout, packed uint8 | (offset, capacity) on disk)
        self._layouts: dict[tuple, tuple] = {}      # one copy of each distinct layout
        self._initial: dict[str, torch.Tensor] | None = None
        self._file, self._end = None, 0
        if backend == "disk":
            fd, path = tempfile.mkstemp(prefix="mpisage-clients-", suffix=".bin", dir=directory)
            os.unlink(path)         # the file lives while the process holds it, and goes with the process
            self._file = fd
        self.loads = self.saves = 0                 # materialisations and write-backs (for benchmarks and tests)

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, cid: int) -> Stateful:
        if cid not in self._known:
            raise KeyError(cid)
        obj = self._live.get(cid)
        if obj is not None:
            self._live.move_to_end(cid)
            return obj
        obj = self._slot_for(cid)
        self._live[cid] = obj
        return obj

    def __contains__(self, cid) -> bool:
        return cid in self._known

    def __iter__(self):
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    @contextlib.contextmanager
    def use(self, cids: Iterable[int]):
        """Pins `cids` live for the block (they are materialised on entry)."""
        cids = list(cids)
        for cid in cids:
            self._pins[cid] = self._pins.get(cid, 0) + 1
            self[cid]
        try:
            yield [self._live[cid] for cid in cids]
        finally:
            for cid in cids:
                self._pins[cid] -= 1
                if not self._pins[cid]:
                    del self._pins[cid]

    @property
    def live(self) -> list[int]:
        return list(self._live)

    # ------------------------------------------------------------------ slots
    def _slot_for(self, cid: int) -> Stateful:
        """A live object holding `cid`'s state: a new one while there are free slots, else the least recently used
        unpinned one, written back first."""
        victim = next((v for v in self._live if v not in self._pins), None)
        if len(self._live) < self.slots or victim is None:
            obj = self.make(cid)
            if self._initial is None:
                self._initial = _clone(_flat(obj))
                for name in (self.fresh(cid) if self.fresh else {}):
                    self._initial.pop(name, None)
            if cid in self._entries:
                self._load(obj, cid)
            return obj
        obj = self._live.pop(victim)
        self._save(victim, obj)
        self._load(obj, cid)
        return obj

    def _load(self, obj: Stateful, cid: int) -> None:
        if cid in self._entries:
            flat = self._read(cid)
        else:
            flat = {**self._initial, **(self.fresh(cid) if self.fresh else {})}
        load_into(obj, flat, self.device)
        if self.bind:
            self.bind(obj, cid)
        self.loads += 1

    def _save(self, cid: int, obj: Stateful) -> None:
        self._write(cid, _flat(obj))
        self.saves += 1

    # ------------------------------------------------------------------ storage
    def _write(self, cid: int, flat: dict[str, torch.Tensor]) -> None:
        layout = tuple((name, t.dtype, tuple(t.shape)) for name, t in flat.items())
        layout = self._layouts.setdefault(layout, layout)
        packed = pack_state(flat)         # a copy (torch.cat), so the live object can go on changing
        if self.backend == "memory":
            self._entries[cid] = (layout, packed)
            return
        offset, capacity = self._entries[cid][1] if cid in self._entries else (self._end, 0)
        if packed.numel() > capacity:          # grown (a buffer filling up): a new place at the end
            offset, capacity = self._end, packed.numel()
            self._end += capacity
        if os.pwrite(self._file, packed.numpy().data, offset) != packed.numel():    # Linux: < 2 GiB in one call
            raise OSError(f"client store: short write of client {cid}'s state (disk full?)")
        self._entries[cid] = (layout, (offset, capacity))

    def _read(self, cid: int) -> dict[str, torch.Tensor]:
        layout, where = self._entries[cid]
        if self.backend == "memory":
            buf = where
        else:
            n = sum(_nbytes(dtype, shape) for _, dtype, shape in layout)
            raw = os.pread(self._file, n, where[0])
            if len(raw) != n:
                raise OSError(f"client store: short read of client {cid}'s state")
            buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        out, offset = {}, 0
        for name, dtype, shape in layout:
            n = _nbytes(dtype, shape)
            raw = buf[offset:offset + n]
            if offset % torch.empty(0, dtype=dtype).element_size():
                raw = raw.clone()
            out[name] = raw.view(dtype).view(shape)
            offset += n
        return out

    def nbytes(self) -> int:
        """Bytes the store holds for idle clients (in memory or on disk)."""
        return sum(sum(_nbytes(d, s) for _, d, s in layout) for layout, _ in self._entries.values())

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            os.close(self._file)
            self._file = None

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """{key(cid): flat state} of every client ever materialised, in id order (live ones as they are now)."""
        out = {}
        for cid in self.ids:
            if cid in self._live:
                out[self.key(cid)] = _flat(self._live[cid])
            elif cid in self._entries:
                out[self.key(cid)] = self._read(cid)
        return out

    def load_state_dict(self, flat: dict[str, torch.Tensor], prefix: str = "", device=None) -> None:
        """Restores from a checkpoint's flat `prefix/key(cid)/...` tensors; clients absent from it keep their
        initial state. Live objects are dropped without being written back."""
        heads = {self.key(cid): cid for cid in self.ids}
        per_client: dict[int, dict[str, torch.Tensor]] = {}
        lead = f"{prefix}/" if prefix else ""
        for name, t in flat.items():
            if not name.startswith(lead):
                continue
            head, _, rest = name[len(lead):].partition("/")
            if head in heads and rest:
                per_client.setdefault(heads[head], {})[rest] = t
        self._live.clear()
        self._entries.clear()
        for cid, state in per_client.items():
            self._write(cid, state)


def load_into(obj: Stateful, flat: dict[str, torch.Tensor], device=None) -> None:
    """Loads a state written by `_flat` into `obj` in place. A tensor field absent from `flat` was made on first
    use and not yet made for this client: it becomes None."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("transient"):
            continue
        value = getattr(obj, f.name)
        present = f.name in flat or any(k.startswith(f.name + "/") for k in flat)
        if isinstance(value, torch.Tensor) or (value is None and f.name in flat):
            where = value.device if isinstance(value, torch.Tensor) else (device or "cpu")
            setattr(obj, f.name, flat[f.name].to(where, copy=True) if present else None)
        elif value is not None:
            setattr(obj, f.name, load_value(value, flat, f.name))


def _flat(obj: Stateful) -> dict[str, torch.Tensor]:
    return flatten_state(obj.state_dict())[0]


def _clone(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.detach().to("cpu", copy=True) for k, t in flat.items()}


def _nbytes(dtype: torch.dtype, shape: tuple) -> int:
    n = torch.empty(0, dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n
