"""Tests for mpisage.data: readers on fixture files, partitions, batched transforms."""
import gzip
import os
import pickle
import sys

import numpy as np
import pytest
import torch

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
    write_fashion_mnist_fixture,
)
from mpisage.data import datasets as dsmod

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


@pytest.mark.parametrize("kwargs, key", [
    (dict(num_clients=3, scheme="bogus"), "dataset.distribution"),
    (dict(num_clients=3, scheme="noniid_dirichlet", alpha=0.0), "dataset.alpha"),
    (dict(num_clients=0, scheme="iid"), "num_clients"),
    (dict(num_clients=1001, scheme="iid"), "num_clients"),
    (dict(num_clients=600, scheme="shards", shards_per_client=2), "shards_per_client"),
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
