"""Splitting a labelled training set among federated clients.

Every scheme is a pure function of (labels, arguments, seed), so all MPI ranks compute the same
partition without communicating.
"""
from __future__ import annotations

import numpy as np

PARTITIONS = ("iid", "noniid_dirichlet", "dirichlet_niidbench", "shards")
# NIID-Bench's floor: the Dirichlet split is drawn again until every client holds at least this many samples.
NIIDBENCH_MIN_SIZE = 10
NIIDBENCH_ATTEMPTS = 1000


def partition(labels: np.ndarray, num_clients: int, scheme: str, *, alpha: float = 1.0,
              shards_per_client: int = 2, samples_per_client: int | None = None,
              seed: int = 0) -> list[np.ndarray]:
    """Disjoint int64 index arrays, one per client, into `labels` (see the scheme functions).

    samples_per_client (iid and noniid_dirichlet): every client gets exactly that many samples instead of an
    equal share of all of them (SGLR's fixed 1000 per client, so the data used grows with the clients; a
    Dirichlet split at a scale a CPU trains).
    """
    labels = np.asarray(labels, dtype=np.int64).ravel()
    n = len(labels)
    if scheme not in PARTITIONS:
        raise ValueError(f"dataset.distribution={scheme!r} is unknown; choose one of {', '.join(PARTITIONS)}")
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} must be at least 1")
    if num_clients > n:
        raise ValueError(f"num_clients={num_clients} exceeds the {n} training samples; "
                         "lower num_clients or use a larger dataset")
    if samples_per_client is not None:
        if scheme not in ("iid", "noniid_dirichlet"):
            raise ValueError(f"dataset.samples_per_client={samples_per_client} works only with "
                             f"dataset.distribution=iid or noniid_dirichlet, not {scheme}; "
                             f"set dataset.samples_per_client=null")
        if samples_per_client < 1 or num_clients * samples_per_client > n:
            raise ValueError(f"num_clients x dataset.samples_per_client = {num_clients} x {samples_per_client} "
                             f"must be between 1 and the {n} training samples; lower one of them")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return _iid(n, num_clients, samples_per_client or n // num_clients, rng)
    if scheme == "noniid_dirichlet":
        if not alpha > 0:
            raise ValueError(f"dataset.alpha={alpha} must be > 0 (small = skewed, large = near iid)")
        return _dirichlet(labels, num_clients, float(alpha), rng, samples_per_client or n // num_clients)
    if scheme == "dirichlet_niidbench":
        if not alpha > 0:
            raise ValueError(f"dataset.alpha={alpha} must be > 0 (small = skewed, large = near iid)")
        if num_clients * NIIDBENCH_MIN_SIZE > n:
            raise ValueError(f"dataset.distribution=dirichlet_niidbench gives every client at least "
                             f"{NIIDBENCH_MIN_SIZE} samples; {num_clients} clients need {num_clients * NIIDBENCH_MIN_SIZE}"
                             f" but there are {n}: lower num_clients")
        return _dirichlet_niidbench(labels, num_clients, float(alpha), rng)
    if shards_per_client < 1 or num_clients * shards_per_client > n:
        raise ValueError(f"dataset.shards_per_client={shards_per_client} must be >= 1 and "
                         f"num_clients * shards_per_client <= {n} samples")
    return _shards(labels, num_clients, shards_per_client, rng)


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """int64 [num_clients, num_classes]: how many samples of each class every client holds."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.stack([np.bincount(labels[p], minlength=num_classes)[:num_classes] for p in parts]
                    ).astype(np.int64).reshape(len(parts), num_classes)


def _iid(n: int, m: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The first m * size entries of a random permutation, cut into m pieces; the rest is unused."""
    perm = rng.permutation(n).astype(np.int64)
    return [perm[k * size:(k + 1) * size] for k in range(m)]


def _dirichlet(labels: np.ndarray, m: int, alpha: float, rng: np.random.Generator,
               size: int) -> list[np.ndarray]:
    """Hsu et al. 2019 with equal client sizes.

    Client k has class weights p_k ~ Dir(alpha * 1) and draws `size` samples one at a time:
    class ~ p_k (renormalised over classes that still have samples), then the next unused index
    of that class. A class that runs out is zeroed for every client.

    Vectorised: a block of draws is taken from the current weights at once and accepted up to
    the first draw of a class that has no index left. Discarding that draw and drawing again from
    the renormalised weights is rejection sampling, so the accepted sequence has exactly the
    distribution of the one-at-a-time process.
    """
    num_classes = int(labels.max()) + 1
    # Classes' indices are shuffled once up front; `pool[start[c] + used[c]]` is c's next index.
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    pool = np.concatenate(pools).astype(np.int64)
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(remaining)[:-1]])
    used = np.zeros(num_classes, dtype=np.int64)
    weights = rng.dirichlet(np.full(num_classes, alpha), size=m)
    weights[:, remaining == 0] = 0.0

    parts = []
    for k in range(m):
        chunks, need = [], size
        while need > 0:
            p = weights[k]
            if p.sum() <= 0:  # every class this client likes is exhausted: fall back to uniform
                p = (remaining > 0).astype(np.float64)
            draws = rng.choice(num_classes, size=need, p=p / p.sum())
            # rank[j] = how many earlier draws in this block picked the same class as draw j
            order = np.argsort(draws, kind="stable")
            first = np.searchsorted(draws[order], np.arange(num_classes))
            rank = np.empty(need, dtype=np.int64)
            rank[order] = np.arange(need) - first[draws[order]]
            over = rank >= remaining[draws]
            t = int(np.argmax(over)) if over.any() else need
            cls, r = draws[:t], rank[:t]
            chunks.append(pool[start[cls] + used[cls] + r])
            taken = np.bincount(cls, minlength=num_classes)
            used += taken
            remaining -= taken
            weights[:, remaining == 0] = 0.0
            need -= t
        parts.append(np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64))
    return parts


