"""What every rank knows at start-up: ranks and roles, the virtual clients each client rank hosts, the data
partition (computed from the seed, identical everywhere), the model factory and the random streams."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from mpisage.config import Config, ConfigError
from mpisage.data import ImageDataset, convert_dataset, label_histograms, load_dataset, partition
from mpisage.models import SplitModel, build_split
from mpisage.runtime.transport import F_SERVER, FIRST_CLIENT_RANK, S_SERVER, Transport

STREAMS = {"init": 0, "client": 1, "server": 2, "fserver": 3}
PARTS = ("client", "server", "aux")


def derive_seed(seed: int, stream: str, index: int = 0) -> int:
    """Independent, reproducible 63-bit seeds per (seed, role stream, client id)."""
    return int(np.random.SeedSequence([seed, STREAMS[stream], index]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class World:
    cfg: Config
    transport: Transport
    data: ImageDataset
    parts: list[np.ndarray]               # train indices per client
    histograms: np.ndarray                # [num_clients, num_classes]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_index: dict[int, np.ndarray] = field(default_factory=dict)   # client id -> rows of this rank's train_x
    resume_from: tuple[str, int] | None = None    # (checkpoint path, its round) when resuming
    test_samples: int = 0                 # test samples every evaluation scores (the first eval.samples, or all)
    _initial: SplitModel | None = field(default=None, repr=False)

    @property
    def start_round(self) -> int:
        return 0 if self.resume_from is None else self.resume_from[1] + 1

    def resume_state(self, group: str) -> dict[str, torch.Tensor]:
        """This rank's flat state from the resume checkpoint (every rank reads its own group)."""
        from mpisage.runtime.checkpoint import read_checkpoint
        return read_checkpoint(self.resume_from[0], [group])[1][group]

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    @property
    def client_ranks(self) -> list[int]:
        return list(range(FIRST_CLIENT_RANK, self.transport.size))

    def rank_of(self, cid: int) -> int:
        """Virtual clients are dealt round-robin over the client ranks; a rank runs its clients in id order."""
        return FIRST_CLIENT_RANK + cid % self.num_client_ranks

    def clients_of(self, rank: int) -> list[int]:
        if rank < FIRST_CLIENT_RANK:
            return []
        return list(range(rank - FIRST_CLIENT_RANK, self.num_clients, self.num_client_ranks))

    @property
    def num_client_ranks(self) -> int:
        return self.transport.size - FIRST_CLIENT_RANK

    def num_samples(self, cid: int) -> int:
        return len(self.parts[cid])

    def steps_per_round(self, cid: int) -> int:
        return self.cfg.local_epochs * math.ceil(self.num_samples(cid) / self.cfg.batch_size)

    def batch_sizes(self, cid: int) -> list[int]:
        """The size of every local step of a round (the last batch of an epoch is ragged)."""
        n, b = self.num_samples(cid), self.cfg.batch_size
        epoch = [b] * (n // b) + ([n % b] if n % b else [])
        return epoch * self.cfg.local_epochs

    def build_model(self, parts: tuple[str, ...] = PARTS) -> SplitModel:
        """A fresh copy of the named parts of the initial split (the others None): the same weights on every rank
        and for every client (the paper starts all clients from one). Built once per rank, copied after."""
        split = self._initial_split()
        return SplitModel(**{p: copy.deepcopy(self._part(split, p)) if p in parts else None for p in PARTS})

    def release_parts(self, keep) -> None:
        """Frees the parts of the initial split this rank's role never copies again (a client rank of most methods
        never needs the server part: 40 MB for ResNet-18, most of GPT-2 medium). The split is still built whole
        once, from one seeded stream, so every part has the same weights as on the ranks that keep it."""
        split = self._initial_split()
        for p in PARTS:
            if p not in keep:
                setattr(split, p, None)

    def _part(self, split: SplitModel, part: str) -> torch.nn.Module:
        module = getattr(split, part)
        if module is None:
            raise RuntimeError(f"rank {self.rank} released the initial {part} part (World.release_parts): its role "
                               f"was declared not to need it; keep it there")
        return module

    def _initial_split(self) -> SplitModel:
        if self._initial is None:
            torch.manual_seed(derive_seed(self.cfg.seed, "init"))
            self._initial = build_split(self.cfg.model, in_channels=self.data.in_channels,
                                        image_size=self.data.image_size, num_classes=self.data.num_classes,
                                        aux=self.cfg.aux_model, lm=self.cfg.lm, seq_len=self.seq_len)
            for module in (self._initial.client, self._initial.server, self._initial.aux):
                module.to(self.device)
        return self._initial

    @property
    def seq_len(self) -> int | None:
        return getattr(self.data, "seq_len", None)

    @property
    def is_token_task(self) -> bool:
        """Language modelling (token ids in, next-token targets out) rather than image classification."""
        return self.seq_len is not None

    def example_input(self, n: int) -> torch.Tensor:
        """n all-zero model inputs of this dataset's shape and type (for shape probes and cost counts)."""
        if self.is_token_task:
            return torch.zeros(n, self.seq_len, dtype=torch.int64, device=self.device)
        return torch.zeros(n, self.data.in_channels, self.data.image_size, self.data.image_size, device=self.device)

    def initial_part(self, part: str) -> torch.nn.Module:
        """A fresh copy of one part ("client", "server" or "aux") of the initial split, without copying the rest."""
        return copy.deepcopy(self._part(self._initial_split(), part))

    def generator(self, stream: str, index: int = 0) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(derive_seed(self.cfg.seed, stream, index))
        return g


def make_world(cfg: Config, transport: Transport) -> World:
    """Loads the data, checks the rank count and partition, and keeps on this rank only what its role needs."""
    size = transport.size
    if size < FIRST_CLIENT_RANK + 1:
        raise ConfigError(f"mpisage needs at least 3 MPI ranks (F-server, S-server, one client rank); got {size}. "
                          f"Run e.g. `mpirun -n 11 python -m mpisage.run`.")
    client_ranks = size - FIRST_CLIENT_RANK
    num_clients = cfg.num_clients if cfg.num_clients is not None else client_ranks
    if num_clients < client_ranks:
        raise ConfigError(f"num_clients={num_clients} is fewer than the {client_ranks} client ranks of `mpirun -n "
                          f"{size}`: every client rank must host a client. Use num_clients>={client_ranks} or "
                          f"`mpirun -n {num_clients + FIRST_CLIENT_RANK}`.")
    data = load_dataset(cfg.dataset.name, cfg.dataset.root, seq_len=cfg.dataset.seq_len)   # converted below
    labels = data.train_y.numpy()
    if labels.ndim > 1:       # token targets: clients are dealt whole samples, label skew has no meaning here
        if cfg.dataset.distribution != "iid":
            raise ConfigError(f"dataset.distribution={cfg.dataset.distribution!r} needs class labels; "
                              f"{data.name} is a language-modelling dataset: use dataset.distribution=iid")
        labels = np.zeros(len(labels), dtype=np.int64)
    try:
        parts = partition(labels, num_clients, cfg.dataset.distribution, alpha=cfg.dataset.alpha,
                          shards_per_client=cfg.dataset.shards_per_client,
                          samples_per_client=cfg.dataset.samples_per_client, seed=derive_seed(cfg.seed, "init", 1))
    except ValueError as e:
        raise ConfigError(f"cannot partition {data.name} for num_clients={num_clients}: {e}") from None
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(f"clients {empty[:5]} got no training data ({len(labels)} samples for {num_clients} "
                          f"clients, distribution={cfg.dataset.distribution}); use fewer clients")
    hist = label_histograms(labels, parts, data.num_classes if data.train_y.dim() == 1 else 1)
    world = World(cfg, transport, data, parts, hist)
    # counted here: the F-server, which records it in the metrics file, drops its test set below
    world.test_samples = len(data.test_y) if cfg.eval.samples is None else min(cfg.eval.samples, len(data.test_y))
    # Keep what this rank's role needs (11 ranks share one machine's memory).
    if transport.rank == F_SERVER:
        data.train_x = data.train_x[:0]
        data.test_x, data.test_y = data.test_x[:0], data.test_y[:0]
    elif transport.rank == S_SERVER:
        data.train_x = data.train_x[:0]
    else:
        mine = world.clients_of(transport.rank)
        keep = torch.from_numpy(np.concatenate([parts[c] for c in mine]))
        offsets = np.cumsum([0] + [len(parts[c]) for c in mine])
        world.local_index = {c: np.arange(offsets[i], offsets[i + 1]) for i, c in enumerate(mine)}
        data.train_x, data.train_y = data.train_x[keep].clone(), data.train_y[keep].clone()
        data.test_x, data.test_y = data.test_x[:0], data.test_y[:0]
    convert_dataset(data, cfg.dataset.image_size, cfg.dataset.channels)    # only the rows this rank kept
    return world
