"""Tests for mpisage.data: readers on fixture files, conversion, partitions, batched transforms, fetch;
and that the config files load and the Slurm scripts launch what they should."""
import glob
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import threading
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from mpisage.data import (
    BatchTransform,
    DataError,
    ImageDataset,
    eval_transform,
    label_histograms,
    load_dataset,
    partition,
    train_transform,
    write_cifar10_fixture,
    write_cifar100_fixture,
    write_cinic10_fixture,
    write_fashion_mnist_fixture,
)
from mpisage.data import datasets as dsmod
from mpisage.data import fetch as fetchmod

CIFAR_ORDER = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEBIAN = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Debian data, an empty user cache, and a download that fails without touching the network."""
    calls = []

    def no_download(url, dest):
        calls.append(url)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(dsmod, "FASHION_DEBIAN_DIR", str(tmp_path / "no-debian"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dsmod, "_download_file", no_download)
    return calls


# ------------------------------------------------------------------------------------------ readers

def _read_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")  # trusted: files the test itself just wrote


def test_cifar10_fixture_round_trip(tmp_path, offline):
    d = write_cifar10_fixture(str(tmp_path), 25, 7, n_batches=3, seed=1)
    raw = [_read_pickle(os.path.join(d, f"data_batch_{i}")) for i in (1, 2, 3)]
    assert [len(b[b"labels"]) for b in raw] == [9, 8, 8]  # unequal batch sizes
    test_raw = _read_pickle(os.path.join(d, "test_batch"))
    for root in (str(tmp_path), d):  # the parent or the batch directory itself
        ds = load_dataset("cifar10", root)
        assert isinstance(ds, ImageDataset) and ds.name == "cifar10"
        assert ds.train_x.shape == (25, 3, 32, 32) and ds.train_x.dtype == torch.uint8
        assert ds.test_x.shape == (7, 3, 32, 32) and ds.test_y.dtype == torch.int64
        assert ds.train_x.is_contiguous()
        assert ds.train_y.tolist() == sum((b[b"labels"] for b in raw), [])
        assert ds.test_y.tolist() == test_raw[b"labels"]
        assert sorted(set(ds.train_y.tolist())) == list(range(10))
        # rows are CHW-ordered: pixel (c, i, j) is data[c * 1024 + i * 32 + j]
        assert torch.equal(ds.train_x[9].reshape(-1), torch.from_numpy(raw[1][b"data"][0]))
        assert ds.num_classes == 10 and ds.in_channels == 3 and ds.image_size == 32
        assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)


def test_cifar10_subset_of_batches(tmp_path, offline):
    d = write_cifar10_fixture(str(tmp_path), 20, 5, n_batches=2)
    os.remove(os.path.join(d, "data_batch_1"))
    assert load_dataset("cifar10", str(tmp_path)).train_x.shape[0] == 10
    os.remove(os.path.join(d, "data_batch_2"))
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path))


def test_cifar100_fixture_round_trip(tmp_path, offline):
    d = write_cifar100_fixture(str(tmp_path), 120, 30, seed=2)
    raw = _read_pickle(os.path.join(d, "train"))
    ds = load_dataset("cifar100", str(tmp_path))
    assert ds.num_classes == 100 and ds.train_x.shape == (120, 3, 32, 32) and ds.test_x.shape[0] == 30
    assert ds.train_y.tolist() == raw[b"fine_labels"]
    assert torch.equal(ds.train_x.reshape(120, -1), torch.from_numpy(raw[b"data"]))
    assert ds.train_y.max().item() == 99


def test_cifar_missing_names_directory_and_fix(tmp_path, offline):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path))
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in msg
    assert "CIFAR-10 python version" in msg and "dataset.root" in msg
    with pytest.raises(DataError, match="cifar-100-python"):
        load_dataset("cifar100", str(tmp_path))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_fixture_round_trip(tmp_path, offline, gz):
    root = write_fashion_mnist_fixture(str(tmp_path), 30, 12, seed=3)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    raw = {}
    for n in names:
        with gzip.open(os.path.join(root, n + ".gz"), "rb") as f:
            raw[n] = f.read()
        if not gz:
            os.remove(os.path.join(root, n + ".gz"))
            with open(os.path.join(root, n), "wb") as f:
                f.write(raw[n])
    ds = load_dataset("fashion_mnist", root)
    assert ds.train_x.shape == (30, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (12, 1, 28, 28) and ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == list(raw["train-labels-idx1-ubyte"][8:])
    assert ds.test_y.tolist() == list(raw["t10k-labels-idx1-ubyte"][8:])
    assert ds.test_x.reshape(-1).numpy().tobytes() == raw["t10k-images-idx3-ubyte"][16:]
    assert ds.num_classes == 10 and ds.mean == (0.2860,) and ds.std == (0.3530,)
    assert offline == []  # found locally: no download attempted


def test_fashion_found_in_root_subdirectory(tmp_path, offline):
    write_fashion_mnist_fixture(str(tmp_path / "FashionMNIST" / "raw"), 10, 10)
    assert load_dataset("fashion_mnist", str(tmp_path)).train_x.shape[0] == 10


def test_fashion_found_in_user_cache(tmp_path, offline):
    write_fashion_mnist_fixture(str(tmp_path / "cache" / "mpisage" / "fashion-mnist"), 11, 10)
    assert load_dataset("fashion_mnist", None).train_x.shape[0] == 11


def test_fashion_download_is_atomic_into_cache(tmp_path, monkeypatch, offline):
    src = write_fashion_mnist_fixture(str(tmp_path / "server"), 13, 10)

    def fake_download(url, dest):  # stands in for urllib: serves the fixture files
        with open(os.path.join(src, url.rsplit("/", 1)[-1]), "rb") as f:
            data = f.read()
        with open(dest + ".part", "wb") as f:
            f.write(data)
        os.replace(dest + ".part", dest)
        fetched.append(url)

    fetched = []
    monkeypatch.setattr(dsmod, "_download_file", fake_download)
    ds = load_dataset("fashion_mnist", str(tmp_path / "empty"))
    assert ds.train_x.shape[0] == 13 and len(fetched) == 4
    assert all(u.startswith(dsmod.FASHION_URL) for u in fetched)
    assert sorted(os.listdir(tmp_path / "cache" / "mpisage" / "fashion-mnist")) == sorted(
        os.listdir(src))


def test_fashion_missing_lists_paths_tried(tmp_path, offline):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", str(empty))
    msg = str(e.value)
    for p in (str(empty), os.path.join(str(empty), "FashionMNIST", "raw"), dsmod.FASHION_DEBIAN_DIR,
              str(tmp_path / "cache" / "mpisage" / "fashion-mnist")):
        assert p in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "dataset.root" in msg
    assert len(offline) == 1  # one (failed) download attempt, no network used


def _rewrite_gz(path: str, change) -> None:
    """Replaces the decompressed contents of a .gz file with change(contents)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    with gzip.open(path, "wb") as f:
        f.write(change(data))