def _dirichlet_niidbench(labels: np.ndarray, m: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """NIID-Bench's Dirichlet split (Li et al. 2022, "Federated learning on non-IID data silos"; GAS's Dir 0.1 rows):
    unequal client sizes.

    For each class in turn: shuffle its indices, draw proportions over the clients ~ Dir(alpha * 1), zero the
    proportion of every client that already holds N / m samples or more (so no client grows far past an equal
    share), renormalise, and cut the class at the cumulative proportions (floored). Every sample goes to exactly
    one client. The whole split is drawn again until every client holds at least NIIDBENCH_MIN_SIZE samples; each
    client's indices are shuffled at the end. (Where every remaining client's proportion underflows to zero, which
    NIID-Bench would turn into NaN, the split is drawn again too.)
    """
    n, num_classes = len(labels), int(labels.max()) + 1
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    for _ in range(NIIDBENCH_ATTEMPTS):
        parts = [[] for _ in range(m)]
        sizes = np.zeros(m, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(m, alpha)) * (sizes < n / m)
            if not p.sum() > 0:
                break
            cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(np.int64)[:-1]
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
                sizes[k] += len(piece)
        else:
            if sizes.min() >= NIIDBENCH_MIN_SIZE:
                return [rng.permutation(np.concatenate(p)).astype(np.int64) for p in parts]
    raise ValueError(f"dataset.distribution=dirichlet_niidbench: no split with at least {NIIDBENCH_MIN_SIZE} samples "
                     f"per client in {NIIDBENCH_ATTEMPTS} draws (alpha={alpha}, {m} clients, {n} samples); raise "
                     f"dataset.alpha or lower num_clients")


def _shards(labels: np.ndarray, m: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al.'s shards, as GAS uses them: sort by label, cut into m * per_client equal shards, give each
    client per_client shards drawn at random (the n % (m * per_client) samples left over go unused)."""
    num_shards = m * per_client
    shard_size = len(labels) // num_shards
    # The shuffle first makes the order of equal labels (which samples share a shard) random.
    perm = rng.permutation(len(labels))
    by_label = perm[np.argsort(labels[perm], kind="stable")].astype(np.int64)
    shards = by_label[:num_shards * shard_size].reshape(num_shards, shard_size)
    owners = rng.permutation(num_shards).reshape(m, per_client)
    return [shards[np.sort(owners[k])].ravel() for k in range(m)]