def test_fashion_truncated_file_names_it(tmp_path, offline):
    root = write_fashion_mnist_fixture(str(tmp_path), 10, 10)
    path = os.path.join(root, "train-images-idx3-ubyte.gz")
    _rewrite_gz(path, lambda data: data[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_dataset("fashion_mnist", root)
    with open(path, "wb") as f:  # not even gzip
        f.write(b"garbage")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", root)


def test_fashion_bad_magic(tmp_path, offline):
    root = write_fashion_mnist_fixture(str(tmp_path), 10, 10)
    path = os.path.join(root, "t10k-labels-idx1-ubyte.gz")
    _rewrite_gz(path, lambda data: b"\x00\x00\x08\x03" + data[4:])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*magic"):
        load_dataset("fashion_mnist", root)


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_malicious_pickle_refused(tmp_path, monkeypatch, offline):
    d = write_cifar10_fixture(str(tmp_path), 10, 5, n_batches=1)
    with open(os.path.join(d, "data_batch_1"), "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f, protocol=2)
    called = []
    spy = lambda cmd: called.append(cmd) or 0  # noqa: E731
    # the pickle names `posix.system` (os.system's home module): patch both spellings
    monkeypatch.setattr(sys.modules[os.system.__module__], "system", spy)
    monkeypatch.setattr(os, "system", spy)
    with pytest.raises(DataError, match="refusing to unpickle .*system"):
        load_dataset("cifar10", str(tmp_path))
    assert called == []


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="dataset.name"):
        load_dataset("mnist", None)


@pytest.mark.skipif(not os.path.isdir(DEBIAN), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion_mnist", None)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and ds.in_channels == 1 and ds.image_size == 28
    assert np.bincount(ds.train_y.numpy()).tolist() == [6000] * 10


# ------------------------------------------------------------------------------------- partitions

LABELS = np.repeat(np.arange(10), 100)[np.random.default_rng(5).permutation(1000)]


@pytest.mark.parametrize("scheme", ["iid", "noniid_dirichlet"])
def test_partition_disjoint_sizes_and_seeded(scheme):
    parts = partition(LABELS, 7, scheme, alpha=0.5, seed=3)
    assert len(parts) == 7 and all(p.dtype == np.int64 for p in parts)
    assert [len(p) for p in parts] == [1000 // 7] * 7
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx) and allidx.min() >= 0 and allidx.max() < 1000
    again = partition(LABELS, 7, scheme, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, 7, scheme, alpha=0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_alpha_controls_skew():
    labels = np.repeat(np.arange(10), 500)
    def max_share(alpha):
        h = label_histograms(labels, partition(labels, 10, "noniid_dirichlet", alpha=alpha, seed=0), 10)
        assert h.shape == (10, 10) and h.dtype == np.int64 and (h.sum(1) == 500).all()
        return (h.max(1) / h.sum(1))
    near_uniform = max_share(1e4)  # uniform would be 0.10; the last client takes the leftovers
    assert near_uniform.mean() < 0.14 and near_uniform.max() < 0.2
    assert max_share(0.1).mean() > 0.5


def test_dirichlet_exhausts_classes_without_overlap():
    # tiny alpha: clients want the same few classes, which run out and get zeroed
    labels = np.repeat(np.arange(5), [3, 50, 7, 30, 10])
    parts = partition(labels, 4, "noniid_dirichlet", alpha=0.01, seed=1)
    allidx = np.concatenate(parts)
    assert [len(p) for p in parts] == [25] * 4 and len(np.unique(allidx)) == 100


def test_shards_align_with_classes():
    parts = partition(LABELS, 10, "shards", shards_per_client=2, seed=0)
    h = label_histograms(LABELS, parts, 10)
    assert ((h > 0).sum(1) <= 2).all() and (h.sum(1) == 100).all()
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == 1000
    assert not all(np.array_equal(a, b) for a, b in
                   zip(parts, partition(LABELS, 10, "shards", seed=1)))


def test_shards_are_gas_shards():
    """GAS / McMahan: sort by label, cut into num_clients x shards_per_client equal shards, deal them at random."""
    labels = np.repeat(np.arange(10), 60)[np.random.default_rng(2).permutation(600)]
    m, s = 20, 2  # 40 shards of 15: each class is cut into 4 shards
    same_class_pairs = 0
    for seed in range(40):
        parts = partition(labels, m, "shards", shards_per_client=s, seed=seed)
        assert [len(p) for p in parts] == [30] * m
        assert len(np.unique(np.concatenate(parts))) == 600
        for p in parts:
            halves = labels[p].reshape(s, 15)  # a client's shards, each a run of the label-sorted order
            assert (halves == halves[:, :1]).all(), "a shard spans two classes"
            same_class_pairs += int(halves[0, 0] == halves[1, 0])
        shard_classes = np.sort(np.concatenate([labels[p].reshape(s, 15)[:, 0] for p in parts]))
        assert np.array_equal(shard_classes, np.repeat(np.arange(10), 4))
    # Dealt at random, a client's two shards share a class with probability 3/39 (one of the 3 others of
    # its first shard's class among the 39 left): about 61 of 800 clients. Dealt in order, all 800 would.
    assert 30 <= same_class_pairs <= 100


def test_samples_per_client_iid():
    parts = partition(LABELS, 6, "iid", samples_per_client=37, seed=3)
    assert [len(p) for p in parts] == [37] * 6 and all(p.dtype == np.int64 for p in parts)
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == 6 * 37 and allidx.min() >= 0 and allidx.max() < 1000
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition(LABELS, 6, "iid", samples_per_client=37, seed=3)))
    assert not np.array_equal(parts[0], partition(LABELS, 6, "iid", samples_per_client=37, seed=4)[0])
    # an equal share of everything is the plain iid split
    full = partition(LABELS, 6, "iid", samples_per_client=1000 // 6, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(full, partition(LABELS, 6, "iid", seed=3)))


def test_samples_per_client_dirichlet():
    """A Dirichlet split at a chosen size: every client exactly that many distinct samples, label-skewed; an equal
    share of everything is the plain Dirichlet split."""
    parts = partition(LABELS, 5, "noniid_dirichlet", alpha=0.3, samples_per_client=40, seed=2)
    assert [len(p) for p in parts] == [40] * 5 and len(np.unique(np.concatenate(parts))) == 200
    top_share = [np.bincount(LABELS[p], minlength=10).max() / 40 for p in parts]
    assert np.mean(top_share) > 0.3        # iid would be about 0.15-0.2; alpha = 0.3 concentrates labels
    full = partition(LABELS, 5, "noniid_dirichlet", alpha=0.3, samples_per_client=200, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(full, partition(LABELS, 5, "noniid_dirichlet", alpha=0.3, seed=2)))


@pytest.mark.parametrize("kwargs, key", [
    (dict(num_clients=3, scheme="bogus"), "dataset.distribution"),
    (dict(num_clients=3, scheme="noniid_dirichlet", alpha=0.0), "dataset.alpha"),
    (dict(num_clients=0, scheme="iid"), "num_clients"),
    (dict(num_clients=1001, scheme="iid"), "num_clients"),
    (dict(num_clients=600, scheme="shards", shards_per_client=2), "shards_per_client"),
    (dict(num_clients=11, scheme="iid", samples_per_client=91), "num_clients x dataset.samples_per_client"),
    (dict(num_clients=3, scheme="iid", samples_per_client=0), "dataset.samples_per_client"),
    (dict(num_clients=3, scheme="dirichlet_niidbench", samples_per_client=10), "dataset.samples_per_client.*iid"),
    (dict(num_clients=3, scheme="shards", samples_per_client=10), "dataset.samples_per_client.*iid"),
])
def test_partition_errors(kwargs, key):
    with pytest.raises(ValueError, match=key):
        partition(LABELS, **kwargs)


# ------------------------------------------------------------------------------------- transforms

def _batch(b=6, c=3, h=8, seed=0):
    return torch.randint(0, 256, (b, c, h, h), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _normalise(x, mean, std):
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (x.float() / 255 - m) / s


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_normalise_only():
    x = _batch()
    y = BatchTransform(MEAN, STD)(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y, _normalise(x, MEAN, STD))


def test_random_crop_is_a_window_of_padded_input():
    x = _batch(b=16)
    t = BatchTransform(MEAN, STD, crop_padding=2)
    y = t(x, torch.Generator().manual_seed(7))
    assert torch.equal(y, t(x, torch.Generator().manual_seed(7)))
    assert y.shape == x.shape and y.dtype == torch.float32
    padded = _normalise(torch.nn.functional.pad(x, (2, 2, 2, 2)), MEAN, STD)
    offsets = []
    for i in range(16):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(y[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert found, f"sample {i} is not a window of the padded input"
        offsets.append(found[0])
    # the generator draws row offsets then column offsets; check two samples by hand
    g = torch.Generator().manual_seed(7)
    dy, dx = torch.randint(0, 5, (16,), generator=g), torch.randint(0, 5, (16,), generator=g)
    for i in (0, 5):
        assert torch.equal(y[i], padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8])
    assert len(set(offsets)) > 1  # offsets differ per sample


def test_flip():
    x = _batch(b=32)
    y = BatchTransform(MEAN, STD, flip=True)(x, torch.Generator().manual_seed(0))
    ref = _normalise(x, MEAN, STD)
    flipped = [torch.equal(y[i], ref[i].flip(2)) for i in range(32)]
    kept = [torch.equal(y[i], ref[i]) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 4 < sum(flipped) < 28 and sum(kept) > 4


def test_dataset_transforms(tmp_path, offline):
    cifar = load_dataset("cifar10", os.path.dirname(write_cifar10_fixture(str(tmp_path), 10, 10)))
    aug = train_transform(cifar, augment=True)
    assert aug.crop_padding == 4 and aug.flip
    assert train_transform(cifar, augment=False).crop_padding == 0
    ev = eval_transform(cifar)
    assert ev.crop_padding == 0 and not ev.flip and ev.mean == cifar.mean
    fm = load_dataset("fashion_mnist", write_fashion_mnist_fixture(str(tmp_path / "fm"), 10, 10))
    t = train_transform(fm, augment=True)
    assert t.crop_padding == 0 and not t.flip
    assert torch.equal(t(fm.train_x), _normalise(fm.train_x, (0.2860,), (0.3530,)))


def test_fixture_is_weakly_learnable(tmp_path, offline):
    ds = load_dataset("cifar10", os.path.dirname(write_cifar10_fixture(str(tmp_path), 200, 10)))
    brightness = ds.train_x.float().mean(dim=(1, 2, 3))
    per_class = torch.stack([brightness[ds.train_y == c].mean() for c in range(10)])
    assert (per_class.diff() > 0).all()  # mean brightness rises with the class


# ---------------------------------------------------------------------------------------------- CINIC-10

def _png(path):
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy())


def _cinic_files(d, split):
    """(path, label) in the reader's order: classes in CIFAR-10's order, files by name."""
    return [(os.path.join(d, split, c, f), label) for label, c in enumerate(CIFAR_ORDER)
            for f in sorted(os.listdir(os.path.join(d, split, c)))]


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = dsmod._decode_cinic

    def counting(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(dsmod, "_decode_cinic", counting)
    return calls


def test_cinic10_fixture_round_trip(tmp_path, offline, count_decodes):
    d = write_cinic10_fixture(str(tmp_path), 23, 12, n_valid=4, seed=1)
    assert d == os.path.join(str(tmp_path), "CINIC-10")
    for root in (str(tmp_path), d):  # the parent or the CINIC-10 folder itself
        ds = load_dataset("cinic10", root)
        assert ds.name == "cinic10" and ds.num_classes == 10 and ds.in_channels == 3 and ds.image_size == 32
        assert ds.train_x.shape == (23, 3, 32, 32) and ds.test_x.shape == (12, 3, 32, 32)  # valid/ not used
        assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64 and ds.train_x.is_contiguous()
        assert ds.mean == (0.47889522, 0.47227842, 0.43047404) and ds.std == (0.24205776, 0.23828046, 0.25874835)
        for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
            files = _cinic_files(d, split)
            assert y.tolist() == [label for _, label in files]
            assert all(torch.equal(x[i], _png(p)) for i, (p, _) in enumerate(files))
    grey = [i for i, (p, _) in enumerate(_cinic_files(d, "train")) if Image.open(p).mode == "L"]
    assert grey and all(torch.equal(ds.train_x[i][0], ds.train_x[i][c]) for i in grey for c in (1, 2))
    assert sorted(set(ds.train_y.tolist())) == list(range(10))
    assert len(count_decodes) == 1  # the second load read the cache
    t = train_transform(ds, augment=True)
    assert t.crop_padding == 4 and t.flip and t.mean == ds.mean


def test_cinic10_cache_is_checked_and_rebuilt(tmp_path, offline, count_decodes):
    d = write_cinic10_fixture(str(tmp_path), 20, 10)
    cache = os.path.join(d, "mpisage-cache")
    first = load_dataset("cinic10", d)
    assert sorted(f for f in os.listdir(cache) if f.endswith((".npy", ".json"))) == [
        "manifest.json", "test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    assert len(count_decodes) == 1
    for f in os.listdir(cache):
        if f.endswith(".npy"):  # plain arrays, readable without pickle
            np.load(os.path.join(cache, f), allow_pickle=False)

    def reload_rebuilds():
        before = len(count_decodes)
        ds = load_dataset("cinic10", d)
        assert torch.equal(load_dataset("cinic10", d).train_x, ds.train_x)  # and the rebuilt cache is used
        return len(count_decodes) - before == 1, ds

    x = os.path.join(cache, "train_x.npy")
    with open(x, "r+b") as f:  # truncated
        f.truncate(os.path.getsize(x) // 2)
    rebuilt, ds = reload_rebuilds()
    assert rebuilt and torch.equal(ds.train_x, first.train_x)
    np.save(x, np.zeros((20, 3, 16, 16), np.uint8))  # wrong shape
    rebuilt, ds = reload_rebuilds()
    assert rebuilt and torch.equal(ds.train_x, first.train_x)
    np.save(os.path.join(cache, "test_y.npy"), np.zeros(10, np.int64))  # labels that do not match the folders
    rebuilt, ds = reload_rebuilds()
    assert rebuilt and torch.equal(ds.test_y, first.test_y)
    with open(os.path.join(cache, "manifest.json"), "w") as f:
        f.write("{not json")
    assert reload_rebuilds()[0]
    # stale: the same images in another order (a renamed file) ...
    first_plane = _cinic_files(d, "train")[0][0]
    os.rename(first_plane, os.path.join(os.path.dirname(first_plane), "zz-last.png"))
    rebuilt, ds = reload_rebuilds()
    assert rebuilt and torch.equal(ds.train_x[0], first.train_x[1]) and not torch.equal(ds.train_x, first.train_x)
    # ... or a new image
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(os.path.join(d, "train", "cat", "zz-new.png"))
    rebuilt, ds = reload_rebuilds()
    assert rebuilt and ds.train_x.shape[0] == 21
    cats = [i for i, (p, _) in enumerate(_cinic_files(d, "train")) if p.endswith("zz-new.png")]
    assert ds.train_y[cats[0]] == 3 and (ds.train_x[cats[0]] == 7).all()


def test_cinic10_cache_goes_to_user_cache_when_data_dir_is_not_writable(tmp_path, offline, count_decodes):
    d = write_cinic10_fixture(str(tmp_path), 10, 10)
    with open(os.path.join(d, "mpisage-cache"), "w") as f:  # no cache folder can be made next to the data
        f.write("in the way")
    ds = load_dataset("cinic10", d)
    user_caches = glob.glob(str(tmp_path / "cache" / "mpisage" / "cinic10-cache" / "*" / "manifest.json"))
    assert len(user_caches) == 1 and ds.train_x.shape[0] == 10
    assert torch.equal(load_dataset("cinic10", d).train_x, ds.train_x) and len(count_decodes) == 1


def test_cinic10_processes_starting_together_decode_once(tmp_path, offline, monkeypatch):
    d = write_cinic10_fixture(str(tmp_path), 10, 10)
    real, calls, results = dsmod._decode_cinic, [], []

    def slow_decode(*args):
        calls.append(1)
        time.sleep(0.3)  # the other loader arrives while this one decodes
        return real(*args)

    monkeypatch.setattr(dsmod, "_decode_cinic", slow_decode)
    threads = [threading.Thread(target=lambda: results.append(load_dataset("cinic10", d))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(calls) == 1
    assert all(torch.equal(r.train_x, results[0].train_x) for r in results)


def test_cinic10_missing_says_where_and_how(tmp_path, offline):
    with pytest.raises(dsmod.DataNotFound) as e:
        load_dataset("cinic10", str(tmp_path))
    msg = str(e.value)
    for p in (str(tmp_path), os.path.join(str(tmp_path), "CINIC-10"),
              str(tmp_path / "cache" / "mpisage" / "CINIC-10")):
        assert p in msg
    assert "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz" in msg
    assert "tar xzf CINIC-10.tar.gz -C <dataset.root>/CINIC-10" in msg
    assert "python -m mpisage.data.fetch cinic10" in msg and "dataset.root" in msg


def test_cinic10_broken_files_are_named(tmp_path, offline):
    d = write_cinic10_fixture(str(tmp_path), 10, 10)
    bad = _cinic_files(d, "test")[0][0]
    with open(bad, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(DataError, match=f"cannot decode {bad}"):
        load_dataset("cinic10", d)
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(bad)
    with pytest.raises(DataError, match="28x28 pixels"):
        load_dataset("cinic10", d)
    os.rename(os.path.join(d, "train", "ship"), os.path.join(d, "train", "boat"))
    with pytest.raises(DataError, match=os.path.join(d, "train", "ship") + " is missing"):
        load_dataset("cinic10", d)


# -------------------------------------------------------------------------------------------- conversion

def _pil_bilinear(x, size):
    """Pillow's bilinear resize of uint8 [N,C,H,W], channel by channel: an independent reference."""
    return torch.stack([torch.stack([torch.from_numpy(np.array(
        Image.fromarray(img[c].numpy()).resize((size, size), Image.BILINEAR))) for c in range(img.shape[0])])
        for img in x])


def test_fashion_mnist_as_sglr_uses_it(tmp_path, offline):
    """SGLR: Fashion-MNIST resized to 32x32 and repeated to 3 channels, normalised with the grey statistics."""
    root = write_fashion_mnist_fixture(str(tmp_path), 20, 8)
    grey = load_dataset("fashion_mnist", root)
    ds = load_dataset("fashion_mnist", root, image_size=32, channels=3)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (8, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.in_channels == 3 and ds.image_size == 32
    assert torch.equal(ds.train_y, grey.train_y)
    for c in (1, 2):
        assert torch.equal(ds.train_x[:, c], ds.train_x[:, 0])
    assert (ds.train_x[:, :1].int() - _pil_bilinear(grey.train_x, 32).int()).abs().max() <= 1
    assert ds.mean == (0.2860,) * 3 and ds.std == (0.3530,) * 3
    x = train_transform(ds, augment=True)(ds.train_x)  # no augmentation for Fashion-MNIST
    assert torch.allclose(x[:, 2], _normalise(ds.train_x[:, :1], (0.2860,), (0.3530,))[:, 0])
    repeated = load_dataset("fashion_mnist", root, channels=3)
    assert repeated.train_x.shape == (20, 3, 28, 28) and torch.equal(repeated.train_x[:, 1], grey.train_x[:, 0])
    assert torch.equal(load_dataset("fashion_mnist", root, channels=1, image_size=28).train_x, grey.train_x)


def test_shrinking_matches_pillow(tmp_path, offline):
    d = write_cifar10_fixture(str(tmp_path), 6, 4)
    full = load_dataset("cifar10", d)
    small = load_dataset("cifar10", d, image_size=12, channels=3)
    assert small.train_x.shape == (6, 3, 12, 12) and small.image_size == 12 and small.mean == full.mean
    assert (small.train_x.int() - _pil_bilinear(full.train_x, 12).int()).abs().max() <= 1


def test_colour_to_grey_is_refused(tmp_path, offline):
    d = write_cifar10_fixture(str(tmp_path), 4, 4)
    with pytest.raises(DataError, match="dataset.channels=1.*3 channels"):
        load_dataset("cifar10", d, channels=1)
    with pytest.raises(ValueError, match="dataset.channels"):
        load_dataset("cifar10", d, channels=2)


def test_make_world_applies_the_dataset_keys(tmp_path, offline):
    from mpisage.config import load_config
    from mpisage.runtime.world import make_world
    root = write_fashion_mnist_fixture(str(tmp_path), 40, 8)
    cfg = load_config(None, [f"dataset.root={root}", "dataset.image_size=32", "dataset.channels=3",
                             "dataset.samples_per_client=6", "num_clients=3"])
    client_rank = types.SimpleNamespace(rank=2, size=5)  # what make_world asks of the transport
    world = make_world(cfg, client_rank)
    assert world.data.in_channels == 3 and world.data.image_size == 32
    assert [len(p) for p in world.parts] == [6, 6, 6] and world.data.train_x.shape == (6, 3, 32, 32)


# -------------------------------------------------------------------------------------------------- fetch

def _tarball(path, members):
    """A .tar.gz holding `members`: {name in the archive: file path on disk, or bytes}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, src in members.items():
            if isinstance(src, bytes):
                info = tarfile.TarInfo(name)
                info.size = len(src)
                tar.addfile(info, io.BytesIO(src))
            else:
                tar.add(src, arcname=name)


def _serve(monkeypatch, archive):
    """Stands in for the network: every download copies `archive`."""
    served = []

    def fake_download(url, dest):
        served.append(url)
        with open(archive, "rb") as src, open(dest, "wb") as out:
            out.write(src.read())

    monkeypatch.setattr(dsmod, "_download_file", fake_download)
    return served


def test_fetch_unpacks_cinic10_and_builds_its_cache(tmp_path, offline, monkeypatch, capsys):
    src = write_cinic10_fixture(str(tmp_path / "src"), 10, 10)
    archive = str(tmp_path / "CINIC-10.tar.gz")
    _tarball(archive, {s: os.path.join(src, s) for s in ("train", "valid", "test")})  # no top folder, as CINIC's
    served = _serve(monkeypatch, archive)
    data = tmp_path / "data"
    assert fetchmod.main(["cinic10", str(data)]) == 0
    assert served == [dsmod.CINIC_URL]
    assert "cinic10: 10 train / 10 test images, 3x32x32, 10 classes" in capsys.readouterr().out
    assert sorted(os.listdir(data)) == ["CINIC-10"]  # the archive and the staging folder are gone
    assert os.path.isfile(data / "CINIC-10" / "mpisage-cache" / "manifest.json")
    assert fetchmod.main(["cinic10", str(data)]) == 0 and len(served) == 1  # present: no second download


def test_fetch_refuses_a_download_with_the_wrong_checksum(tmp_path, offline, monkeypatch, capsys):
    src = write_cifar10_fixture(str(tmp_path / "src"), 10, 10)
    archive = str(tmp_path / "cifar-10-python.tar.gz")
    _tarball(archive, {"cifar-10-batches-py": src})
    _serve(monkeypatch, archive)
    data = tmp_path / "data"
    assert fetchmod.main(["cifar10", str(data)]) == 1
    assert "wrong md5" in capsys.readouterr().err and os.listdir(data) == []
    with open(archive, "rb") as f:  # the same archive with its checksum published
        md5 = hashlib.md5(f.read()).hexdigest()
    monkeypatch.setitem(fetchmod.ARCHIVES, "cifar10", (fetchmod.ARCHIVES["cifar10"][0], md5, "cifar-10-batches-py"))
    assert fetchmod.main(["cifar10", str(data)]) == 0
    assert load_dataset("cifar10", str(data)).train_x.shape == (10, 3, 32, 32)


def test_fetch_refuses_an_archive_that_writes_outside_its_folder(tmp_path, offline, monkeypatch, capsys):
    archive = str(tmp_path / "evil.tar.gz")
    _tarball(archive, {"train/cat/x.png": b"x", "../../escaped.txt": b"gotcha"})
    _serve(monkeypatch, archive)
    data = tmp_path / "deep" / "data"
    assert fetchmod.main(["cinic10", str(data)]) == 1
    assert "cannot unpack it safely" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escaped.txt")) and not os.path.exists(data / "CINIC-10")


def test_fetch_usage():
    assert fetchmod.main([]) == 2 and fetchmod.main(["mnist"]) == 2


# ------------------------------------------------------------------------------------------------ configs

CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs")))
def test_every_config_file_loads(path):
    from mpisage.config import load_config
    cfg = load_config(path)
    assert "${" not in cfg.run_dir  # interpolations resolved
    if os.path.basename(os.path.dirname(path)) == "paper":
        # one file per experiment: the method is chosen with algorithm=... and names the run directory
        methods = ("fsl_sage", "cse_fsl", "fed_avg", "sl_single_server", "sl_multi_server", "sl_vanilla")
        run_dirs = {m: load_config(path, [f"algorithm={m}"]).run_dir for m in methods}
        assert all(m in d for m, d in run_dirs.items()) and len(set(run_dirs.values())) == len(methods)


def test_config_files_exist():
    assert len(CONFIG_FILES) >= 5 and any("/paper/" in p for p in CONFIG_FILES)


# -------------------------------------------------------------------------------------------------- slurm

FAKE_SRUN = """#!/bin/bash
# Records each call (OMP_NUM_THREADS, the files staged so far, the arguments); runs the staging and clean-up
# commands, not the job.
printf '%s\\n' "OMP_NUM_THREADS=$OMP_NUM_THREADS" "STAGED=$(cd "$LOCAL_DIR" && find . -type f | sort)" "$@" \\
  > "$SRUN_LOG.$(ls "$SRUN_LOG".* 2>/dev/null | wc -l)"
while [[ "$1" == --* ]]; do shift; done
case "$1" in bash|rm) "$@" ;; esac
"""


@pytest.mark.parametrize("script, device_args", [
    ("h100.sbatch", ["--gpu-bind=none", "device.sserver=cuda", "device.clients=cpu"]),
    ("cpu.sbatch", ["device.sserver=cpu", "device.clients=cpu"]),
])
def test_slurm_script_stages_data_and_starts_the_ranks(tmp_path, script, device_args):
    bin_dir, data, local = tmp_path / "bin", tmp_path / "data", tmp_path / "local"
    for d in (bin_dir, data / "CINIC-10", local):
        d.mkdir(parents=True)
    (data / "CINIC-10" / "img.png").write_bytes(b"png")
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_LOG": str(tmp_path / "srun"), "SLURM_SUBMIT_DIR": ROOT,
           "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "t", "SLURM_NNODES": "1", "SLURM_NTASKS": "11",
           "SLURM_CPUS_PER_TASK": "4", "DATA_DIR": str(data), "LOCAL_DIR": str(local)}
    out = subprocess.run(["bash", os.path.join(ROOT, "slurm", script), "-c", "configs/x.yaml", "rounds=3"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    calls = [(tmp_path / f"srun.{i}").read_text().splitlines() for i in range(3)]
    stage = str(local / "mpisage-data-t-77")
    assert calls[0][-2:] == [stage, str(data)]                     # staged on every node ...
    job = calls[1]
    assert job[1] == "STAGED=./mpisage-data-t-77/CINIC-10/img.png"
    assert job[0] == "OMP_NUM_THREADS=4" and "--mpi=pmix" in job and "--cpus-per-task=4" in job
    assert ("--gpu-bind=none" in job) == (script == "h100.sbatch")
    assert job[job.index(".venv/bin/python"):] == [".venv/bin/python", "-m", "mpisage.run", "run_dir=runs/t-77",
        "resume=auto", "runtime.torch_threads=4", *[a for a in device_args if not a.startswith("--")],
        f"dataset.root={stage}", "-c", "configs/x.yaml", "rounds=3"]
    assert calls[2][-3:] == ["rm", "-rf", stage] and not os.path.exists(stage)  # ... and removed after the job
